"""Sparse Transformer patterns (Child et al., 2019): strided and fixed, as the union of their
two factors A(1) ∪ A(2). Causal by default, as in the paper; causal=False mirrors them."""

from __future__ import annotations

import torch

from longrange.core.config import check_positive_int
from longrange.patterns.band import Band, Causal, Window
from longrange.patterns.base import Pattern, TileGrid, range_counts


class StridedColumns(Pattern):
    """(i - j) is a multiple of `stride` (A(2) of the strided pattern, without the causal cut)."""

    def __init__(self, stride: int):
        check_positive_int("stride", stride)
        self.stride = stride

    def mask_mod(self, n, device=None):
        s = self.stride
        return lambda h, q, kv: (q - kv) % s == 0

    def tile_candidates(self, grid: TileGrid, n):
        dmin = grid.q_lo[:, None] - grid.kv_hi[None, :]  # i - j takes every integer in [dmin, dmax]
        dmax = grid.q_hi[:, None] - grid.kv_lo[None, :]
        s = self.stride
        any_ = torch.div(dmax, s, rounding_mode="floor") * s >= dmin  # a multiple of s in [dmin, dmax]
        full = any_ & (s == 1)
        return any_[None], full[None]

    def __repr__(self):
        return f"StridedColumns({self.stride})"


class SummaryColumns(Pattern):
    """Keys j with j mod stride >= stride - c (A(2) of the fixed pattern: the last c of each chunk)."""

    def __init__(self, stride: int, c: int):
        check_positive_int("stride", stride)
        check_positive_int("c", c)
        if c > stride:
            raise ValueError(f"c={c} must be at most stride={stride}")
        self.stride, self.c = stride, c

    def mask_mod(self, n, device=None):
        s, c = self.stride, self.c
        return lambda h, q, kv: (kv % s >= s - c) & (q >= 0)

    def tile_candidates(self, grid: TileGrid, n):
        kv = torch.arange(int(grid.kv_hi[-1]) + 1)
        summary = kv % self.stride >= self.stride - self.c
        count = range_counts(summary, grid.kv_lo, grid.kv_hi)  # summary keys among each key tile's real keys
        any_col, all_col = count > 0, count == grid.kv_hi - grid.kv_lo + 1
        nq, nk = grid.shape
        return any_col.expand(nq, nk)[None].clone(), all_col.expand(nq, nk)[None].clone()

    def __repr__(self):
        return f"SummaryColumns({self.stride}, c={self.c})"


def strided(stride: int, causal: bool = True) -> Pattern:
    """A(1): the previous `stride` tokens (|i - j| < stride); A(2): every stride-th token."""
    local = Window(stride - 1, causal=causal)
    cols = StridedColumns(stride)
    return (local | (cols & Causal())) if causal else (local | cols)


def fixed(stride: int, c: int, causal: bool = True) -> Pattern:
    """A(1): the same stride-long chunk; A(2): the last c tokens of every chunk (summary columns)."""
    chunk = Band(0, 0, unit=stride)
    pattern = chunk | SummaryColumns(stride, c)
    return pattern & Causal() if causal else pattern
