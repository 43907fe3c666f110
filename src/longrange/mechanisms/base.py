"""Shared base for mechanisms whose graph is a `Pattern` run on the sparse engine."""

from __future__ import annotations

import torch

from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention
from longrange.patterns.base import Pattern
from longrange.sparse.backends import Decision, call_records_grad, decide, run_layout
from longrange.sparse.layout import BlockLayout, compile_layout


class PatternAttention(Attention):
    """Subclasses give `build_pattern()`; layouts are compiled once per length, on tiles of `tile`
    tokens (the config's `tile`, else `default_tile()`), and run through `run_layout` on the
    config's `backend` ("auto", "engine" or "flex", `longrange.sparse.backends`), with the config's
    attention-probability `dropout` in training."""

    applies_attention_dropout = True

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

    # -- backends ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return getattr(self.config, "backend", "engine")

    def attention_dropout(self) -> float:
        """The dropout applied to attention probabilities now: the config's in training, 0 in eval."""
        return self.config.dropout if self.training else 0.0

    def run_layout(self, q, k, v, layout: BlockLayout, keep, **kw):
        """`layout` on this mechanism's backend (see `longrange.sparse.backends.run_layout`)."""
        return run_layout(q, k, v, layout, keep, backend=self.backend, dropout_p=self.attention_dropout(),
                          who=self.config.name, **kw)

    def engine_only_reason(self, needs_grad: bool) -> str | None:
        """Why this mechanism's calls need the engine (None: either backend runs them)."""
        return None

    def explain_length(self, x: torch.Tensor, inputs: dict) -> int:
        """The length of the layout a call on x runs (ETC: the long tokens)."""
        return x.shape[1]

    def decide_backend(self, x: torch.Tensor, **inputs) -> Decision:
        """The backend `forward(x, **inputs)` runs its layout on, and why (a ValueError naming the
        reason where an explicit backend cannot run it)."""
        needs_grad = call_records_grad(self, x)
        layout = self.layout(self.explain_length(x, inputs), x.device)
        return decide(x, layout, self.backend, needs_grad=needs_grad, dropout_p=self.attention_dropout(),
                      engine_only=self.engine_only_reason(needs_grad))

    def explain(self, x: torch.Tensor, **inputs) -> str:
        """Which backend a call on x runs and why: device, dtype, autograd, length, dropout, options."""
        try:
            verdict = str(self.decide_backend(x, **inputs))
        except ValueError as err:
            verdict = f"error: {err}"
        mode = "training (autograd)" if call_records_grad(self, x) else "inference"
        dtype = str(x.dtype).removeprefix("torch.")
        return (f"{self.config.name} (backend={self.backend!r}) at n={self.explain_length(x, inputs)} on "
                f"{x.device.type} {dtype}, {mode}, attention dropout {self.attention_dropout():g}: {verdict}")

    def attend(self, q, k, v, keep, **extra):
        return self.run_layout(q, k, v, self.layout(q.shape[2], q.device), keep)

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
