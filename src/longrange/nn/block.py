"""The transformer block every longrange model uses: any attention, BERT's FFN, norms and dropout.

post-norm (BERT, default), per sub-layer f:  x = LayerNorm(x + dropout(f(x)))
pre-norm:                                    x = x + dropout(f(LayerNorm(x)))

Dropout sits where BERT puts it: after the attention output projection, after the FFN; the
embeddings' dropout is in the model. Attention-probability dropout is not applied (see
`AttentionConfig.dropout`). `f` and `g` are the pre-norm branches a reversible stack needs.
"""

from __future__ import annotations

import torch
from torch import nn

from longrange.core.interface import Attention
from longrange.nn.cross_attention import CrossAttention
from longrange.nn.decoding import self_attention_cache
from longrange.nn.feedforward import FeedForward
from longrange.nn.moe import SwitchFeedForward


class TransformerBlock(nn.Module):
    def __init__(self, attention: Attention, ffn: FeedForward | SwitchFeedForward, *, dropout: float = 0.1,
                 eps: float = 1e-12, norm: str = "post", cross: CrossAttention | None = None):
        super().__init__()
        if norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {norm!r}")
        dim = attention.config.dim
        self.norm = norm
        self.attention = attention
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.cross = cross
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross is not None else None
        self.ffn = ffn
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attention_mask=None, global_mask=None, memory=None, memory_mask=None, cache=None,
                attention_kwargs: dict | None = None):
        """x [B, N, C] -> [B, N, C]. attention_mask [B, N] bool (True = real); global_mask [B, N] bool
        (used by attentions with global tokens); memory [B, S, C] + memory_mask [B, S] for the
        cross-attention; cache: a layer's decoding cache (`new_cache()`), x then being the new tokens;
        attention_kwargs: mechanism-specific keyword inputs passed to the self-attention as they are
        (e.g. ETC's structure masks, XL's memory)."""
        if self.norm == "pre":
            x = x + self.f(x, attention_mask, global_mask, memory, memory_mask, cache, attention_kwargs)
            return x + self.g(x, attention_mask)
        x = self.attention_norm(x + self.dropout(self._attend(x, attention_mask, global_mask, cache,
                                                              attention_kwargs)))
        if self.cross is not None:
            x = self.cross_norm(x + self.dropout(self._cross(x, memory, memory_mask, cache)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x, attention_mask)))

    def f(self, x, attention_mask=None, global_mask=None, memory=None, memory_mask=None, cache=None,
          attention_kwargs: dict | None = None):
        """Pre-norm attention branch (self-attention, then cross-attention if any): the F of y1 = x1 + F(x2)."""
        a = self.dropout(self._attend(self.attention_norm(x), attention_mask, global_mask, cache, attention_kwargs))
        if self.cross is not None:
            a = a + self.dropout(self._cross(self.cross_norm(x + a), memory, memory_mask, cache))
        return a

    def g(self, x, attention_mask=None):
        """Pre-norm feed-forward branch: the G of y2 = x2 + G(y1)."""
        return self.dropout(self.feed_forward(self.ffn_norm(x), attention_mask))

    def feed_forward(self, x, attention_mask=None):
        """The FFN; a mixture of experts (`takes_mask`) also gets the padding mask (padding takes no expert)."""
        if getattr(self.ffn, "takes_mask", False):
            return self.ffn(x, attention_mask)
        return self.ffn(x)

    def new_cache(self) -> dict:
        """An empty decoding cache for this layer."""

        return {"self": self_attention_cache(self.attention), "cross": {}}

    def _attend(self, x, attention_mask, global_mask, cache, attention_kwargs=None) -> torch.Tensor:
        if cache is not None:
            return cache["self"].attend(self.attention, x)
        kw = dict(attention_kwargs or {})
        if global_mask is not None and "global_mask" in self.attention.capabilities.inputs:
            kw["global_mask"] = global_mask
        return self.attention(x, attention_mask=attention_mask, **kw)

    def _cross(self, x, memory, memory_mask, cache) -> torch.Tensor:
        if memory is None:
            raise ValueError("this block has cross-attention: pass memory=[B, S, C] (the encoder's output)")
        return self.cross(x, memory, memory_mask, cache=None if cache is None else cache["cross"])
