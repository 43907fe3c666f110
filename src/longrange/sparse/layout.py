"""Compile a pattern into a block layout: per query block, the key blocks it visits.

Built from the pattern's O(nb²) tile candidates, refined exactly by evaluating the token-level
predicate only on the partial tiles (O(n·k·b) work), so the layout is exactly the max-pool of the
dense mask without ever building the n×n matrix.

Rows that visit far more key blocks than the typical row (global query blocks) become *dense
rows*: the engine computes them against all keys in a side path of cost O(g·b·n), so they do not
inflate k for every other row (their exact tiles are kept too, for kernels such as FlexAttention
where a global row is just a row with more key blocks). No row is special-cased by position.

Layouts may be rectangular: n queries at positions q_offset .. q_offset + n - 1 among n_kv keys at
0 .. n_kv - 1 (memory segments, cached decoding); the pattern's predicate sees absolute positions.
"""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.config import check_positive_int
from longrange.patterns.base import MaskMod, Pattern, TileGrid

#: a row is dense when it visits more than this many times the median row's key blocks
DENSE_ROW_FACTOR = 2.0
#: tiles refined per step (bounds the compiler's memory to ~this * b² bytes)
_TILES_PER_STEP = 1 << 14
#: tile pairs (query tile, key tile) per head a compile step looks at: bounds the compiler's memory
#: (~this * 10 bytes) for long rectangular layouts (a shard's queries among a million keys)
_CELLS_PER_STEP = 1 << 24


@dataclasses.dataclass
class BlockLayout:
    """Block structure of a pattern for n queries and n_kv keys cut into tiles of b = `tile`
    tokens (Hp = 1 or heads; nb = ceil(n / b) query blocks, nbk = ceil(n_kv / b) key blocks).

    The tile is the kernel's unit of work, not part of the pattern's graph: BigBird's 64-token
    blocks may run on 128-token tiles, and the layout is exact for any tile.

    kv_index [Hp, nb, k]  key block visited in each slot (sorted; unused slots hold the row's block)
    valid    [Hp, nb, k]  slot is used
    partial  [Hp, nb, k]  slot needs a token-level mask (window edges, causal diagonal, sparse tiles)
    dense_rows [g]        query blocks computed densely against every key (global rows)
    dense_full [g]        that dense row sees every real key (no token mask needed)
    dense_any  [Hp, g, nbk] the key blocks a dense row really visits (None: all of them, partially)
    dense_all  [Hp, g, nbk] ... and those it sees completely
    mask_mod(h, q, kv)    the predicate with q counted from the first query (q_offset added inside)
    """

    n: int
    tile: int
    kv_index: torch.Tensor
    valid: torch.Tensor
    partial: torch.Tensor
    dense_rows: torch.Tensor
    dense_full: torch.Tensor
    mask_mod: MaskMod
    num_heads: int | None
    pattern: Pattern | None = None
    n_kv: int | None = None  # None: n (self-attention)
    q_offset: int = 0
    dense_any: torch.Tensor | None = None
    dense_all: torch.Tensor | None = None
    #: lowered forms of this layout (FlexAttention block structures), filled by `sparse.flex`
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.n_kv is None:
            self.n_kv = self.n

    @property
    def num_blocks(self) -> int:
        return self.kv_index.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.n_kv // self.tile)

    @property
    def blocks_per_row(self) -> int:
        return self.kv_index.shape[2]

    @property
    def is_square(self) -> bool:
        """Queries and keys are the same n positions (self-attention), as the engine expects."""
        return self.n_kv == self.n and self.q_offset == 0

    @property
    def length(self) -> int:
        """The n the pattern's predicate is defined for: every query and key position is below it."""
        return max(self.n_kv, self.q_offset + self.n)

    def to(self, device) -> BlockLayout:
        fields = ("kv_index", "valid", "partial", "dense_rows", "dense_full", "dense_any", "dense_all")
        moved = {f: getattr(self, f).to(device) for f in fields if getattr(self, f) is not None}
        if all(moved[f] is getattr(self, f) for f in moved):
            return self  # already there: keep the lowered forms cached with this layout
        if self.pattern is not None:  # the predicate's lookup tables must live on the same device
            moved["mask_mod"] = local_predicate(self.pattern, self.length, self.q_offset, torch.device(device))
        return dataclasses.replace(self, **moved, cache={})

    def tile_codes(self) -> torch.Tensor:
        """[Hp, nb, nbk] int8: 0 = skipped, 1 = partial (token mask), 2 = full, every row exact
        (dense rows with the tiles they really visit). O(nb·nbk), never O(n²)."""
        hp, nb, _ = self.kv_index.shape
        nbk = self.num_kv_blocks
        m = torch.zeros(hp, nb, nbk + 1, dtype=torch.int8, device=self.kv_index.device)
        code = torch.where(self.partial, 1, 2).to(torch.int8)
        m.scatter_(2, torch.where(self.valid, self.kv_index, nbk), code)
        m = m[..., :nbk]
        if len(self.dense_rows):
            if self.dense_any is None:
                m[:, self.dense_rows] = 1
            else:
                m[:, self.dense_rows] = torch.where(self.dense_all, 2, self.dense_any.to(torch.int8)).to(torch.int8)
        return m

    def block_matrix(self) -> torch.Tensor:
        """[Hp, nb, nbk] int8 as the engine computes it: 0 = skipped, 1 = partial (token mask),
        2 = full; dense rows count as visiting every block, partially (see `tile_codes` for their
        exact tiles). Linear in the number of blocks squared, not in n²."""
        hp, nb, _ = self.kv_index.shape
        nbk = self.num_kv_blocks
        m = torch.zeros(hp, nb, nbk + 1, dtype=torch.int8)
        code = torch.where(self.partial, 1, 2).to(torch.int8)
        idx = torch.where(self.valid, self.kv_index, nbk)
        m.scatter_(2, idx.cpu(), code.cpu())
        m = m[..., :nbk]
        m[:, self.dense_rows.cpu()] = 1
        return m

    def computed_pairs(self, heads: int | None = None) -> int:
        """Token pairs (query, key) the engine computes, summed over `heads` heads (default: the
        pattern's head count, or 1 for a pattern shared by every head): every gathered slot of every
        query block (unused slots are gathered and masked, not skipped) plus the dense rows against
        all keys. Equal to what torch's FlopCounterMode sees (tests/test_flops.py)."""
        hp = self.kv_index.shape[0]
        if heads is None:
            heads = self.num_heads or 1
        elif self.num_heads is not None and heads != self.num_heads:
            raise ValueError(f"pattern is defined for {self.num_heads} heads, not heads={heads}")
        slots = self.kv_index.numel() * (heads // hp)
        sparse = slots * self.tile**2
        dense = len(self.dense_rows) * heads * self.tile * self.num_kv_blocks * self.tile
        return sparse + dense

    def density(self) -> float:
        """Fraction of the padded nb·b × nbk·b grid computed, per head."""
        total = self.num_blocks * self.num_kv_blocks * self.tile**2 * (self.num_heads or 1)
        return self.computed_pairs() / total

    def to_block_mask(self, key_padding_mask: torch.Tensor | None = None, **kwargs):
        """This layout as a FlexAttention `BlockMask`, no n×n tensor on the way; see
        `longrange.sparse.flex.block_mask` for the arguments. Cached with the layout."""
        from longrange.sparse.flex import block_mask

        return block_mask(self, key_padding_mask, **kwargs)

    def __str__(self) -> str:
        nb, k = self.num_blocks, self.blocks_per_row
        rect = "" if self.is_square else f", n_kv={self.n_kv}, q_offset={self.q_offset}"
        return (
            f"BlockLayout(n={self.n}{rect}, tile={self.tile}, blocks={nb}, key blocks per row={k}, "
            f"dense rows={self.dense_rows.tolist()}, partial slots={int(self.partial.sum())}, "
            f"density={self.density():.3f})"
        )


def compile_layout(pattern: Pattern, n: int, tile: int, n_kv: int | None = None, q_offset: int = 0) -> BlockLayout:
    """Pattern -> BlockLayout for n queries cut into `tile`-token blocks (the last one padded).

    Self-attention by default. Rectangular: n_kv keys at positions 0 .. n_kv - 1 and the n queries
    at q_offset .. q_offset + n - 1 among them (Transformer-XL memory: n_kv = memory + n,
    q_offset = memory; cached decoding: n = 1, q_offset = n_kv - 1). The pattern's predicate is
    `pattern.mask_mod(max(n_kv, q_offset + n))` on these absolute positions."""
    check_positive_int("n", n)
    check_positive_int("tile", tile)
    n_kv = n if n_kv is None else n_kv
    check_positive_int("n_kv", n_kv)
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative int (position of the first query), got {q_offset!r}")
    b = tile
    length = max(n_kv, q_offset + n)
    grid = TileGrid.rect(n, n_kv, b, q_offset)
    rows = _visited_by_row(pattern, grid, length)
    counts = torch.cat([c for c, _, _ in rows], dim=1)  # [Hp, nb]
    row_count = counts.max(0).values  # [nb]
    median = max(float(row_count.float().median()), 1.0)
    dense = row_count > DENSE_ROW_FACTOR * median
    k = int(row_count[~dense].max()) if bool((~dense).any()) else 1
    k = max(k, 1)
    nbk = len(grid.kv_lo)
    order = torch.cat([_slots(o, k, nbk) for _, o, _ in rows], dim=1)  # [Hp, nb, k] visited blocks first
    full = torch.cat([_slots(f, k, False) for _, _, f in rows], dim=1)
    valid = torch.arange(k)[None, None, :] < counts[..., None]
    dense_any, dense_all = _dense_tiles(rows, dense, nbk)  # [Hp, g, nbk]
    dense_full = dense_all.all(-1).all(0) if dense.any() else torch.zeros(0, dtype=torch.bool)  # [g]
    valid[:, dense] = False  # dense rows are computed by the side path
    partial = ~full & valid
    own = torch.arange(order.shape[1])[None, :, None].expand_as(order).clamp(max=nbk - 1)
    kv_index = torch.where(valid, order, own)
    return BlockLayout(
        n=n,
        tile=b,
        kv_index=kv_index,
        valid=valid,
        partial=partial,
        dense_rows=dense.nonzero().flatten(),
        dense_full=dense_full,
        mask_mod=local_predicate(pattern, length, q_offset),
        num_heads=pattern.num_heads,
        pattern=pattern,
        n_kv=n_kv,
        q_offset=q_offset,
        dense_any=dense_any,
        dense_all=dense_all,
    )


def _visited_by_row(pattern: Pattern, grid: TileGrid, length: int):
    """For chunks of query tiles (at most `_CELLS_PER_STEP` tile pairs each, so a long rectangular
    layout never holds its whole [Hp, nb, nbk] candidate grid): (counts [Hp, nc], order [Hp, nc, kc]
    the visited key tiles first in ascending order, full [Hp, nc, kc] which of them are full), kc the
    chunk's largest count."""
    nq, nk = grid.shape
    hp = pattern.num_heads or 1
    step = max(1, _CELLS_PER_STEP // max(nk * hp, 1))
    fn = pattern.mask_mod(length)
    out = []
    for c0 in range(0, nq, step):
        sub = dataclasses.replace(grid, q_lo=grid.q_lo[c0 : c0 + step], q_hi=grid.q_hi[c0 : c0 + step])
        any_, full = pattern.tile_candidates(sub, length)  # [Hp, nc, nbk] each
        any_, full = any_.clone(), full.clone() & any_
        _refine_partial_tiles(any_, full, fn, sub)
        counts = any_.sum(-1)  # [Hp, nc]
        kc = max(int(counts.max()), 1)
        order = torch.argsort((~any_).to(torch.int8), dim=-1, stable=True)[..., :kc].clone()  # not a view of all nbk
        out.append((counts, order, torch.gather(full, 2, order)))
    return out


def _slots(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    """[Hp, nc, kc] -> [Hp, nc, k]: cut, or padded with `fill`."""
    if t.shape[2] >= k:
        return t[..., :k]
    pad = torch.full((*t.shape[:2], k - t.shape[2]), fill, dtype=t.dtype)
    return torch.cat([t, pad], dim=2)


def _dense_tiles(rows, dense: torch.Tensor, nbk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense rows' visited and full key tiles, [Hp, g, nbk] each (a dense row's count is its
    chunk's largest or below it, so its whole list was kept)."""
    hp = rows[0][0].shape[0]
    any_ = torch.zeros(hp, int(dense.sum()), nbk, dtype=torch.bool)
    all_ = torch.zeros_like(any_)
    at, c0 = 0, 0
    for counts, order, full in rows:
        nc = counts.shape[1]
        mine = dense[c0 : c0 + nc].nonzero().flatten()
        for r in mine.tolist():
            used = torch.arange(order.shape[2])[None, :] < counts[:, r, None]  # [Hp, kc]
            any_[:, at].scatter_(1, order[:, r], used)
            all_[:, at].scatter_(1, order[:, r], used & full[:, r])
            at += 1
        c0 += nc
    return any_, all_


def local_predicate(pattern: Pattern, length: int, q_offset: int, device=None) -> MaskMod:
    """The pattern's predicate at `length` with query positions counted from the first query."""
    fn = pattern.mask_mod(length, device)
    if q_offset == 0:
        return fn
    return lambda h, q, kv: fn(h, q + q_offset, kv)


def _refine_partial_tiles(any_: torch.Tensor, full: torch.Tensor, fn: MaskMod, grid: TileGrid) -> None:
    """Evaluate the predicate (absolute positions) on tiles that are candidates but not known full;
    update in place."""
    b = grid.tile
    tiles = (any_ & ~full).nonzero()  # [P, 3] = (head, query block, key block)
    offs = torch.arange(b)
    for start in range(0, len(tiles), _TILES_PER_STEP):
        h, qb, kb = tiles[start : start + _TILES_PER_STEP].unbind(1)
        q = grid.q_lo[qb][:, None, None] + offs[None, :, None]  # [P, b, 1]
        kv = grid.kv_lo[kb][:, None, None] + offs[None, None, :]  # [P, 1, b]
        real = (q <= grid.q_hi[qb][:, None, None]) & (kv <= grid.kv_hi[kb][:, None, None])
        m = fn(h[:, None, None], q, kv) & real  # [P, b, b]
        any_[h, qb, kb] = m.flatten(1).any(1)
        full[h, qb, kb] = (m | ~real).flatten(1).all(1)
