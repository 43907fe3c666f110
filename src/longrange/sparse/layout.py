"""Compile a pattern into a block layout: per query block, the key blocks it visits.

Built from the pattern's O(nb²) block candidates, refined exactly by evaluating the token-level
predicate only on the partial tiles (O(n·k·b) work), so the layout is exactly the max-pool of the
dense mask without ever building the n×n matrix.

Rows that visit far more key blocks than the typical row (global query blocks) become *dense
rows*: the engine computes them against all keys in a side path of cost O(g·b·n), so they do not
inflate k for every other row. No row is special-cased by position.
"""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.config import check_positive_int
from longrange.patterns.base import MaskMod, Pattern

#: a row is dense when it visits more than this many times the median row's key blocks
DENSE_ROW_FACTOR = 2.0
#: tiles refined per step (bounds the compiler's memory to ~this * b² bytes)
_TILES_PER_STEP = 1 << 14


@dataclasses.dataclass
class BlockLayout:
    """Block structure of a pattern at length n cut into tiles of b = `tile` tokens (Hp = 1 or heads).

    The tile is the kernel's unit of work, not part of the pattern's graph: BigBird's 64-token
    blocks may run on 128-token tiles, and the layout is exact for any tile.

    kv_index [Hp, nb, k]  key block visited in each slot (sorted; unused slots hold the row's block)
    valid    [Hp, nb, k]  slot is used
    partial  [Hp, nb, k]  slot needs a token-level mask (window edges, causal diagonal, sparse tiles)
    dense_rows [g]        query blocks computed densely against every key (global rows)
    dense_full [g]        that dense row sees every real key (no token mask needed)
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

    @property
    def num_blocks(self) -> int:
        return self.kv_index.shape[1]

    @property
    def blocks_per_row(self) -> int:
        return self.kv_index.shape[2]

    def to(self, device) -> BlockLayout:
        moved = {f: getattr(self, f).to(device) for f in ("kv_index", "valid", "partial", "dense_rows", "dense_full")}
        if self.pattern is not None:  # the predicate's lookup tables must live on the same device
            moved["mask_mod"] = self.pattern.mask_mod(self.n, torch.device(device))
        return dataclasses.replace(self, **moved)

    def block_matrix(self) -> torch.Tensor:
        """[Hp, nb, nb] int8: 0 = skipped, 1 = partial (token mask), 2 = full; dense rows count as
        visiting every block, partially. Linear in the number of blocks squared, not in n²."""
        hp, nb, _ = self.kv_index.shape
        m = torch.zeros(hp, nb, nb + 1, dtype=torch.int8)
        code = torch.where(self.partial, 1, 2).to(torch.int8)
        idx = torch.where(self.valid, self.kv_index, nb)
        m.scatter_(2, idx, code)
        m = m[..., :nb]
        m[:, self.dense_rows] = 1
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
        dense = len(self.dense_rows) * heads * self.tile * self.num_blocks * self.tile
        return sparse + dense

    def density(self) -> float:
        """Fraction of the padded nb·b × nb·b grid computed, per head."""
        total = (self.num_blocks * self.tile) ** 2 * (self.num_heads or 1)
        return self.computed_pairs() / total

    def __str__(self) -> str:
        nb, k = self.num_blocks, self.blocks_per_row
        return (
            f"BlockLayout(n={self.n}, tile={self.tile}, blocks={nb}, key blocks per row={k}, "
            f"dense rows={self.dense_rows.tolist()}, partial slots={int(self.partial.sum())}, "
            f"density={self.density():.3f})"
        )


def compile_layout(pattern: Pattern, n: int, tile: int) -> BlockLayout:
    """Pattern -> BlockLayout for a length-n sequence cut into `tile`-token blocks (the last one padded)."""
    check_positive_int("n", n)
    check_positive_int("tile", tile)
    b = tile
    any_, full = pattern.block_candidates(n, b)  # [Hp, nb, nb] each
    any_, full = any_.clone(), full.clone() & any_
    fn = pattern.mask_mod(n)
    _refine_partial_tiles(any_, full, fn, n, b)
    counts = any_.sum(-1)  # [Hp, nb]
    row_count = counts.max(0).values  # [nb]
    median = max(float(row_count.float().median()), 1.0)
    dense = row_count > DENSE_ROW_FACTOR * median
    k = int(row_count[~dense].max()) if bool((~dense).any()) else 1
    k = max(k, 1)
    dense_full = full[:, dense].all(-1).all(0)  # [g]
    any_[:, dense] = False  # dense rows are computed by the side path
    order = torch.argsort((~any_).to(torch.int8), dim=-1, stable=True)[..., :k]  # visited blocks first
    valid = torch.gather(any_, 2, order)
    partial = torch.gather(~full, 2, order) & valid
    own = torch.arange(any_.shape[1])[None, :, None].expand_as(order)
    kv_index = torch.where(valid, order, own)
    return BlockLayout(
        n=n,
        tile=b,
        kv_index=kv_index,
        valid=valid,
        partial=partial,
        dense_rows=dense.nonzero().flatten(),
        dense_full=dense_full,
        mask_mod=fn,
        num_heads=pattern.num_heads,
        pattern=pattern,
    )


def _refine_partial_tiles(any_: torch.Tensor, full: torch.Tensor, fn: MaskMod, n: int, b: int) -> None:
    """Evaluate the predicate on tiles that are candidates but not known full; update in place."""
    tiles = (any_ & ~full).nonzero()  # [P, 3] = (head, query block, key block)
    offs = torch.arange(b)
    for start in range(0, len(tiles), _TILES_PER_STEP):
        h, qb, kb = tiles[start : start + _TILES_PER_STEP].unbind(1)
        q = (qb * b)[:, None, None] + offs[None, :, None]  # [P, b, 1]
        kv = (kb * b)[:, None, None] + offs[None, None, :]  # [P, 1, b]
        real = (q < n) & (kv < n)
        m = fn(h[:, None, None], q, kv) & real  # [P, b, b]
        any_[h, qb, kb] = m.flatten(1).any(1)
        full[h, qb, kb] = (m | ~real).flatten(1).all(1)
