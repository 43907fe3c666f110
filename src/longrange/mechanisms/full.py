"""`full`: dense softmax attention through the fused `scaled_dot_product_attention` (the baseline)."""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.config import AttentionConfig
from longrange.core.flops import pairwise
from longrange.core.interface import Attention, CacheSpec, Capabilities
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.patterns import Causal, Full


@dataclasses.dataclass
class FullConfig(AttentionConfig):
    name = "full"
    causal: bool = False


class FullAttention(Attention):
    config_class = FullConfig
    capabilities = Capabilities(causal=True)
    applies_attention_dropout = True  # SDPA's, in training

    def attend(self, q, k, v, keep, **extra):
        n = q.shape[2]
        p = self.config.dropout if self.training else 0.0
        if keep is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.config.causal, dropout_p=p)
        mask = keep[:, None, None, :]  # [B, 1, 1, N]
        if self.config.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return sdpa_zero_empty_rows(q, k, v, mask, None, dropout_p=p)

    def cache_spec(self) -> CacheSpec:
        super().cache_spec()  # causal only
        return CacheSpec("kv")

    def macs(self, n, global_tokens: int = 0):
        """n² pairs per head; causal: the n(n+1)/2 pairs that count (fused kernels skip most of the
        rest; the math form computes all n² and masks)."""
        pairs = self.config.heads * (n * (n + 1) // 2 if self.config.causal else n * n)
        return pairwise(pairs, self.config.head_dim, self.projection_macs(n))

    def dense_mask(self, n):
        return (Causal() if self.config.causal else Full()).to_dense(n)

    @classmethod
    def test_configs(cls):
        return [{}, {"causal": True}]
