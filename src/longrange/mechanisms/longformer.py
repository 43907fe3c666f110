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
from longrange.mechanisms.globals import (
    check_global_mask,
    fold_key_projection,
    global_indices,
    global_rows,
    long_rows,
    oracle_mask,
    put_tokens,
    rows_over_inputs,
    token_rows,
)
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
        if global_mask is None or not bool(global_mask.any()):
            return self.merge(self.attend(*self.project(x), keep))
        idx, valid = global_indices(global_mask, keep)
        # the global rows first: autograd runs the later op's backward first, so the gradient they
        # add to x is made after the sparse rows' backward, not held beside it (N·C at its peak)
        rows = self.merge(self.global_rows(x, idx, keep))  # (B, g, C)
        q, k, v = self.project(x)
        layout = self.layout(x.shape[1], x.device)
        out, _, _ = long_rows(q, k, v, layout, keep, global_mask, self.run_layout, idx, valid)
        return put_tokens(self.merge(out), idx, valid, rows)

    def global_rows(self, x, idx, keep):
        """The global tokens' rows -> [B, H, g, D]: their queries from the global projection, against
        every token's global keys and values. With few global tokens (`fold_key_projection`) the key
        and value projections are folded into the queries and the output (`rows_over_inputs`):
        nothing of size N·C is made; else keys and values are projected for every token."""
        c, h = self.config.dim, self.config.heads
        w, bias = self.qkv_global.weight, self.qkv_global.bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(c)
        x_g = token_rows(x, idx)  # (B, g, C)
        q_g = self.split_heads(nn.functional.linear(x_g, w[:c], b_q))  # (B, H, g, D)
        dropout_p = self.attention_dropout()
        if fold_key_projection(x.shape[1], idx.shape[1], c, h):
            return rows_over_inputs(q_g, x, w[c : 2 * c], w[2 * c :], b_v, keep, dropout_p=dropout_p)
        kv = nn.functional.linear(x, w[c:], None if bias is None else bias[c:])
        k_g, v_g = (self.split_heads(t) for t in kv.chunk(2, dim=-1))
        return global_rows(q_g, k_g, v_g, keep, dropout_p=dropout_p)

    def macs(self, n, global_tokens: int = 0):
        """With g global tokens every local row also scores the g global keys (their K, V from the
        local projections' g rows), and each global row all n keys. Projections: a global Q for
        each global token, the output projection of the global rows (apart from the sparse rows'),
        then either global K and V for every token or, with few global tokens
        (`fold_key_projection`), K and V folded into the g queries and their outputs (g·C² each);
        the global rows then score x itself (C MACs per pair instead of D)."""
        count = super().macs(n)
        g = global_tokens
        if g:
            c, h, d = self.config.dim, self.config.heads, self.config.head_dim
            pairs = h * g * n  # one more column per row, and as many pairs in the global rows
            row_width = c if fold_key_projection(n, g, c, h) else d
            # their Q; their rows' output projection (made apart from the sparse rows'); K and V
            count.projections += 2 * g * c * c + (2 * g * c * c if row_width == c else 2 * n * c * c)
            count.scores += pairs * d + pairs * row_width
            count.weighted += pairs * d + pairs * row_width
            count.exps += 2 * pairs
            count.pairs += 2 * pairs
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
