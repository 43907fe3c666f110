"""`linear`: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") with the feature map
φ(x) = elu(x) + 1 > 0, so out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j) costs O(N·D²).

Bidirectional and causal (chunked prefix sums, see `feature_maps`), plus an O(1)-state recurrent
`step` for decoding. Unlike softmax attention there is no 1/√D scale: φ is applied to q and k as
they are. Sums run in float32 under fp16/bf16 inputs (they overflow fp16 at long lengths).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from longrange.core.config import AttentionConfig, check_bool, check_positive_int
from longrange.mechanisms.feature_maps import FeatureMap, FeatureMapAttention, feature_attention, padding_rows


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1: positive, smooth, ~x for large x. [..., n, D] -> [..., n, D]."""
    return F.elu(x).add_(1.0)


def elu_key_features(k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """φ(k) with padded keys (keep [B, n] False) set to zero features."""
    features = elu_features(k)
    rows = padding_rows(keep, k)
    return features if rows is None else features.masked_fill_(~rows, 0.0)


def elu_features_grad(x: torch.Tensor, features: torch.Tensor, d_features: torch.Tensor) -> torch.Tensor:
    """dφ -> dx: φ'(x) = 1 for x > 0, exp(x) = φ(x) otherwise."""
    return d_features.mul_(torch.where(x > 0, 1.0, features))


def elu_key_features_grad(k, keep, features, d_features) -> torch.Tensor:
    rows = padding_rows(keep, k)  # padded keys' features are the constant 0
    return elu_features_grad(k, features, d_features if rows is None else d_features.masked_fill_(~rows, 0.0))


def elu_feature_map(head_dim: int) -> FeatureMap:
    return FeatureMap(num_features=head_dim, queries=elu_features, keys=elu_key_features, exps_per_row=head_dim,
                      queries_grad=elu_features_grad, keys_grad=elu_key_features_grad)


def linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    *,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Linear attention with φ = elu + 1.

    q, k, v: [B, H, N, D]; key_padding_mask: [B, N] bool, True = real token (padded keys are ignored,
    a query with no real key returns zeros). causal: query i sees keys j <= i, computed in chunks of
    `chunk_size` tokens (the result does not depend on it). Returns [B, H, N, D] in q's dtype.
    """
    return feature_attention(
        elu_feature_map(q.shape[-1]), q, k, v, key_padding_mask, causal=causal, chunk_size=chunk_size
    )


@dataclasses.dataclass
class LinearConfig(AttentionConfig):
    name = "linear"
    causal: bool = False
    # causal only: tokens per chunk, a masked [c, c] product inside, prefix sums across; the result
    # does not depend on it. Work per token ~ c·(m + D) + 2·m·D: 64 measured fastest on CPU
    chunk_size: int = 64

    def validate(self):
        super().validate()
        check_bool("causal", self.causal)
        check_positive_int("chunk_size", self.chunk_size)


class LinearAttention(FeatureMapAttention):
    """Multi-head linear attention; `step` decodes with a [B, H, D, D] state when causal."""

    config_class = LinearConfig

    def feature_map(self, dtype, device) -> FeatureMap:
        return elu_feature_map(self.config.head_dim)

    @classmethod
    def test_configs(cls):
        return [{}, {"causal": True, "chunk_size": 3}]
