"""Distance patterns: sliding windows (two-sided, causal, block-aligned), causal, segments, dilation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from longrange.core.config import check_nonnegative_int, check_positive_int
from longrange.patterns.base import Pattern, TileGrid

INF = math.inf


class Band(Pattern):
    """lo <= i // unit - j // unit <= hi. The primitive behind Window, Causal and block windows.

    With unit = 1 this is a token band (i - j between lo and hi); with unit = u it is the same rule on
    u-token chunks (BigBird's block window, Sparse Transformer's fixed chunks).
    """

    def __init__(self, lo: float, hi: float, unit: int = 1):
        if lo > hi:
            raise ValueError(f"Band needs lo <= hi, got lo={lo}, hi={hi}")
        check_positive_int("unit", unit)
        self.lo, self.hi, self.unit = lo, hi, unit

    def mask_mod(self, n, device=None):
        lo, hi, u = self.lo, self.hi, self.unit

        def band(h, q, kv):
            d = q // u - kv // u
            return (d >= lo) & (d <= hi)

        return band

    def tile_candidates(self, grid: TileGrid, n):
        u = self.unit
        dmin = (grid.q_lo // u)[:, None] - (grid.kv_hi // u)[None, :]  # [nq, nk] smallest i//u - j//u in tile
        dmax = (grid.q_hi // u)[:, None] - (grid.kv_lo // u)[None, :]
        any_ = (dmax >= self.lo) & (dmin <= self.hi)
        full = (dmin >= self.lo) & (dmax <= self.hi)
        # i//u and j//u each take every integer of an interval over a tile, so i//u - j//u takes
        # every integer in [dmin, dmax]: both are exact, whatever the tile and the unit
        return any_[None], full[None]

    def __repr__(self):
        unit = f", unit={self.unit}" if self.unit != 1 else ""
        return f"Band({self.lo}, {self.hi}{unit})"


class Window(Band):
    """Sliding window: query i sees keys j with |i - j| <= radius (2·radius + 1 keys).

    causal=True: i - radius <= j <= i (radius + 1 keys). Longformer's `attention_window` w is
    `Window(w // 2)`.
    """

    def __init__(self, radius: int, causal: bool = False):
        check_nonnegative_int("radius", radius)
        self.radius, self.causal = radius, causal
        super().__init__(0 if causal else -radius, radius)

    def __repr__(self):
        return f"Window({self.radius}{', causal=True' if self.causal else ''})"


class BlockWindow(Band):
    """Block-aligned window (BigBird): a token in block I sees every token of blocks I-r .. I+r."""

    def __init__(self, radius_blocks: int, block_size: int):
        check_nonnegative_int("radius_blocks", radius_blocks)
        check_positive_int("block_size", block_size)
        self.radius_blocks, self.block_size = radius_blocks, block_size
        super().__init__(-radius_blocks, radius_blocks, unit=block_size)

    def __repr__(self):
        return f"BlockWindow({self.radius_blocks}, block_size={self.block_size})"


class Causal(Band):
    """j <= i."""

    def __init__(self):
        super().__init__(0, INF)

    def __repr__(self):
        return "Causal()"


class Segments(Band):
    """Tokens see only tokens of their own `length`-token segment (block diagonal)."""

    def __init__(self, length: int):
        check_positive_int("length", length)
        self.length = length
        super().__init__(0, 0, unit=length)

    def __repr__(self):
        return f"Segments({self.length})"


class Full(Pattern):
    """Every pair."""

    def mask_mod(self, n, device=None):
        return lambda h, q, kv: torch.ones_like(q - kv, dtype=torch.bool)

    def tile_candidates(self, grid, n):
        ones = torch.ones(1, *grid.shape, dtype=torch.bool)
        return ones, ones.clone()

    def __repr__(self):
        return "Full()"


class Dilated(Pattern):
    """Dilated sliding window (Longformer §3.1): j = i + d·t for |t| <= radius (t <= 0 if causal).

    `dilation` is one int for every head or a sequence with one int per head, e.g. (1, 1, 2, 2):
    some heads undilated, others dilated.
    """

    def __init__(self, radius: int, dilation: int | Sequence[int] = 1, causal: bool = False):
        check_nonnegative_int("radius", radius)
        per_head = not isinstance(dilation, int)
        dils = tuple(dilation) if per_head else (dilation,)
        if not dils:
            raise ValueError("dilation must be an int or a non-empty sequence of ints (one per head)")
        for d in dils:
            check_positive_int("dilation", d)
        self.radius, self.causal = radius, causal
        self.dilations = dils
        self.num_heads = len(dils) if per_head else None

    def mask_mod(self, n, device=None):
        dil = torch.tensor(self.dilations, device=device)
        r, causal = self.radius, self.causal

        def dilated(h, q, kv):
            d = dil[h] if self.num_heads else dil[0]
            diff = q - kv
            lo = 0 if causal else -r * d
            return (diff % d == 0) & (diff >= lo) & (diff <= r * d)

        return dilated

    def tile_candidates(self, grid, n):
        rows = []
        for d in self.dilations:
            a, f = Band(0 if self.causal else -self.radius * d, self.radius * d).tile_candidates(grid, n)
            rows.append((a, f & (d == 1)))
        return torch.cat([a for a, _ in rows]), torch.cat([f for _, f in rows])

    def __repr__(self):
        dil = self.dilations if self.num_heads else self.dilations[0]
        return f"Dilated({self.radius}, dilation={dil}{', causal=True' if self.causal else ''})"
