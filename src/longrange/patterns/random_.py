"""BigBird's random blocks: each query block sees r key blocks drawn per head, seeded."""

from __future__ import annotations

import torch

from longrange.core.config import check_nonnegative_int, check_positive_int
from longrange.patterns.base import Pattern, TileGrid


class RandomBlocks(Pattern):
    """Per head h and query block I, `num_blocks` key blocks drawn without replacement from the
    blocks outside I's window (|I - J| > window) and outside the first `global_first` and last
    `global_last` blocks, as in BigBird ITC. Global query blocks draw none (they see everything).

    The draw is a function of (seed, n, block_size, heads) only: reproducible, never from the
    global RNG. `redraw(seed)` picks new blocks explicitly. If fewer blocks are available than
    asked (short inputs), all available ones are taken.

    span (tokens, a multiple of block_size; None: the whole sequence, the paper's draw): draw only
    among the key blocks in the query block's own span of `span` tokens (spans cut at 0, span,
    2·span, ...). With the shard length of a sequence sharded over ranks, every random block is on
    the query's own rank (a shard-aware draw: a different graph, chosen by name, never by default).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_heads: int = 1,
        seed: int = 0,
        window: int = 1,
        global_first: int = 1,
        global_last: int = 1,
        span: int | None = None,
    ):
        check_nonnegative_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        check_positive_int("num_heads", num_heads)
        check_nonnegative_int("window", window)
        self.num_random, self.block_size, self.seed = num_blocks, block_size, seed
        self.window, self.global_first, self.global_last = window, global_first, global_last
        self.num_heads = num_heads
        if span is not None:
            check_positive_int("span", span)
            if span % block_size:
                raise ValueError(f"span must be a multiple of block_size={block_size} (whole blocks), got {span}")
        self.span = span
        self._tables: dict[int, torch.Tensor] = {}

    def redraw(self, seed: int) -> None:
        self.seed = seed
        self._tables.clear()

    def table(self, n: int) -> torch.Tensor:
        """[H, nb, r] long: the random key blocks of each query block (-1 = none)."""
        if n not in self._tables:
            self._tables[n] = self._draw(n)
        return self._tables[n]

    def _draw(self, n: int) -> torch.Tensor:
        nb = -(-n // self.block_size)
        gen = torch.Generator().manual_seed(self.seed)
        blocks = torch.arange(nb)
        is_global = (blocks < self.global_first) | (blocks >= nb - self.global_last)
        # the most keys any query block may draw from: a non-global row far from both ends
        span = None if self.span is None else self.span // self.block_size  # in blocks
        r = min(self.num_random, _most_allowed(nb, self.window, is_global, span))
        if r == 0:
            return torch.full((self.num_heads, nb, 0), -1, dtype=torch.long)
        # the draw of torch.rand(H, nb, nb), taken a few rows at a time: the same numbers in the same
        # order (the CPU generator is sequential), so memory stays O(rows · nb) at any length
        out = torch.empty(self.num_heads, nb, r, dtype=torch.long)
        step = max(1, _DRAW_CELLS // max(nb, 1))
        for h in range(self.num_heads):
            for r0 in range(0, nb, step):
                rows = slice(r0, min(r0 + step, nb))
                allowed = _allowed(blocks[rows], blocks, self.window, is_global, span)  # [rows, nb]
                keys = torch.rand(rows.stop - r0, nb, generator=gen).masked_fill_(~allowed, -1.0)
                score, pick = keys.topk(r, dim=-1)
                out[h, rows] = torch.where(score >= 0, pick, torch.full_like(pick, -1))
        return out

    def mask_mod(self, n, device=None):
        table = self.table(n).to(device)
        bs = self.block_size

        last = table.shape[1] - 1
        r = table.shape[2]

        def random_blocks(h, q, kv):
            # tokens past n (block padding) are clamped to the last block; the engine masks them anyway.
            # One comparison per slot (no reduction over r), so FlexAttention can compile it pointwise.
            qb, kb = (q // bs).clamp(0, last), kv // bs
            hit = (q < n) & (kv < 0)  # all False, in the broadcast shape
            for slot in range(r):
                hit = hit | (table[h, qb, slot] == kb)
            return hit & (q < n)

        return random_blocks

    def tile_candidates(self, grid: TileGrid, n):
        """Exact for any tile, O(H·nb·r·s²) with s the most tiles one graph block touches (≤ 2
        when tiles are at least a block, ⌈bs/tile⌉ + 1 otherwise), plus the [H, nq, nk] result.

        Each drawn pair (query block a, key block c) counts once in every tile pair whose real
        tokens meet a and c. A tile pair is visited when its count is positive, and full when every
        (a, c) it meets is drawn: count == (graph blocks met by the query tile) × (by the key tile),
        since a row's draws are distinct."""
        table = self.table(n)  # [H, nbg, r] graph blocks of bs tokens
        bs = self.block_size
        nq, nk = grid.shape
        count = torch.zeros(self.num_heads, nq, nk, dtype=torch.long)
        h, a, slot = (table >= 0).nonzero(as_tuple=True)
        c = table[h, a, slot]
        tq0, tq1 = _tiles_met(grid.q_lo, grid.q_hi, a, bs)  # [P] first and last query tile meeting block a
        tk0, tk1 = _tiles_met(grid.kv_lo, grid.kv_hi, c, bs)
        sq, sk = tq1 - tq0 + 1, tk1 - tk0 + 1  # <= 0 when the block lies outside the grid's tokens
        for di in range(int(sq.max()) if len(sq) else 0):
            for dj in range(int(sk.max())):
                ok = (di < sq) & (dj < sk)
                count.index_put_((h[ok], tq0[ok] + di, tk0[ok] + dj), torch.ones_like(h[ok]), accumulate=True)
        q_blocks = grid.q_hi // bs - grid.q_lo // bs + 1  # graph blocks met by each query tile
        kv_blocks = grid.kv_hi // bs - grid.kv_lo // bs + 1
        full = count == (q_blocks[:, None] * kv_blocks[None, :])[None]
        return count > 0, full

    def __repr__(self):
        return (
            f"RandomBlocks({self.num_random}, block_size={self.block_size}, heads={self.num_heads}, seed={self.seed}"
            + ("" if self.span is None else f", span={self.span}") + ")"
        )


#: random keys drawn per step (bounds the draw's memory to ~8 bytes times this)
_DRAW_CELLS = 1 << 22


def _allowed(rows: torch.Tensor, blocks: torch.Tensor, window: int, is_global: torch.Tensor,
             span: int | None = None) -> torch.Tensor:
    """[len(rows), nb] bool: key blocks a query block may draw (outside its window, neither global,
    and within its span of `span` blocks when given)."""
    near = (rows[:, None] - blocks[None, :]).abs() <= window
    ok = ~near & ~is_global[None, :] & ~is_global[rows][:, None]
    if span is not None:
        ok &= (rows // span)[:, None] == (blocks // span)[None, :]
    return ok


def _most_allowed(nb: int, window: int, is_global: torch.Tensor, span: int | None = None) -> int:
    """max over query blocks of the count of blocks it may draw, in O(nb) memory per row step."""
    if nb == 0:
        return 0
    blocks = torch.arange(nb)
    step = max(1, _DRAW_CELLS // nb)
    return max(int(_allowed(blocks[r0 : r0 + step], blocks, window, is_global, span).sum(1).max())
               for r0 in range(0, nb, step))


def _tiles_met(lo: torch.Tensor, hi: torch.Tensor, block: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last tile (ranges lo[i] .. hi[i], increasing) whose tokens meet graph block
    `block` (tokens block·bs .. block·bs + bs - 1): two tensors shaped like `block`."""
    first = torch.searchsorted(hi, block * bs, side="left")  # first tile ending at or after the block's start
    last = torch.searchsorted(lo, block * bs + bs - 1, side="right") - 1  # last tile starting before its end
    return first, last
