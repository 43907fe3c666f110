"""Incremental decoding for causal self-attention: one cache object per layer.

    cache = self_attention_cache(module)     # the cache the mechanism declares (`module.cache_spec()`)
    y = cache.attend(module, x_new)          # x_new [B, T, C]: the next T tokens -> [B, T, C]

- "kv": keys and values of every past token (`full`), or of the last r only (`local`'s window).
- "state": the module's own O(1) `initial_state(batch, device=, dtype=)` / `step(q, k, v, state)`
  (linear attention, Performer).
- "recompute": the layer's past inputs, re-run each step (any causal mechanism; correct, not fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def self_attention_cache(module: nn.Module):
    """The cache `module` declares (`cache_spec()`); a ValueError for non-causal attention."""
    spec = module.cache_spec()
    if spec.kind == "kv":
        return KVCache(radius=spec.window)
    if spec.kind == "state":
        return StateCache()
    if spec.kind == "recompute":
        return RecomputeCache()
    raise ValueError(f"{module.config.name!r} declares an unknown cache kind {spec.kind!r}")


class KVCache:
    """Past keys/values; radius=r keeps only the last r (a causal window: token i sees i-r .. i)."""

    def __init__(self, radius: int | None = None):
        self.radius = radius
        self.k = self.v = None
        self.length = 0  # tokens seen so far

    def attend(self, module, x: torch.Tensor) -> torch.Tensor:
        q, k, v = module.project(x)  # 3 x (B, H, T, D)
        t = x.shape[1]
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, H, L, D)
        pos_q = torch.arange(self.length, self.length + t, device=x.device)
        pos_k = torch.arange(self.length + t - k.shape[2], self.length + t, device=x.device)
        allowed = pos_k[None, :] <= pos_q[:, None]  # (T, L)
        if self.radius is not None:
            allowed &= pos_k[None, :] >= pos_q[:, None] - self.radius
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, D)
        if self.radius is not None:
            k, v = k[:, :, -self.radius :], v[:, :, -self.radius :]
        self.k, self.v, self.length = k, v, self.length + t
        return module.merge(o)

    def memory_tokens(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class StateCache:
    """The mechanism's own recurrent state (`initial_state` / `step`), O(1) in the length."""

    def __init__(self):
        self.state = None

    def attend(self, module, x: torch.Tensor) -> torch.Tensor:
        q, k, v = module.project(x)  # 3 x (B, H, T, D)
        if self.state is None:
            self.state = module.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        o, self.state = module.step(q, k, v, self.state)
        return module.merge(o)

    def memory_tokens(self) -> int:
        return 0


class RecomputeCache:
    """Keeps the layer's past inputs and re-runs the module on all of them (any causal mechanism)."""

    def __init__(self):
        self.x = None

    def attend(self, module, x: torch.Tensor) -> torch.Tensor:
        self.x = x if self.x is None else torch.cat([self.x, x], dim=1)  # (B, L, C)
        return module(self.x)[:, -x.shape[1] :]

    def memory_tokens(self) -> int:
        return 0 if self.x is None else self.x.shape[1]
