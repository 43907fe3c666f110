"""Shared base for mechanisms whose graph is a `Pattern` run on the sparse engine."""

from __future__ import annotations

import torch

from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention
from longrange.patterns.base import Pattern
from longrange.sparse.engine import block_sparse_attention
from longrange.sparse.layout import BlockLayout, compile_layout


class PatternAttention(Attention):
    """Subclasses give `build_pattern()`; layouts are compiled once per length, on tiles of `tile`
    tokens (the config's `tile`, else `default_tile()`)."""

    def __init__(self, config):
        super().__init__(config)
        self._layouts: dict[tuple[str, int, str], BlockLayout] = {}

    @property
    def tile(self) -> int:
        """The engine's tile in tokens: the kernel's unit, not part of the graph."""
        return getattr(self.config, "tile", None) or self.default_tile()

    def default_tile(self) -> int:
        return 64

    def build_pattern(self) -> Pattern:
        raise NotImplementedError

    def current_pattern(self) -> Pattern:
        if not hasattr(self, "_pattern"):
            self._pattern = self.build_pattern()
        return self._pattern

    def layout(self, n: int, device: torch.device | str = "cpu") -> BlockLayout:
        return self.cached_layout(self.current_pattern(), n, device)

    def cached_layout(self, pattern: Pattern, n: int, device, tag: str = "pattern") -> BlockLayout:
        """Compile `pattern` for length n once per (tag, n, device); `forget_layouts` clears it."""
        key = (tag, n, str(device))
        if key not in self._layouts:
            self._layouts[key] = compile_layout(pattern, n, self.tile).to(device)
        return self._layouts[key]

    def forget_layouts(self) -> None:
        self._layouts.clear()
        self.__dict__.pop("_pattern", None)

    def attend(self, q, k, v, keep, **extra):
        return block_sparse_attention(q, k, v, self.layout(q.shape[2], q.device), keep)

    def dense_mask(self, n: int) -> torch.Tensor:
        return self.current_pattern().to_dense(n)

    def computed_pairs(self, n: int) -> int:
        """(query, key) pairs the engine computes at length n, all heads: whole blocks of the
        layout (padding included) and dense rows against every key."""
        layout = self.layout(n)
        pairs = layout.computed_pairs()
        return pairs * self.config.heads if layout.num_heads is None else pairs

    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        return pairwise(self.computed_pairs(n), self.config.head_dim, self.projection_macs(n))


def auto_tile(radius: int, preferred: int = 256) -> int:
    """Largest power of two <= `preferred` dividing `radius` (1 when radius is 0 or odd).

    Large blocks win on CPU: the fused SDPA kernel runs ~2x faster on 256-query blocks than on
    64-query ones, which outweighs the extra masked keys (3·r keys computed for 2·r + 1 needed).
    """
    b = preferred
    while b > 1 and (radius % b or b > max(radius, 1)):
        b //= 2
    return b
