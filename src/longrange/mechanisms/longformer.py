"""`longformer`: sliding window + symmetric global tokens with their own Q/K/V (Beltagy et al.).

Local rows: window keys (local projections) plus the example's global keys as extra columns, each
key counted once. Global rows: a dense attention whose queries, keys and values come from the
separate global projections (`qkv_global`), as in the paper and HF's LongformerSelfAttention.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from longrange.core.interface import CacheSpec, Capabilities
from longrange.core.reference import reference_attention
from longrange.mechanisms.globals import check_global_mask, global_rows, long_rows, oracle_mask, put_rows
from longrange.mechanisms.local import WindowAttention, WindowConfig
from longrange.patterns import Causal, Global, Window


@dataclasses.dataclass
class LongformerConfig(WindowConfig):
    """Window options only: global attention is bidirectional (use `local` with causal=True)."""

    name = "longformer"


class LongformerAttention(WindowAttention):
    config_class = LongformerConfig
    capabilities = Capabilities(inputs=("global_mask",), global_tokens="global_mask")

    def __init__(self, config):
        super().__init__(config)
        self.qkv_global = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)

    def build_pattern(self):
        return Window(self.config.window // 2)

    def cache_spec(self, global_tokens: int = 0) -> CacheSpec:
        """Longformer has no causal variant of its own; this is the decoding cache of its graph
        intersected with causal, as the HF backend runs it on decoders: a ring of the last window // 2
        keys, and the first `global_tokens` tokens (global: every later token sees them) kept forever."""
        r, g = self.config.window // 2, global_tokens
        pattern = Window(r, causal=True)
        if g:
            pattern = pattern | (Global(range(g), clip=True) & Causal())
        return CacheSpec("kv", window=r, sinks=g, pattern=pattern)

    def forward(self, x, attention_mask=None, global_mask=None):
        """x [B, N, C]; attention_mask [B, N] bool (True = real); global_mask [B, N] bool (True = global)."""
        keep = self.check_input(x, attention_mask)
        global_mask = check_global_mask(global_mask, x.shape[0], x.shape[1])
        q, k, v = self.project(x)
        if global_mask is None or not bool(global_mask.any()):
            return self.merge(self.attend(q, k, v, keep))
        out, idx, valid = long_rows(q, k, v, self.layout(x.shape[1], x.device), keep, global_mask, self.run_layout)
        del q, k, v  # the global projections below need their memory more (autograd keeps what it needs)
        q_g, k_g, v_g = self._global_qkv(x, idx)
        rows = global_rows(q_g, k_g, v_g, keep, dropout_p=self.attention_dropout())
        return self.merge(put_rows(out, idx, valid, rows))

    def _global_qkv(self, x, idx):
        """Global queries at the global positions only; global keys/values for every token."""
        c = self.config.dim
        w, bias = self.qkv_global.weight, self.qkv_global.bias
        x_g = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, c))  # (B, g, C)
        q_g = nn.functional.linear(x_g, w[:c], None if bias is None else bias[:c])
        kv = nn.functional.linear(x, w[c:], None if bias is None else bias[c:])
        k_g, v_g = kv.chunk(2, dim=-1)
        return self.split_heads(q_g), self.split_heads(k_g), self.split_heads(v_g)

    def macs(self, n, global_tokens: int = 0):
        """With g global tokens: global K and V for every token and a global Q for each global token;
        every local row also scores the g global keys, and each global row all n keys."""
        count = super().macs(n)
        if global_tokens:
            c, h, d = self.config.dim, self.config.heads, self.config.head_dim
            extra_pairs = 2 * h * global_tokens * n
            count.projections += 2 * n * c * c + global_tokens * c * c
            count.scores += extra_pairs * d
            count.weighted += extra_pairs * d
            count.exps += extra_pairs
            count.pairs += extra_pairs
        return count

    def reference_forward(self, x, attention_mask=None, global_mask=None):
        keep = self.check_input(x, attention_mask)
        q, k, v = self.project(x)
        mask, g = oracle_mask(self.dense_mask(x.shape[1]), keep, global_mask, x.shape[0], x.device)
        out = reference_attention(q, k, v, mask)
        q_g, k_g, v_g = (self.split_heads(t) for t in self.qkv_global(x).chunk(3, dim=-1))
        out_g = reference_attention(q_g, k_g, v_g, None if keep is None else keep[:, None, None, :])
        return self.merge(torch.where(g[:, None, :, None], out_g, out))

    @classmethod
    def test_configs(cls):
        return [{"window": 4, "tile": 2}, {"window": 8}]
