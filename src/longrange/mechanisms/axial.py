"""`axial`: axial attention (Ho et al. 2019, "Axial Attention in Multidimensional Transformers").

The sequence is read as an n-D grid `shape` = (d₀, ..., d_{m-1}) in row-major order (the last axis
varies fastest: a 2-D (h, w) grid is h rows of w tokens). One attention pass runs along each axis,
from the last to the first, and each pass's values are the previous pass's output:

    y = Attn_rows(Q, K, V)            # each token over its row:    w keys
    out = Attn_cols(Q, K, y)          # each token over its column: h keys, whose values carry their rows

so in ONE layer every token reaches every token of the grid (through its column's row summaries), with
n·(h + w) pairs per head instead of n². The passes share the layer's Q/K/V projections: no parameter
beyond full attention's (LRA's equal-size rule), and on a 1 × n shape the column pass is the identity,
so the layer is exactly full attention over the row (tested).

Why passes and not split heads (half the heads along rows, half along columns): split heads reach
only the row ∪ column of a token per layer, and their 1 × n limit is not full attention; passes cost
twice the pairs of split heads, which at 16K and BERT-base is still ~15% of the layer's MACs.

`causal=True`: every pass is causal along its axis (key coordinate <= query coordinate). A token then
depends only on tokens that precede it in raster order (tested); it does not see the earlier rows'
later columns (Ho et al.'s Axial Transformer adds a shifted "outer" stack for those; that is a model,
not a layer). Incremental decoding re-runs the prefix (CacheSpec "recompute"), which is exact only
for a fixed row width: shape=(-1, w).

Shapes: `shape` in the config or per call (`forward(x, shape=(h, w))`); one entry may be -1, inferred
as ceil(N / product of the others), the grid then padded at the end (padding keys masked).
shape=None: the most square 2-D factorisation of N (h <= w, h the largest divisor of N up to √N),
so `longrange bench` runs it at every power-of-two length (√n × √n at even powers); a prime N has
none and is an error naming `shape`.

Engine path: rows are `Segments(w)` and columns a permuted (transposed) layout, but each pass runs
as ONE fused `scaled_dot_product_attention` over views [B, H·lines, d, D] rather than through the
block engine: at 4K (64 × 64, q/k/v [1, 12, n, 64], 2 CPU threads) the engine's Segments layout took
~2.3× the time forward (it gathers a copy of K and V per pass and loops over chunks) for the same
pairs (`scripts/probe_axial_paths.py`). Cost O(n·(Σ dᵢ)·D) time, O(n·max dᵢ) scores per pass.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from longrange.core.config import AttentionConfig
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import pad_to_multiple, sdpa_zero_empty_rows
from longrange.core.reference import reference_attention


@dataclasses.dataclass
class AxialConfig(AttentionConfig):
    name = "axial"
    #: the grid (d₀, ..., d_{m-1}), row-major; one entry may be -1 (inferred, grid padded at the end);
    #: None: the most square 2-D factorisation of each input's length (Ho et al. use the data's own
    #: shape: an image's (h, w); for a 1-D sequence √n × √n is the cheapest grid)
    shape: tuple[int, ...] | None = None
    causal: bool = False

    def validate(self):
        super().validate()
        if self.shape is not None:
            self.shape = check_shape(self.shape)


def check_shape(shape) -> tuple[int, ...]:
    """A tuple of positive ints with at most one -1; a ValueError naming `shape` otherwise."""
    if isinstance(shape, list):
        shape = tuple(shape)
    ok = isinstance(shape, tuple) and len(shape) >= 1 and all(
        isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in shape)
    if not ok or shape.count(-1) > 1:
        raise ValueError(f"shape must be a tuple of positive ints with at most one -1 (inferred), e.g. (32, 32) or "
                         f"(-1, 64), got {shape!r}")
    return shape


def most_square(n: int) -> tuple[int, int]:
    """(h, w) with h·w = n, h <= w, h the largest divisor of n up to √n. A prime n (> 1) has none."""
    h = math.isqrt(n)
    while n % h:
        h -= 1
    if h == 1 and n > 1:
        raise ValueError(f"shape: the length n={n} is prime, so it has no 2-D grid; give shape=(h, w) with "
                         f"h·w = {n}, or shape=(-1, w) to pad it to whole rows of w")
    return h, n // h


def resolve_shape(shape: tuple[int, ...] | None, n: int) -> tuple[int, ...]:
    """The grid for length n: `shape` with -1 inferred (so its product may exceed n: padding), or the
    most square factorisation. A shape whose product is not n (without -1) is a ValueError."""
    if shape is None:
        return most_square(n)
    shape = check_shape(shape)
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        return tuple(max(1, -(-n // known)) if d == -1 else d for d in shape)
    if math.prod(shape) != n:
        raise ValueError(f"shape {shape} multiplies to {math.prod(shape)}, not the input length {n}; use -1 in one "
                         f"axis, e.g. (-1, {shape[-1]}), to pad the grid")
    return shape


def axial_attention(q, k, v, shape: tuple[int, ...], keep=None, causal: bool = False) -> torch.Tensor:
    """Axial passes over q, k, v [B, H, N, D] laid out as the grid `shape` (product M >= N: the
    grid is padded at the end, padding keys masked). keep: [B, N] bool (True = real) or None.
    Returns [B, H, N, D]; a query whose lines hold no real key gets zeros."""
    B, H, N, D = q.shape
    out, order = axial_passes([q, k, v], shape, keep, causal)  # (B, H, *grid in `order`, D)
    m = len(shape)
    back = [0, 1] + [2 + order.index(i) for i in range(m)] + [2 + m]
    return out.permute(back).reshape(B, H, -1, D)[:, :, :N]


def axial_passes(qkv: list, shape: tuple[int, ...], keep, causal: bool):
    """The passes, last axis first. qkv: [q, k, v], each [B, H, N, D]; the list is emptied so that,
    without autograd, each tensor is freed once it has moved to the next pass's layout.

    Each tensor lives as the grid [B, H, d_{o₀}, ..., d_{o_{m-1}}, D] with its axes in some `order`;
    a pass along axis a needs a last in that order (its lines contiguous): one copy per tensor and
    pass, none for the first pass (the input order already ends with the last axis). Returns (the
    last pass's output [B, H, *grid in order, D], order)."""
    q, k, v = qkv
    qkv.clear()
    B, H, N, D = q.shape
    M = math.prod(shape)
    if M < N:
        raise ValueError(f"shape {shape} holds {M} tokens, fewer than the input length {N}")
    if M > N:
        q, k, v = (pad_to_multiple(t, M, dim=2) for t in (q, k, v))
        real = torch.ones(B, N, dtype=torch.bool, device=q.device) if keep is None else keep
        keep = pad_to_multiple(real, M, dim=1, value=False)
    m = len(shape)
    order = list(range(m))
    q, k, y = (t.reshape(B, H, *shape, D) for t in (q, k, v))
    del v
    grid_keep = None if keep is None else keep.reshape(B, 1, *shape, 1)
    for axis in reversed(range(m)):
        new = [i for i in order if i != axis] + [axis]
        q, k, y = (_reorder(t, order, new) for t in (q, k, y))
        order = new
        mask_keep = None if grid_keep is None else _reorder(grid_keep, list(range(m)), order)
        y = _pass(q, k, y, shape[axis], mask_keep, causal)
    return y, order


def _reorder(t: torch.Tensor, order: list[int], new: list[int]) -> torch.Tensor:
    """A grid [B, H', *axes in `order`, D'] with its axes put in `new` order (contiguous; no copy
    when the order does not change)."""
    if new == order:
        return t
    m = len(order)
    return t.permute([0, 1] + [2 + order.index(i) for i in new] + [2 + m]).contiguous()


def _pass(q, k, v, d: int, grid_keep, causal: bool) -> torch.Tensor:
    """Softmax attention along the last grid axis (size d): [B, H, *lines, d, D] -> same shape."""
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    lines = math.prod(q.shape[2:-2])
    qa, ka, va = (t.view(B, H * lines, d, D) for t in (q, k, v))
    mask = None
    if grid_keep is not None:  # (B, 1, *lines, d, 1) -> (B, H·lines, 1, d)
        kl = grid_keep.reshape(B, 1, lines, 1, d)
        mask = kl.expand(B, H, lines, 1, d).reshape(B, H * lines, 1, d)
    if causal:
        tri = torch.ones(d, d, dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    if mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(qa, ka, va)
    else:
        out = sdpa_zero_empty_rows(qa, ka, va, mask, None)
    return out.view(q.shape)


class AxialAttention(Attention):
    """Axial attention as passes along each axis of a grid (see the module docstring).

    forward(x [B, N, C], attention_mask [B, N] bool or None, shape=None) -> [B, N, C]; `shape`
    overrides the config's for this call."""

    config_class = AxialConfig
    capabilities = Capabilities(causal=True, inputs=("shape",))

    def forward(self, x, attention_mask=None, shape=None):
        keep = self.check_input(x, attention_mask)
        B, N, C = x.shape
        grid = self.grid(N, shape)
        out, order = axial_passes(list(self.project(x)), grid, keep, self.config.causal)
        m = len(grid)
        tokens = out.permute([0] + [2 + order.index(i) for i in range(m)] + [1, 2 + m])  # (B, *grid, H, D)
        return self.out(tokens.reshape(B, -1, C)[:, :N])  # the head merge's one copy

    def grid(self, n: int, shape=None) -> tuple[int, ...]:
        return resolve_shape(self.config.shape if shape is None else shape, n)

    def attend(self, q, k, v, keep, shape=None, **extra):
        return axial_attention(q, k, v, self.grid(q.shape[2], shape), keep, self.config.causal)

    def macs(self, n: int, global_tokens: int = 0, shape=None) -> MacCount:
        """Every pass computes each padded line's d × d block: H · M · Σᵢ dᵢ pairs."""
        grid = self.grid(n, shape)
        pairs = self.config.heads * math.prod(grid) * sum(grid)
        return pairwise(pairs, self.config.head_dim, self.projection_macs(n))

    # -- the oracle ------------------------------------------------------------------------------
    def line_masks(self, n: int, shape=None) -> list[torch.Tensor]:
        """[M, M] bool per axis (last first): same line along that axis (and causal along it)."""
        grid = self.grid(n, shape)
        coords = torch.stack(torch.unravel_index(torch.arange(math.prod(grid)), grid), dim=1)  # (M, m)
        masks = []
        for axis in reversed(range(len(grid))):
            others = [i for i in range(len(grid)) if i != axis]
            same = (coords[:, None, others] == coords[None, :, others]).all(-1)
            if self.config.causal:
                same = same & (coords[None, :, axis] <= coords[:, None, axis])
            masks.append(same)
        return masks

    def dense_mask(self, n: int) -> torch.Tensor:
        """The pairs the passes compute (the union of the lines), at length n."""
        union = torch.stack(self.line_masks(n)).any(0)
        return union[:n, :n]

    def reference_forward(self, x, attention_mask=None, shape=None):
        keep = self.check_input(x, attention_mask)
        q, k, v = self.project(x)
        return self.merge(self.reference_attend(q, k, v, keep, shape=shape))

    def reference_attend(self, q, k, v, keep, shape=None):
        """The passes as dense masked softmax attentions over the padded grid."""
        B, H, N, D = q.shape
        masks = self.line_masks(N, shape)
        M = masks[0].shape[0]
        real = torch.ones(B, N, dtype=torch.bool, device=q.device) if keep is None else keep
        real = pad_to_multiple(real, M, dim=1, value=False)
        q, k, v = (pad_to_multiple(t, M, dim=2) for t in (q, k, v))
        y = v
        for mask in masks:
            y = reference_attention(q, k, y, mask.to(q.device)[None, None] & real[:, None, None, :])
        return y[:, :, :N]

    @classmethod
    def test_configs(cls):
        return [{"shape": (-1, 3)}, {"shape": (-1, 2, 2)}, {"shape": (2, -1), "causal": True},
                {"shape": (-1, 4), "causal": True}]
