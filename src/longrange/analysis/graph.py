"""Attention patterns as graphs: edges, degrees and hops, computed from the block layout.

Direction. An edge q -> k means query q attends to key k (the mask is True at [q, k]). Information
flows the other way: one layer carries key k's content into query q. `hops(s -> t)` is the fewest
layers after which token t's output depends on token s's input, with residual connections (a token
keeps what it had, so "within L layers" = a path of at most L edges, followed key -> query).

- `hops` (the diameter): max over ordered pairs (s, t) of hops(s -> t); None when some pair is never
  connected (a causal graph: the past never hears the future; a dilated head: other residues).
- eccentricity of t: max over s of hops(s -> t), the layers after which t has heard every token;
  `radius` is its minimum (BigBird's global tokens: 1), `hops` its maximum.
- `hops_reachable`: max over the connected pairs only (a causal window: ~n/r layers).
- BigBird's argument, checked here: with global tokens every pair is 2 hops apart; a pure window of
  one-sided radius r needs ceil((n - 1) / r) layers.

Nothing here builds an n×n tensor. Tiles are the layout's (query block, key block) pairs: full tiles
count their real tokens, partial tiles evaluate the pattern's predicate on that tile only.

Hops (`all_pairs_hops`): breadth-first frontier propagation from every source at once, the reach
sets held as bits (64 sources per int64 word, [n, S/64] words, S sources per batch). One layer ORs,
for each query, the bits of the keys it sees: full tiles as runs of whole blocks, partial tiles
split into c×c sub-tiles (full ones as runs, mixed ones key by key); a run costs two lookups in a
doubling table of ORs. Sources seen by the same queries (the tokens of a block whose column holds
only full tiles: BigBird, full attention) are one class and share one bit. Exact; cost about
classes/64 · (diameter + 1) · (n + runs + mixed·c²) word operations, bounded by `max_work`; past it
the figures come from the block graph as bounds, flagged in `hops_level`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from longrange.core.config import ConfigError
from longrange.core.interface import Attention
from longrange.mechanisms import ATTENTIONS, build_attention, list_attentions
from longrange.mechanisms.base import PatternAttention
from longrange.mechanisms.full import FullAttention
from longrange.patterns import Causal, Full, Global, Pattern, Segments, Window, fixed, strided
from longrange.sparse.layout import BlockLayout, compile_layout

#: default work budget per graph for exact token-level hops, in int64 word operations (~1e8 per second)
DEFAULT_MAX_WORK = 10**9
#: block size for a bare pattern that names none (random / block-window patterns name theirs)
DEFAULT_TILE = 64
#: partial-tile masks are kept for the hop search up to this many elements (else block-level hops)
MAX_MASK_ELEMS = 1 << 26
#: the hop search propagates sources in batches of about this many bits (token × source)
SOURCE_BITS = 1 << 26
#: mixed fine tiles are processed in chunks of about this many words
CHUNK_ELEMS = 1 << 20
#: runs of key blocks are cut to at most this many (the OR tables have log2(MAX_RUN) + 1 levels)
MAX_RUN = 256

NOT_A_PATTERN = {
    "linformer": "it projects keys and values to k rows (low rank), so every query mixes every key",
    "performer": "its kernel feature map makes every query mix every key",
    "linear": "its kernel feature map makes every query mix every key",
    "nystrom": "it approximates the dense softmax through landmarks, so every query mixes every key",
    "reformer": "its LSH buckets depend on the data, so the graph changes with every input",
}


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spread:
    """min / mean / max of a per-token quantity."""

    min: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Spread:
        v = values.double()
        return cls(min=_num(v.min()), mean=float(v.mean()), max=_num(v.max()))

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "mean": self.mean, "max": self.max}


def _num(x: torch.Tensor) -> float | int:
    v = float(x)
    return int(v) if v.is_integer() else v


@dataclasses.dataclass(kw_only=True)
class HeadStats:
    """Graph figures of one head (or, for `GraphStats`, of the layer: the union of its heads).

    edges: token pairs (query, key) attending; density = edges / n². out_degree: keys per query;
    in_degree: queries per key. Hop figures follow the module docstring; `hops_level` says how exact
    they are: "token" (exact), "block" (bounds from the block graph: `hops`, `radius` and
    `eccentricity` are lower bounds with every non-empty tile treated as full, `hops_upper` an upper
    bound through full tiles only, `reachable` an upper bound), or "none" (not computed).
    """

    head: int | None
    edges: int
    density: float
    out_degree: Spread
    in_degree: Spread
    hops: int | None
    hops_level: str
    hops_upper: int | None = None
    hops_reachable: int | None = None
    radius: int | None = None
    reachable: float | None = None
    depth: int | None = None
    reach_within_depth: float | None = None
    #: [n] long: layers after which each token has heard every token; -1 = never (None: not computed)
    eccentricity: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def connected(self) -> bool | None:
        """Every token reaches every token at some depth (None: unknown at this level)."""
        return self.connected_within(math.inf)

    def connected_within(self, depth: float) -> bool | None:
        """Every token reaches every token within `depth` layers. None when block-level bounds
        cannot decide (lower bound <= depth < upper bound) or hops were not computed."""
        if self.hops_level == "token":
            return self.hops is not None and self.hops <= depth
        if self.hops_level == "block":
            if self.hops_upper is not None and self.hops_upper <= depth:
                return True
            if self.hops is None or self.hops > depth:
                return False
        return None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "head": self.head, "edges": self.edges, "density": self.density,
            "out_degree": self.out_degree.to_dict(), "in_degree": self.in_degree.to_dict(),
            "hops": self.hops, "hops_level": self.hops_level, "hops_upper": self.hops_upper,
            "hops_reachable": self.hops_reachable, "radius": self.radius,
            "eccentricity": _ecc_summary(self.eccentricity), "reachable": self.reachable,
            "connected": self.connected,
        }
        if self.depth is not None:
            out.update(depth=self.depth, reach_within_depth=self.reach_within_depth,
                       connected_within_depth=self.connected_within(self.depth))
        return out


def _ecc_summary(ecc: torch.Tensor | None) -> dict[str, float | None] | None:
    if ecc is None or not len(ecc):
        return None
    finite = ecc[ecc >= 0]
    all_finite = len(finite) == len(ecc)
    return {
        "min": int(finite.min()) if len(finite) else None,
        "mean": float(ecc.double().mean()) if all_finite else None,
        "max": int(ecc.max()) if all_finite else None,
    }


@dataclasses.dataclass(kw_only=True)
class GraphStats(HeadStats):
    """The layer's graph (union of its heads) plus, where heads differ, one `HeadStats` per head.

    heads: heads in the layer (a module's `config.heads`, a per-head pattern's `num_heads`, else 1);
    edges_all_heads: edges summed over every head (the pairs the layer scores).
    """

    name: str
    n: int
    tile: int
    heads: int = 1
    heads_differ: bool = False
    edges_all_heads: int = 0
    per_head: list[HeadStats] = dataclasses.field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        head = super().to_dict()
        head.pop("head")
        return {
            "name": self.name, "n": self.n, "tile": self.tile, "heads": self.heads,
            "heads_differ": self.heads_differ, "edges_all_heads": self.edges_all_heads, **head,
            "note": self.note, "per_head": [h.to_dict() for h in self.per_head],
        }


# ---------------------------------------------------------------------------------------------------
# what to analyse: a Pattern or a mechanism module
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GraphSource:
    """A pattern with the block size and head count it is analysed at."""

    name: str
    pattern: Pattern
    tile: int
    heads: int


def resolve_source(obj, tile: int | None = None, global_tokens: int = 0) -> GraphSource:
    """Pattern or mechanism module -> GraphSource. `global_tokens` > 0 adds global tokens at
    positions 0.. (Longformer's `global_mask`, BigBird's user globals). ValueError for mechanisms
    whose graph is not a fixed pattern."""

    if tile is not None and (not isinstance(tile, int) or tile <= 0):
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    if not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be a non-negative int, got {global_tokens!r}")
    if isinstance(obj, Pattern):
        src = GraphSource(repr(obj), obj, tile or default_tile(obj), obj.num_heads or 1)
    elif isinstance(obj, PatternAttention):
        if global_tokens and "global_mask" not in obj.capabilities.inputs:
            raise ValueError(f"{obj.config.name!r} takes no global tokens (no global_mask); longformer and bigbird do")
        src = GraphSource(obj.config.name, obj.current_pattern(), tile or obj.tile, obj.config.heads)
    elif isinstance(obj, FullAttention):
        pattern = Causal() if obj.config.causal else Full()
        src = GraphSource("full", pattern, tile or DEFAULT_TILE, obj.config.heads)
    elif isinstance(obj, Attention):
        raise ValueError(not_a_pattern_message(getattr(obj.config, "name", type(obj).__name__)))
    else:
        raise TypeError(f"expected a Pattern or an attention module, got {type(obj).__name__}")
    if global_tokens:
        src.pattern = src.pattern | Global(range(global_tokens))
        src.name = f"{src.name} + {global_tokens} global"
    return src


def not_a_pattern_message(name: str) -> str:
    why = NOT_A_PATTERN.get(name, "it approximates dense attention, or its graph depends on the data")
    return (f"{name!r} has no fixed attention graph: {why}. Graph statistics and pictures cover the pattern "
            f"mechanisms (local, dilated, longformer, bigbird, sparse_transformer) and full.")


def has_pattern(module_class: type) -> bool:
    """Whether a mechanism class has a fixed graph (a PatternAttention, or full)."""

    return issubclass(module_class, (PatternAttention, FullAttention))


def default_tile(pattern: Pattern) -> int:
    """The block size a pattern names (RandomBlocks, BlockWindow), else DEFAULT_TILE."""
    stack = [pattern]
    while stack:
        p = stack.pop()
        if getattr(p, "block_size", None):
            return p.block_size
        stack.extend(getattr(p, "parts", ()))
        if hasattr(p, "inner"):
            stack.append(p.inner)
    return DEFAULT_TILE


def selected_heads(heads: int | Sequence[int] | None, layer_heads: int) -> list[int]:
    """None -> every head; an int -> that head; a sequence -> those heads (each in [0, layer_heads))."""
    chosen = list(range(layer_heads)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    for h in chosen:
        if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < layer_heads:
            raise ValueError(f"heads must be head indices in [0, {layer_heads}), got {heads!r}")
    return chosen


# ---------------------------------------------------------------------------------------------------
# tiles: the layout's non-empty (query block, key block) pairs of one head or a union of heads
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tiles:
    """One graph at tile level (block size b, nb blocks; the last block may be padded).

    full_q, full_k [Tf]   full tiles: every real query of block full_q sees every real key of full_k
    part_q, part_k [P]    partial tiles (some but not all real pairs)
    row_sums [P, b]       keys each query token sees inside the partial tile (long)
    col_sums [P, b]       queries that see each key token inside it
    masks [P, b, b]       the partial tiles' masks (None when over MAX_MASK_ELEMS or not asked for)
    pooled [P, r, r]      edge counts on u×u cells (r = b / u) when asked for (pictures)
    """

    n: int
    b: int
    full_q: torch.Tensor
    full_k: torch.Tensor
    part_q: torch.Tensor
    part_k: torch.Tensor
    row_sums: torch.Tensor
    col_sums: torch.Tensor
    masks: torch.Tensor | None
    pooled: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.b)

    def real_per_block(self) -> torch.Tensor:
        """[nb] long: real tokens in each block."""
        return (torch.arange(self.num_blocks * self.b) < self.n).view(-1, self.b).sum(1)


def candidate_tiles(layout: BlockLayout) -> tuple[torch.Tensor, ...]:
    """Every (head, query block, key block) the layout visits, with a known-full flag: four [T]
    tensors. Dense (global) rows visit every key block."""
    hp, nb, _ = layout.kv_index.shape
    h, q, s = layout.valid.nonzero(as_tuple=True)
    k = layout.kv_index[h, q, s]
    full = ~layout.partial[h, q, s]
    g = len(layout.dense_rows)
    if g:
        dh = torch.arange(hp).repeat_interleave(g * nb)
        dq = layout.dense_rows.repeat_interleave(nb).repeat(hp)
        dk = torch.arange(nb).repeat(g * hp)
        dfull = layout.dense_full.repeat_interleave(nb).repeat(hp)
        h, q, k, full = (torch.cat(p) for p in ((h, dh), (q, dq), (k, dk), (full, dfull)))
    return h, q, k, full


def graph_tiles(layout: BlockLayout, heads: Sequence[int], pool: int | None = None,
                keep_masks: bool = True) -> Tiles:
    """The union over `heads` of the layout's graphs, as Tiles. A tile is full if it is full in some
    head; otherwise the predicate is evaluated on that tile (OR over the heads), chunk by chunk.
    `pool` = u (a divisor of b) also returns the partial tiles' edge counts on u×u cells."""
    n, b, nb = layout.n, layout.tile, layout.num_blocks
    h, q, k, full = candidate_tiles(layout)
    pick = torch.isin(h, torch.tensor(list(heads), dtype=torch.long))
    key = q[pick] * nb + k[pick]
    uniq, inv = torch.unique(key, return_inverse=True)  # [U]
    full_u = torch.zeros(len(uniq), dtype=torch.int8).scatter_reduce_(0, inv, full[pick].to(torch.int8), "amax")
    full_u = full_u.bool()
    tq, tk = uniq // nb, uniq % nb
    fq, fk = tq[full_u], tk[full_u]
    pq, pk = tq[~full_u], tk[~full_u]
    keep = keep_masks and len(pq) * b * b <= MAX_MASK_ELEMS
    parts = _evaluate_partial(layout.mask_mod, n, b, pq, pk, list(heads), pool, keep)
    now_full, empty = parts["full"], parts["empty"]
    stay = ~now_full & ~empty
    return Tiles(
        n=n, b=b,
        full_q=torch.cat([fq, pq[now_full]]), full_k=torch.cat([fk, pk[now_full]]),
        part_q=pq[stay], part_k=pk[stay],
        row_sums=parts["rows"][stay], col_sums=parts["cols"][stay],
        masks=parts["masks"][stay] if keep else None,
        pooled=parts["pooled"][stay] if pool else None,
    )


def _evaluate_partial(fn, n: int, b: int, pq: torch.Tensor, pk: torch.Tensor, heads: list[int],
                      pool: int | None, keep: bool) -> dict[str, torch.Tensor]:
    """Masks of tiles (pq, pk) [P], OR'd over heads, chunk by chunk: row/col sums [P, b], full/empty
    flags [P], optional masks [P, b, b] and pooled u×u counts [P, b/u, b/u]."""
    offs = torch.arange(b)
    step = max(1, (1 << 22) // (b * b * max(1, len(heads))))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("rows", "cols", "full", "empty", "masks", "pooled")}
    for start in range(0, len(pq), step):
        qb, kb = pq[start : start + step], pk[start : start + step]
        qi = (qb * b)[:, None, None] + offs[None, :, None]  # [p, b, 1]
        ki = (kb * b)[:, None, None] + offs[None, None, :]  # [p, 1, b]
        real = (qi < n) & (ki < n)  # [p, b, b]
        m = torch.zeros(len(qb), b, b, dtype=torch.bool)
        for h in heads:
            m |= fn(torch.full((1, 1, 1), h), qi, ki)
        m &= real
        out["rows"].append(m.sum(2))
        out["cols"].append(m.sum(1))
        out["full"].append((m | ~real).flatten(1).all(1))
        out["empty"].append(~m.flatten(1).any(1))
        if keep:
            out["masks"].append(m)
        if pool:
            r = b // pool
            out["pooled"].append(m.view(-1, r, pool, r, pool).sum((2, 4)))
    shapes = {"rows": (0, b), "cols": (0, b), "full": (0,), "empty": (0,), "masks": (0, b, b),
              "pooled": (0, b // (pool or b), b // (pool or b))}
    dtypes = {"full": torch.bool, "empty": torch.bool, "masks": torch.bool}
    return {k: torch.cat(v) if v else torch.zeros(shapes[k], dtype=dtypes.get(k, torch.long)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# edges and degrees, tile by tile
# ---------------------------------------------------------------------------------------------------
def degrees(t: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_degree, in_degree), each [n] long: keys per query and queries per key."""
    nb, b = t.num_blocks, t.b
    real = t.real_per_block()  # [nb]
    out_blk = torch.zeros(nb, dtype=torch.long).index_add_(0, t.full_q, real[t.full_k])
    in_blk = torch.zeros(nb, dtype=torch.long).index_add_(0, t.full_k, real[t.full_q])
    out_tok = torch.zeros(nb, b, dtype=torch.long).index_add_(0, t.part_q, t.row_sums)  # [nb, b]
    in_tok = torch.zeros(nb, b, dtype=torch.long).index_add_(0, t.part_k, t.col_sums)
    out = (out_tok + out_blk[:, None]).flatten()[: t.n]
    inn = (in_tok + in_blk[:, None]).flatten()[: t.n]
    return out, inn


# ---------------------------------------------------------------------------------------------------
# tile graphs: the propagation structure of the hop search
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TileGraph:
    """A graph on n_pad = nb·b nodes for the hop search, edges as (query side first):

    coarse [Rc, 3]  runs of full b×b tiles: (query block, first key block, run length)
    fine [Rf, 3]    runs of full c×c tiles inside partial b×b tiles, on fine blocks (c divides b;
                    c = 1: runs of keys of single tokens)
    mixed [M, 2]    c×c tiles with a token-level mask, masks [M, c, c] bool
    weights [n_pad] long: tokens each node stands for (1 per real token; 0 for padding; a block's
    real tokens in a block quotient graph, where nodes are blocks and b = c = 1).
    A run (q, a, l) means: q sees every node of blocks a .. a+l-1 (l <= MAX_RUN).
    """

    b: int
    c: int
    coarse: torch.Tensor
    fine: torch.Tensor
    mixed: torch.Tensor
    masks: torch.Tensor
    weights: torch.Tensor

    @property
    def n_pad(self) -> int:
        return len(self.weights)

    @functools.cached_property
    def coarse_groups(self) -> list[torch.Tensor]:
        return rank_groups(self.coarse[:, 0])

    @functools.cached_property
    def fine_groups(self) -> list[torch.Tensor]:
        return rank_groups(self.fine[:, 0])

    @functools.cached_property
    def mixed_groups(self) -> list[torch.Tensor]:
        return rank_groups(self.mixed[:, 0])

    @functools.cached_property
    def neg_masks(self) -> torch.Tensor:
        """[M, c, c] int64: -1 (every bit set) where the mask is True, else 0."""
        return -self.masks.long()

    def step_cost(self) -> int:
        """Word operations per 64 sources per propagation step (the budget's unit)."""
        return _propagation_cost(self.n_pad, self.b, self.c, self.coarse, self.fine, len(self.mixed))


def _propagation_cost(n_pad: int, b: int, c: int, coarse: torch.Tensor, fine: torch.Tensor, mixed: int) -> int:
    levels = [_levels(runs) for runs in (coarse, fine)]
    return (3 * n_pad + levels[0] * (n_pad // b) + levels[1] * (n_pad // c)
            + 5 * (len(coarse) + len(fine)) + mixed * (2 * c * c + 3 * c))


def _levels(runs: torch.Tensor) -> int:
    return int(runs[:, 2].max()).bit_length() if len(runs) else 0


def token_graph(t: Tiles) -> TileGraph:
    """Tiles (with masks) -> a token-level TileGraph: partial tiles are split into c×c fine tiles,
    c (a divisor of b among 1, 2, 4, ..., 32) chosen to minimise the propagation cost: full fine
    tiles become runs, mixed ones cost about 2·c² word operations each."""
    if t.masks is None:
        raise ValueError("token_graph needs the partial tiles' masks")
    b = t.b
    weights = (torch.arange(t.num_blocks * b) < t.n).long()
    coarse = runs_from_pairs(t.full_q, t.full_k)
    if not len(t.part_q):
        empty = torch.zeros(0, 3, dtype=torch.long)
        return TileGraph(b, b, coarse, empty, empty[:, :2], torch.zeros(0, b, b, dtype=torch.bool), weights)
    real = weights.bool().view(-1, b)
    realq, realk = real[t.part_q], real[t.part_k]  # [P, b]
    best = None
    for c in sorted({c for c in (1, 2, 4, 8, 16, 32, b) if c <= min(b, 32) and b % c == 0}):
        full, mixed, sub = _fine_tiles(t.masks, realq, realk, c)
        fine = runs_from_grid(full, t.part_q, t.part_k)
        cost = _propagation_cost(len(weights), b, c, coarse, fine, int(mixed.sum()))
        if best is None or cost < best[0]:
            p, i, j = mixed.nonzero(as_tuple=True)
            r = b // c
            mix = torch.stack([t.part_q[p] * r + i, t.part_k[p] * r + j], 1)
            best = (cost, TileGraph(b, c, coarse, fine, mix, sub[p, i, j], weights))
    return best[1]


def _fine_tiles(masks: torch.Tensor, realq: torch.Tensor, realk: torch.Tensor, c: int):
    """masks [P, b, b] -> (full [P, r, r], mixed [P, r, r], sub-masks [P, r, r, c, c]), r = b / c."""
    p, b, _ = masks.shape
    r = b // c
    m = masks.view(p, r, c, r, c).transpose(2, 3)  # [P, r, r, c, c]
    real = realq.view(p, r, 1, c, 1) & realk.view(p, 1, r, 1, c)  # [P, r, r, c, c]
    any_ = m.flatten(3).any(3)
    full = (m | ~real).flatten(3).all(3) & any_
    return full, any_ & ~full, m


def runs_from_pairs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Edges (q, k) [E] -> runs [R, 3] (q, first k, length) of consecutive k, cut at MAX_RUN."""
    if not len(q):
        return torch.zeros(0, 3, dtype=torch.long)
    key = q * (int(k.max()) + 2) + k
    order = torch.argsort(key)
    q, k = q[order], k[order]
    start = torch.ones(len(q), dtype=torch.bool)
    start[1:] = (q[1:] != q[:-1]) | (k[1:] != k[:-1] + 1)
    first = start.nonzero().flatten()
    length = torch.diff(first, append=torch.tensor([len(q)]))
    return _cut_runs(q[first], k[first], length)


def runs_from_grid(full: torch.Tensor, part_q: torch.Tensor, part_k: torch.Tensor) -> torch.Tensor:
    """Full fine tiles as a grid [P, r, r] over partial tiles -> runs [R, 3] on fine blocks (runs
    stop at tile borders)."""
    p, r, _ = full.shape
    before = torch.zeros_like(full)
    before[..., 1:] = full[..., :-1]
    after = torch.zeros_like(full)
    after[..., :-1] = full[..., 1:]
    ps, i, j0 = (full & ~before).nonzero(as_tuple=True)  # row-major: starts and ends pair up in order
    _, _, j1 = (full & ~after).nonzero(as_tuple=True)
    return _cut_runs(part_q[ps] * r + i, part_k[ps] * r + j0, j1 - j0 + 1)


def _cut_runs(q: torch.Tensor, a: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    pieces = -(-length // MAX_RUN)  # [R]
    q, a, length = (t.repeat_interleave(pieces) for t in (q, a, length))
    offset = (torch.arange(len(q)) - (torch.cumsum(pieces, 0) - pieces).repeat_interleave(pieces)) * MAX_RUN
    return torch.stack([q, a + offset, (length - offset).clamp(max=MAX_RUN)], 1)


def block_graph(t: Tiles, full_only: bool) -> TileGraph:
    """The block quotient: one node per block (weight = its real tokens), an edge per tile.
    All tiles (full_only=False) over-approximate the token graph (hop lower bounds); full tiles
    only under-approximate it (upper bounds)."""
    q = t.full_q if full_only else torch.cat([t.full_q, t.part_q])
    k = t.full_k if full_only else torch.cat([t.full_k, t.part_k])
    empty = torch.zeros(0, 3, dtype=torch.long)
    return TileGraph(1, 1, runs_from_pairs(q, k), empty, empty[:, :2], torch.zeros(0, 1, 1, dtype=torch.bool),
                     t.real_per_block())


def source_classes(g: TileGraph) -> torch.Tensor:
    """[n_pad] long class id per node (-1: padding). Nodes of one class are seen by exactly the same
    queries (same column), so they have the same hop distances to every other token: a block
    untouched by fine/mixed tiles is one class, then a fine block untouched by mixed tiles, else
    each token alone."""
    n_pad, b, c = g.n_pad, g.b, g.c
    nb, nf = n_pad // b, n_pad // c
    cover = torch.zeros(nf + 1, dtype=torch.long)  # difference array of the fine runs' key ranges
    cover.index_add_(0, g.fine[:, 1], torch.ones(len(g.fine), dtype=torch.long))
    cover.index_add_(0, g.fine[:, 1] + g.fine[:, 2], -torch.ones(len(g.fine), dtype=torch.long))
    is_mixed = torch.zeros(nf, dtype=torch.bool)
    is_mixed[g.mixed[:, 1]] = True
    touched = (torch.cumsum(cover, 0)[:nf] > 0) | is_mixed
    block_uniform = ~touched.view(nb, b // c).any(1)  # [nb]
    tok = torch.arange(n_pad)
    label = torch.where(block_uniform[tok // b], tok // b,
                        torch.where(~is_mixed[tok // c], nb + tok // c, nb + nf + tok))
    label = torch.where(g.weights > 0, label, -1)
    _, ids = torch.unique(label, return_inverse=True)
    return torch.where(label >= 0, ids - int((label < 0).any()), -1)


# ---------------------------------------------------------------------------------------------------
# bit sets: column s of an [N, S] bool matrix is bit s % 64 of word s // 64 of an [N, W] int64 matrix
# ---------------------------------------------------------------------------------------------------
_BITS = torch.arange(64)


def pack_bits(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_words: int) -> torch.Tensor:
    """Distinct (row, col) pairs [k] -> [n_rows, n_words] int64 with those bits set."""
    words = torch.zeros(n_rows * n_words, dtype=torch.long)
    words.index_add_(0, rows * n_words + cols // 64, torch.ones_like(cols) << (cols % 64))  # distinct bits: + is |
    return words.view(n_rows, n_words)


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each int64 (SWAR; arithmetic shifts are masked)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56) & 0xFF


def weighted_column_counts(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r [N, W] bits, w [N] -> [64·W] float64: sum of w over the rows holding each column's bit."""
    n, n_words = r.shape
    out = torch.zeros(n_words * 64, dtype=torch.float64)
    step = max(1, (1 << 21) // (64 * n_words))
    for i in range(0, n, step):
        bits = ((r[i : i + step, :, None] >> _BITS) & 1).view(-1, n_words * 64).float()  # [rows, 64·W]
        out += (w[i : i + step].float() @ bits).double()  # exact: < 2^24 per chunk
    return out


def or_reduce(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bitwise OR over `dim` (by halving), that dim removed."""
    while x.shape[dim] > 1:
        k = x.shape[dim]
        half = x.narrow(dim, 0, k // 2) | x.narrow(dim, k // 2, k // 2)
        x = torch.cat([half, x.narrow(dim, k - 1, 1)], dim) if k % 2 else half
    return x.squeeze(dim)


def rank_groups(q: torch.Tensor) -> list[torch.Tensor]:
    """Positions of q [E] split into groups without repeated values (group r holds the r-th
    occurrence of each value), so `out[q[g]] |= v` never writes one row twice."""
    if not len(q):
        return []
    order = torch.argsort(q, stable=True)
    sq = q[order]
    counts = torch.bincount(sq)
    rank = torch.arange(len(q)) - (torch.cumsum(counts, 0) - counts)[sq]
    by_rank = order[torch.argsort(rank, stable=True)]
    return list(by_rank.split(torch.bincount(rank).tolist()))


# ---------------------------------------------------------------------------------------------------
# the hop search
# ---------------------------------------------------------------------------------------------------
class OverBudget(Exception):
    """The exact search would exceed its work budget."""


@dataclasses.dataclass
class Hops:
    """All-pairs hop figures of one TileGraph, per node (see all_pairs_hops)."""

    eccentricity: torch.Tensor  # [n_pad] long, -1 = some source never reaches this node
    max_finite: int  # the largest finite hops(s -> t)
    reachable_pairs: int  # ordered token pairs connected at some depth (self pairs included)
    within_depth_pairs: int | None  # ... within `depth` layers
    work: int


def propagate(g: TileGraph, r: torch.Tensor) -> torch.Tensor:
    """One layer: r [n_pad, W] source bits (bit s of row t: t holds source s) -> [n_pad, W], the
    OR of the bits of the keys each node sees: runs of full tiles through OR tables, mixed tiles
    key by key."""
    n_pad, n_words = r.shape
    b, c = g.b, g.c
    out = torch.zeros_like(r)
    if len(g.coarse):
        ob = _or_runs(or_reduce(r.view(-1, b, n_words), 1), g.coarse, g.coarse_groups)  # [nb, W]
        out.view(-1, b, n_words).__ior__(ob[:, None, :])
    if len(g.fine) or len(g.mixed):
        rv = r.view(-1, c, n_words)  # [nf, c, W]
        of = _or_runs(or_reduce(rv, 1), g.fine, g.fine_groups)  # [nf, W]
        om = of[:, None, :].repeat(1, c, 1)  # [nf, c, W]
        step = max(1, CHUNK_ELEMS // (c * n_words))
        for group in g.mixed_groups:
            for idx in group.split(step):
                q, k = g.mixed[idx].unbind(1)
                om[q] |= _mixed_or(rv[k], g.neg_masks[idx])
        out |= om.view(n_pad, n_words)
    return out.masked_fill_((g.weights == 0)[:, None], 0)


def _or_runs(src: torch.Tensor, runs: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """src [N, W] -> out [N, W], out[q] = OR of src[a : a + l] over q's runs (q, a, l). A run is two
    lookups in a doubling table: tab[i][j] = OR of src[j : j + 2^i]."""
    out = torch.zeros_like(src)
    if not len(runs):
        return out
    tab = src.new_empty(_levels(runs), *src.shape)  # [levels, N, W]
    tab[0] = src
    for i in range(1, len(tab)):
        half = 1 << (i - 1)
        tab[i] = tab[i - 1]
        tab[i, :-half] |= tab[i - 1, half:]
    for idx in groups:
        q, a, length = runs[idx].unbind(1)
        lev = torch.log2(length.double()).floor().long()  # 2^lev <= length < 2^(lev + 1)
        out[q] |= tab[lev, a] | tab[lev, a + length - (1 << lev)]
    return out


def _mixed_or(keys: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """keys [m, c, W] (key j's bits), neg [m, c, c] (-1 where query i sees key j) -> [m, c, W]."""
    out = torch.zeros_like(keys)
    for j in range(keys.shape[1]):
        out |= keys[:, None, j, :] & neg[:, :, j, None]
    return out


def all_pairs_hops(g: TileGraph, classes: torch.Tensor, depth: int | None = None,
                   max_work: float = DEFAULT_MAX_WORK) -> Hops:
    """Exact hops between every ordered pair of tokens, without an n×n tensor.

    Sources are taken by class (`source_classes`: tokens seen by the same queries share their
    distances), up to SOURCE_BITS / n_pad at a time, as bit columns. For a batch, R_L[t, C] = "a
    token of C reaches t within L layers": R_1 = the queries seeing C, R_{L+1} = R_L | propagate(R_L),
    until nothing changes; a token first reached at step L from C has eccentricity >= L. A pair
    (s, s) has distance 0. Memory O(n_pad · S / 64) words; time O(classes / 64 · steps · step_cost)
    word operations. Raises OverBudget when that (projected after the first batch) passes `max_work`.
    """
    w = g.weights
    n_cls = int(classes.max()) + 1 if len(classes) else 0
    batch = max(64, SOURCE_BITS // max(1, g.n_pad) // 64 * 64)
    cost = g.step_cost()
    if -(-n_cls // 64) * 2 * cost > max_work:
        raise OverBudget
    ecc = torch.zeros(g.n_pad, dtype=torch.long)
    never = torch.zeros(g.n_pad, dtype=torch.bool)
    max_finite, reach, within, work = 0, int(w.sum()), 0 if depth is not None else None, 0
    for start in range(0, n_cls, batch):
        s = min(batch, n_cls - start)
        n_words = -(-s // 64)
        rows = ((classes >= start) & (classes < start + s)).nonzero().flatten()
        cols = classes[rows] - start
        x = pack_bits(rows, cols, g.n_pad, n_words)  # [n_pad, W]: members of each class
        size = torch.zeros(s, dtype=torch.float64).index_add_(0, cols, w[rows].double())  # [S] tokens per class
        single_cols = (size == 1).nonzero().flatten()
        single = pack_bits(torch.zeros_like(single_cols), single_cols, 1, n_words)  # [1, W]: one-token classes
        columns = pack_bits(torch.zeros(s, dtype=torch.long), torch.arange(s), 1, n_words)  # [1, W]: used bits
        nonself = (columns & ~(x & single)).masked_fill_((w == 0)[:, None], 0)  # [n_pad, W]: pairs but (s, s)
        r = propagate(g, x)  # R_1
        level, new = 1, r
        while True:
            work += n_words * cost
            if work > max_work:
                raise OverBudget
            hit = ((new & nonself) != 0).any(1)
            if bool(hit.any()):
                ecc = torch.where(hit, ecc.clamp(min=level), ecc)
                max_finite = max(max_finite, level)
            if depth is not None and level == depth:
                within += _pairs(r, x, w, size)
            new = propagate(g, r) & ~r
            if not bool((new != 0).any()):
                break
            r, level = r | new, level + 1
        if start == 0 and work * -(-n_cls // batch) > max_work:
            raise OverBudget  # projected from the first batch
        never |= ((nonself & ~r) != 0).any(1)
        reach += _pairs(r, x, w, size)
        if depth is not None and depth > level:
            within += _pairs(r, x, w, size)
    if depth is not None:
        within += int(w.sum())  # self pairs: distance 0
    return Hops(torch.where(never, -1, ecc), max_finite, reach, within, work)


def _pairs(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor, size: torch.Tensor) -> int:
    """Ordered non-self token pairs covered by the bits r [n_pad, W]: the sum over (t, C) with t
    reached from C of w_t·(|C| - [t in C])."""
    s = len(size)
    per_class = weighted_column_counts(r, w)[:s]  # [S]: tokens reached from each class
    in_own = (popcount(r & x).sum(1) * w).sum()  # reached tokens inside their own class
    return int(round(float(per_class @ size))) - int(in_own)


# ---------------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------------
def graph_stats(
    pattern_or_module,
    n: int,
    tile: int | None = None,
    heads: int | Sequence[int] | None = None,
    depth: int | None = None,
    *,
    global_tokens: int = 0,
    max_work: float = DEFAULT_MAX_WORK,
) -> GraphStats:
    """Graph statistics of a Pattern or a mechanism module at length n, from its block layout.

    tile: the layout's tile (default: the module's, or the one the pattern names, or 64).
    heads: where heads differ, which heads get their own `HeadStats` (None: all; an int: that head;
    a list: those); ignored when every head sees the same graph. depth: also report
    `reach_within_depth` and `connected_within(depth)`. global_tokens: add global tokens at 0..g-1.
    max_work: budget per graph for exact token-level hops (see `all_pairs_hops`); past it, hop
    figures are block-level bounds (`hops_level == "block"`). Never builds an n×n tensor.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if depth is not None and (not isinstance(depth, int) or depth < 0):
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    src = resolve_source(pattern_or_module, tile, global_tokens)
    layout = compile_layout(src.pattern, n, src.tile)
    hp = layout.kv_index.shape[0]
    differ = src.pattern.num_heads is not None
    chosen = selected_heads(heads, hp) if differ else []
    total = head_stats(layout, list(range(hp)), None, depth, max_work)
    per_head = [head_stats(layout, [h], h, depth, max_work) for h in chosen]
    if differ:
        known = {s.head: s.edges for s in per_head}
        edges_all = sum(known.get(h) or int(degrees(graph_tiles(layout, [h], keep_masks=False))[0].sum())
                        for h in range(hp))
    else:
        edges_all = total.edges * src.heads
    fields = {f.name: getattr(total, f.name) for f in dataclasses.fields(HeadStats)}
    return GraphStats(**fields, name=src.name, n=n, tile=src.tile, heads=src.heads,
                      heads_differ=differ, edges_all_heads=edges_all, per_head=per_head,
                      note=_level_note([total, *per_head]))


def head_stats(layout: BlockLayout, heads: list[int], label: int | None, depth: int | None,
               max_work: float) -> HeadStats:
    """HeadStats of the union over `heads` of the layout's graphs (label: the head, or None).

    Hops: the block graph first (cheap, and a lower bound on every token's eccentricity, which
    also bounds the token-level search's steps from below), then the exact token-level search if
    its projected work fits `max_work`, else the block-level bounds."""
    n = layout.n
    tiles = graph_tiles(layout, heads)
    out_deg, in_deg = degrees(tiles)
    edges = int(out_deg.sum())
    stats = HeadStats(head=label, edges=edges, density=edges / n**2, out_degree=Spread.of(out_deg),
                      in_degree=Spread.of(in_deg), hops=None, hops_level="none", depth=depth)
    lower = _try_hops(block_graph(tiles, full_only=False), None, depth, max_work)
    if tiles.masks is not None and lower is not None:
        g = token_graph(tiles)
        classes = source_classes(g)
        ecc = lower.eccentricity
        min_steps = 1 + (int(ecc[ecc >= 0].min()) if bool((ecc >= 0).any()) else 0)
        if -(-(int(classes.max()) + 1) // 64) * min_steps * g.step_cost() <= max_work:
            exact = _try_hops(g, classes, depth, max_work)
            if exact is not None:
                return _with_hops(stats, exact, n, 1, "token")
    if lower is None:
        return stats
    stats = _with_hops(stats, lower, n, tiles.b, "block")
    upper = _try_hops(block_graph(tiles, full_only=True), None, None, max_work)
    if upper is not None and not bool((upper.eccentricity < 0).any()):
        stats.hops_upper = int(upper.eccentricity.max())
    return stats


def _try_hops(g: TileGraph, classes: torch.Tensor | None, depth: int | None, max_work: float) -> Hops | None:
    """all_pairs_hops (classes None: every node its own class), or None past the budget."""
    try:
        return all_pairs_hops(g, torch.arange(g.n_pad) if classes is None else classes, depth, max_work)
    except OverBudget:
        return None


def _with_hops(stats: HeadStats, h: Hops, n: int, per_node: int, level: str) -> HeadStats:
    ecc = h.eccentricity.repeat_interleave(per_node)[:n]  # [n]: a block's figure for each of its tokens
    finite = ecc[ecc >= 0]
    exact = level == "token"
    return dataclasses.replace(
        stats, hops_level=level, eccentricity=ecc,
        hops=int(ecc.max()) if len(finite) == n else None,
        hops_upper=(int(ecc.max()) if len(finite) == n else None) if exact else None,
        hops_reachable=h.max_finite if exact else None,
        radius=int(finite.min()) if len(finite) else None,
        reachable=h.reachable_pairs / n**2,
        reach_within_depth=None if h.within_depth_pairs is None else h.within_depth_pairs / n**2,
    )


def _level_note(stats: list[HeadStats]) -> str:
    levels = {s.hops_level for s in stats}
    if levels == {"token"}:
        return "hops exact (token level)"
    parts = []
    if "block" in levels:
        parts.append("some hop figures are block-level bounds (hops_level='block': hops, radius and eccentricity "
                     "are lower bounds, hops_upper an upper bound, reachable an upper bound); raise max_work or "
                     "lower n for exact figures")
    if "none" in levels:
        parts.append("some hop figures were not computed (over the work budget even at block level)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------
# command-line support: named patterns, building a target by name, the stats table
# ---------------------------------------------------------------------------------------------------
NAMED_PATTERNS: dict[str, tuple[Callable[..., Pattern], dict[str, Any], str]] = {
    "window": (lambda radius, causal: Window(radius, causal=causal), {"radius": 256, "causal": False},
               "sliding window, `radius` keys each side (causal: before)"),
    "window_global": (lambda radius, global_tokens: Window(radius) | Global(range(global_tokens)),
                      {"radius": 256, "global_tokens": 1}, "Longformer's graph: window + global tokens 0.."),
    "causal": (lambda: Causal(), {}, "full causal (decoder) attention"),
    "strided": (lambda stride, causal: strided(stride, causal=causal), {"stride": 128, "causal": True},
                "Sparse Transformer strided: the previous `stride` tokens + every stride-th"),
    "fixed": (lambda stride, c, causal: fixed(stride, c, causal=causal), {"stride": 128, "c": 32, "causal": True},
              "Sparse Transformer fixed: own chunk + the last c tokens of every chunk"),
    "segments": (lambda length: Segments(length), {"length": 256}, "block diagonal: disconnected segments"),
}


def build_target(name: str, options: dict[str, Any] | None = None, heads: int = 4):
    """A registered mechanism (built with dim = 16·heads) or a named pattern, by name."""

    options = dict(options or {})
    if name in list_attentions():
        if not has_pattern(ATTENTIONS.get(name)[1]):
            raise ConfigError(not_a_pattern_message(name), "name")
        for reserved in ("dim", "heads"):
            if reserved in options:
                raise ConfigError(f"set heads with heads=... (dim is 16·heads), not as an option {reserved}=...",
                                  "options")
        if not isinstance(heads, int) or heads <= 0:
            raise ConfigError(f"heads must be a positive int, got {heads!r}", "heads")
        try:
            return build_attention(name, dim=16 * heads, heads=heads, **options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: {e}", "options") from None
    if name in NAMED_PATTERNS:
        make, defaults, _ = NAMED_PATTERNS[name]
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ConfigError(f"pattern {name!r} has no option(s) {unknown}; it takes {sorted(defaults) or 'none'}",
                              "options")
        try:
            return make(**{**defaults, **options})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: {e}", "options") from None
    raise ConfigError(f"unknown pattern or mechanism {name!r}; mechanisms: {', '.join(list_attentions())}; "
                      f"named patterns: {', '.join(NAMED_PATTERNS)}", "name")


def stats_table(stats: GraphStats):
    """A rich Table of the layer's graph and, where heads differ, each head."""
    from rich.table import Table

    title = (f"{stats.name}: n={stats.n}, block {stats.tile}, heads {stats.heads}, "
             f"edges over all heads {stats.edges_all_heads:,}")
    t = Table(title=title, title_justify="left", caption=stats.note, caption_justify="left")
    cols = ["graph", "edges", "density", "keys/query min·mean·max", "queries/key min·mean·max", "hops", "radius",
            "reachable"]
    if stats.depth is not None:
        cols += [f"within {stats.depth}", "connected"]
    for col in cols:
        t.add_column(col, justify="left" if col == "graph" else "right", no_wrap=True)
    rows = [("all heads" if stats.heads_differ else "every head", stats)]
    rows += [(f"head {h.head}", h) for h in stats.per_head]
    for label, s in rows:
        cells = [label, f"{s.edges:,}", f"{s.density:.4f}", _spread(s.out_degree), _spread(s.in_degree),
                 _hops_cell(s), _opt(s.radius), _pct(s.reachable)]
        if stats.depth is not None:
            ok = s.connected_within(stats.depth)
            cells += [_pct(s.reach_within_depth), "?" if ok is None else "yes" if ok else "no"]
        t.add_row(*cells)
    return t


def _spread(s: Spread) -> str:
    return f"{s.min:g} · {s.mean:.1f} · {s.max:g}"


def _opt(v) -> str:
    return "-" if v is None else str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _hops_cell(s: HeadStats) -> str:
    if s.hops_level == "none":
        return "not computed"
    if s.hops_level == "block":
        return f"{_opt(s.hops)}..{'?' if s.hops_upper is None else s.hops_upper} (block)"
    if s.hops is None:
        return f"never (max {s.hops_reachable})"
    return str(s.hops)
