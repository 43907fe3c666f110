"""Dense cross-attention (decoder queries over encoder states), as in LED/BART."""

from __future__ import annotations

import torch
from torch import nn

from longrange.core.masking import sdpa_zero_empty_rows


class CrossAttention(nn.Module):
    """x [B, T, C] attends to memory [B, S, C] (memory_mask [B, S] bool, True = real) -> [B, T, C].

    `cache` (a dict) keeps the projected memory keys/values across decoding steps."""

    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, D)

    def forward(self, x, memory, memory_mask=None, cache: dict | None = None) -> torch.Tensor:
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = (self._split(t) for t in self.kv(memory).chunk(2, dim=-1))  # 2 x (B, H, S, D)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, S)
        o = sdpa_zero_empty_rows(self._split(self.q(x)), k, v, mask, None)  # (B, H, T, D)
        b, h, t, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, h * d))
