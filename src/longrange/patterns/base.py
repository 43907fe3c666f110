"""The pattern abstraction: attention as a graph. A pattern answers "may query i see key j?".

Each pattern gives two views of the same graph:
- `mask_mod(n)` -> fn(h, q, kv) -> bool, the token-level predicate on broadcastable index tensors
  (the FlexAttention `mask_mod` idea, minus the batch axis), on positions 0 .. n - 1. Used by the
  dense reference, pictures, the sparse engine for the few block pairs that need a token-level
  mask, and FlexAttention's `mask_mod`. It must accept positions past n (tile padding) without
  indexing out of range; what it returns there does not matter.
- `tile_candidates(grid, n)` -> (any, full), each [Hp, nq, nk] bool (Hp = 1 or num_heads), for the
  query and key tiles of a `TileGrid` (runs of `tile` tokens, rectangular allowed: queries at an
  offset among the keys): tile pairs that may hold an edge, and pairs whose every real token pair
  is an edge. `any` may over-approximate (the layout compiler refines it exactly); `full` must
  never over-approximate. Cost O(nq·nk), never O(n²), for the built-in patterns, whatever the
  tile (the tile is the kernel's unit, not part of the graph). `block_candidates(n, b)` is the
  square case.

Patterns compose: `a | b` (union), `a & b` (intersection), `~a` (complement).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiles of a (possibly rectangular) layout as absolute token ranges.

    Query tile i holds the real query positions q_lo[i] .. q_hi[i] (inclusive), key tile j the
    real key positions kv_lo[j] .. kv_hi[j]; tiles are consecutive runs of `tile` tokens, the last
    one possibly shorter, so every range is non-empty and the ranges are increasing.
    """

    tile: int
    q_lo: torch.Tensor  # [nq] long
    q_hi: torch.Tensor
    kv_lo: torch.Tensor  # [nk] long
    kv_hi: torch.Tensor

    @classmethod
    def rect(cls, n_q: int, n_kv: int, tile: int, q_offset: int = 0) -> TileGrid:
        """Queries at positions q_offset .. q_offset + n_q - 1, keys at 0 .. n_kv - 1."""
        q_lo, q_hi = block_token_ranges(n_q, tile)
        kv_lo, kv_hi = block_token_ranges(n_kv, tile)
        return cls(tile, q_lo + q_offset, q_hi + q_offset, kv_lo, kv_hi)

    @classmethod
    def square(cls, n: int, tile: int) -> TileGrid:
        return cls.rect(n, n, tile)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.q_lo), len(self.kv_lo)

    def is_square(self, n: int) -> bool:
        """True when queries and keys are the same n positions from 0 (the plain self-attention grid)."""
        return (len(self.q_lo) == len(self.kv_lo) and bool((self.q_lo == self.kv_lo).all())
                and bool((self.q_hi == self.kv_hi).all()) and int(self.q_lo[0]) == 0 and int(self.q_hi[-1]) == n - 1)


class Pattern:
    """Base class. Subclasses implement `mask_mod` and, for speed, `tile_candidates`."""

    #: None when every head sees the same graph, else the number of heads the pattern is defined for.
    num_heads: int | None = None

    # -- the two views -------------------------------------------------------------------------
    def mask_mod(self, n: int, device=None) -> MaskMod:
        raise NotImplementedError

    def tile_candidates(self, grid: TileGrid, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(any, full) [Hp, nq, nk] on `grid` for the predicate `mask_mod(n)`. This fallback is
        exact but evaluates every token pair (O(nq·nk·tile²)): for patterns that define only
        `mask_mod` (or, for square grids, only the older `block_candidates`)."""
        if type(self).block_candidates is not Pattern.block_candidates and grid.is_square(n):
            return self.block_candidates(n, grid.tile)
        return exhaustive_tile_candidates(self, grid, n)

    def block_candidates(self, n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(any, full) [Hp, nb, nb] for length n on b-token tiles: the square `tile_candidates`."""
        return self.tile_candidates(TileGrid.square(n, b), n)

    # -- derived views ---------------------------------------------------------------------------
    def to_dense(self, n: int) -> torch.Tensor:
        """[n, n] bool (or [H, n, n] when heads differ). O(n²): for tests and pictures only."""
        fn = self.mask_mod(n)
        idx = torch.arange(n)
        heads = torch.arange(self.num_heads or 1)[:, None, None]
        dense = fn(heads, idx[None, :, None], idx[None, None, :]).expand(self.num_heads or 1, n, n)
        return dense[0].clone() if self.num_heads is None else dense.clone()

    # -- algebra ---------------------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other)

    def __invert__(self) -> Pattern:
        return Complement(self)


def combined_heads(*patterns: Pattern) -> int | None:
    heads = {p.num_heads for p in patterns if p.num_heads is not None}
    if len(heads) > 1:
        raise ValueError(f"cannot combine patterns defined for different head counts: {sorted(heads)}")
    return heads.pop() if heads else None


class Union(Pattern):
    def __init__(self, *parts: Pattern):
        self.parts = parts
        self.num_heads = combined_heads(*parts)

    def mask_mod(self, n, device=None):
        fns = [p.mask_mod(n, device) for p in self.parts]

        def union(h, q, kv):
            out = fns[0](h, q, kv)
            for fn in fns[1:]:
                out = out | fn(h, q, kv)
            return out

        return union

    def tile_candidates(self, grid, n):
        cands = [p.tile_candidates(grid, n) for p in self.parts]
        any_, full = cands[0]
        for a, f in cands[1:]:
            any_, full = any_ | a, full | f  # `full` may under-approximate; the compiler refines it
        return any_, full

    def __repr__(self):
        return " | ".join(map(repr, self.parts))


class Intersection(Pattern):
    def __init__(self, *parts: Pattern):
        self.parts = parts
        self.num_heads = combined_heads(*parts)

    def mask_mod(self, n, device=None):
        fns = [p.mask_mod(n, device) for p in self.parts]

        def intersection(h, q, kv):
            out = fns[0](h, q, kv)
            for fn in fns[1:]:
                out = out & fn(h, q, kv)
            return out

        return intersection

    def tile_candidates(self, grid, n):
        cands = [p.tile_candidates(grid, n) for p in self.parts]
        any_, full = cands[0]
        for a, f in cands[1:]:
            any_, full = any_ & a, full & f  # `any` over-approximates; the compiler refines it
        return any_, full

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.parts)) + ")"


class Complement(Pattern):
    def __init__(self, inner: Pattern):
        self.inner = inner
        self.num_heads = inner.num_heads

    def mask_mod(self, n, device=None):
        fn = self.inner.mask_mod(n, device)
        return lambda h, q, kv: ~fn(h, q, kv)

    def tile_candidates(self, grid, n):
        any_, full = self.inner.tile_candidates(grid, n)
        return ~full, ~any_

    def __repr__(self):
        return f"~{self.inner!r}"


def exhaustive_tile_candidates(pattern: Pattern, grid: TileGrid, n: int, rows_per_step: int = 16):
    """Exact (any, full) on `grid` by evaluating every token pair, a few query tiles at a time.

    O(nq·nk·tile²) time and O(rows_per_step · tile · nk · tile) memory: only for patterns without
    an analytic rule (and as the tests' definition of the analytic ones)."""
    fn = pattern.mask_mod(n)
    b = grid.tile
    nq, nk = grid.shape
    hp = pattern.num_heads or 1
    heads = torch.arange(hp)[:, None, None]
    offs = torch.arange(b)
    kv = (grid.kv_lo[:, None] + offs).flatten()  # [nk·b]
    kv_real = kv <= grid.kv_hi.repeat_interleave(b)
    any_rows, full_rows = [], []
    for start in range(0, nq, rows_per_step):
        stop = min(start + rows_per_step, nq)
        q = (grid.q_lo[start:stop, None] + offs).flatten()  # [t·b]
        q_real = q <= grid.q_hi[start:stop].repeat_interleave(b)
        m = fn(heads, q[None, :, None], kv[None, None, :]).expand(hp, len(q), nk * b)
        real = q_real[:, None] & kv_real[None, :]
        m = m & real
        tiles = m.reshape(hp, -1, b, nk, b)
        real_tiles = real.reshape(-1, b, nk, b)
        any_rows.append(tiles.any(dim=(2, 4)))
        full_rows.append((tiles | ~real_tiles).all(dim=(2, 4)))
    return torch.cat(any_rows, 1), torch.cat(full_rows, 1)


def exhaustive_block_candidates(pattern: Pattern, n: int, b: int, rows_per_step: int = 16):
    """`exhaustive_tile_candidates` on the square grid of length n and b-token tiles."""
    return exhaustive_tile_candidates(pattern, TileGrid.square(n, b), n, rows_per_step)


def range_counts(flags: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """How many of flags[lo[i] .. hi[i]] (inclusive) are True, for every i: O(len(flags) + len(lo))."""
    size = max(len(flags), int(hi.max()) + 1 if len(hi) else 0)  # positions past the flags count as False
    cs = torch.zeros(size + 1, dtype=torch.long)
    cs[1 : len(flags) + 1] = torch.cumsum(flags.long(), 0)
    cs[len(flags) + 1 :] = cs[len(flags)]
    return cs[hi + 1] - cs[lo]


def block_token_ranges(n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last real token of each block: two [nb] long tensors."""
    nb = -(-n // b)
    lo = torch.arange(nb) * b
    hi = torch.clamp(lo + b - 1, max=n - 1)
    return lo, hi
