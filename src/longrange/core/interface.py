"""The one attention interface: every mechanism is an `Attention` module on [B, N, C], and declares
what it supports (`Capabilities`) so that models, the benchmark, LRA and HF ask it instead of
testing its name."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from longrange.core.config import AttentionConfig, ConfigError
from longrange.core.flops import MacCount
from longrange.core.masking import check_key_padding_mask
from longrange.core.reference import reference_attention


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a mechanism's class supports, read by every consumer (never its name).

    causal          it has a causal variant: its config's `causal` field may be True
    inputs          keyword inputs `forward` takes beside x and attention_mask, e.g. "global_mask",
                    "num_global", "memory"
    global_tokens   the input by which the user chooses the global tokens that are part of this
                    mechanism's graph (Longformer's "global_mask", ETC's "num_global"), or None;
                    `global_token_inputs(g, ...)` builds it for "the first g tokens are global"
    length_options  config fields that default to the input length when None (Linformer's seq_len)
    """

    causal: bool = False
    inputs: tuple[str, ...] = ()
    global_tokens: str | None = None
    length_options: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The decoding cache a causal mechanism allows (`Attention.cache_spec`); `longrange.nn.decoding`
    builds it. kind: "kv" (past keys and values), "state" (the module's own O(1) `initial_state` /
    `step`), "recompute" (the past inputs, re-run each step).

    For "kv", what a key at position j needs to stay for the queries after it (positions count each
    example's real tokens from 0):
    window   keep the last `window` positions (a ring buffer); None: keep every position
    sinks    keep positions 0 .. sinks-1 forever (attention sinks, leading global tokens)
    keep     positions [*] long -> bool [*]: further positions kept forever (summary columns)
    pattern  the graph applied to what is kept (a `longrange.patterns.Pattern` on absolute
             positions); None: plain causal attention
    """

    kind: str
    window: int | None = None
    sinks: int = 0
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None
    pattern: Any = None


def empty_input_rule(forward):
    """The one rule for empty inputs, for every mechanism: x [B, N, C] with B = 0 or N = 0 gives an
    empty [B, N, C] output (x's dtype and device, on x's autograd graph) after the usual checks of x
    and attention_mask; the mechanism's own forward never sees it. `Attention` applies this to the
    `forward` of every subclass (`__init_subclass__`), so no mechanism handles it itself."""

    @functools.wraps(forward)
    def guarded(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and x.dim() == 3 and (x.shape[0] == 0 or x.shape[1] == 0):
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            self.check_input(x, mask)
            return x * 0  # (B, N, C), empty
        return forward(self, *args, **kwargs)

    guarded.empty_input_rule = True
    return guarded


class Attention(nn.Module):
    """Multi-head attention: fused Q/K/V projection -> mechanism kernel -> output projection.

    Subclasses implement `attend(q, k, v, keep, **extra)` on [B, H, N, D] and `dense_mask` (the
    oracle's view of their graph). `forward(x, attention_mask=None, **extra)` maps [B, N, C] to
    [B, N, C]; `attention_mask` is [B, N] bool, True = real token. An empty input (B = 0 or N = 0)
    gives an empty output, for every mechanism (`empty_input_rule`).
    """

    config_class: ClassVar[type[AttentionConfig]] = AttentionConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: whether the kernel applies the config's attention-probability `dropout` (in training): the
    #: mechanisms with an attention matrix (the pattern mechanisms, `full`); the others refuse dropout > 0
    applies_attention_dropout: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "empty_input_rule", False):
            cls.forward = empty_input_rule(forward)

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        if config.dropout and not self.applies_attention_dropout:
            raise ConfigError(f"{config.name}: dropout={config.dropout} is attention-probability dropout, which "
                              f"{config.name} does not define (its kernel forms no attention matrix to drop from); "
                              "use the model's dropout (residual / feed-forward) instead", "dropout")
        c = config.dim
        self.qkv = nn.Linear(c, 3 * c, bias=config.bias)
        self.out = nn.Linear(c, c, bias=config.bias)

    # -- shapes ----------------------------------------------------------------------------------
    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.config.heads, self.config.head_dim).transpose(1, 2)  # (B, H, N, D)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, C] -> q, k, v, each a contiguous [B, H, N, D]. Made head-major here, once, so
        the [B, N, 3C] projection output is freed at once and no kernel copies it again."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.config.heads, self.config.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # 3 x (B, H, N, D)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))  # (B, N, C)

    def check_input(self, x: torch.Tensor, attention_mask: torch.Tensor | None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.dim:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, N, C] with C = dim = {self.config.dim}, got {shape}")
        return check_key_padding_mask(attention_mask, x.shape[0], x.shape[1], "attention_mask")

    # -- the call --------------------------------------------------------------------------------
    @empty_input_rule
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = self.check_input(x, attention_mask)
        q, k, v = self.project(x)
        return self.merge(self.attend(q, k, v, keep))

    def attend(self, q, k, v, keep, **extra) -> torch.Tensor:
        raise NotImplementedError

    def explain(self, x: torch.Tensor, **inputs) -> str:
        """Which kernel a call on x runs and why. Mechanisms on a block layout choose a backend
        (`PatternAttention.explain`); the others always run their own kernel."""
        return (f"{self.config.name} at n={x.shape[1]} on {x.device.type} {str(x.dtype).removeprefix('torch.')}: "
                f"its own kernel (no block layout, so no backend choice)")

    # -- what consumers ask ------------------------------------------------------------------------
    def global_token_inputs(self, global_tokens: int, batch: int, n: int, device=None) -> dict:
        """Keyword inputs that make the first `global_tokens` of n tokens global, by the input this
        mechanism declares (`capabilities.global_tokens`); {} for 0 global tokens."""
        kind = self.capabilities.global_tokens
        if global_tokens == 0:
            return {}
        if kind is None:
            raise ValueError(f"{self.config.name!r} takes no global tokens")
        if kind == "num_global":
            return {"num_global": global_tokens}
        mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
        mask[:, :global_tokens] = True
        return {kind: mask}

    def cache_spec(self) -> CacheSpec:
        """The decoding cache this module allows; a ValueError when it is not causal."""
        if not getattr(self.config, "causal", False):
            raise ValueError(f"incremental decoding needs a causal attention; {self.config.name!r} is not causal")
        return CacheSpec("recompute")

    # -- cost -----------------------------------------------------------------------------------------
    def projection_macs(self, n: int) -> int:
        """Q, K, V and output projections for n tokens: 4·n·C² MACs."""
        return 4 * n * self.config.dim**2

    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """MACs of one forward pass at length n, batch 1, on the path this module takes
        (`global_tokens`: that many of the n tokens global, for mechanisms that take them)."""
        raise NotImplementedError(f"{type(self).__name__} does not count its MACs")

    # -- the oracle's view -----------------------------------------------------------------------
    def dense_mask(self, n: int) -> torch.Tensor:
        """[n, n] or [H, n, n] bool: the graph this module computes at length n (tests only)."""
        raise NotImplementedError

    def reference_forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same layer through the obviously-correct quadratic formula: what `forward` must equal."""
        keep = self.check_input(x, attention_mask)
        q, k, v = self.project(x)
        return self.merge(self.reference_attend(q, k, v, keep))

    def reference_attend(self, q, k, v, keep) -> torch.Tensor:
        """The oracle for `attend`, O(n²) and written for clarity. Exact mechanisms: softmax attention
        over `dense_mask` & padding. Approximations (Performer, Linformer, Nyström, LSH) override this
        with their own maths written out densely (e.g. φ(q)φ(k)ᵀ materialised), so the fast path is
        checked exactly; their distance to softmax attention is tested separately."""
        mask = _broadcast_mask(self.dense_mask(q.shape[2]).to(q.device), keep)
        return reference_attention(q, k, v, mask)

    @classmethod
    def test_configs(cls) -> list[dict]:
        """Small settings (beside dim and heads) the registry-wide tests run this mechanism with."""
        return [{}]


def _broadcast_mask(mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    mask = mask if mask.dim() == 3 else mask[None]  # [Hp, n, n]
    mask = mask[None]  # [1, Hp, n, n]
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    return mask
