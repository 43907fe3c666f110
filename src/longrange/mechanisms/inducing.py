"""`inducing`: induced set attention (ISAB; Lee et al. 2019, "Set Transformer", §3.2).

m learned inducing points I [m, C] attend to the sequence, and the sequence attends back to what
they gathered:

    H   = MAB(I, X)                  [m, C]: the inducing points' summary of the sequence
    out = Multihead(X, H, H)         [N, C]: every token attends to the m rows of H

with the paper's multihead attention block MAB(Y, X) = LayerNorm(H' + rFF(H')),
H' = LayerNorm(Y + Multihead(Y, X, X)) (its eq. 6-7), and rFF(h) = ReLU(h W + b), the row-wise
feed-forward of the authors' code.

How ISAB sits in our one-layer interface ([B, N, C] -> [B, N, C], projections included): ISAB is
MAB(X, MAB(I, X)). The first MAB, on the m inducing rows, is wholly inside this layer (its
attention, residual, LayerNorms and rFF). Of the second MAB the layer computes Multihead(X, H, H)
(queries of X, keys and values of H, the output projection); its residual, LayerNorm and
feed-forward are the `TransformerBlock`'s around the layer, as for every attention. The fused
Q/K/V projection of X gives the second attention's queries and the first one's keys and values,
so the N-dependent work is the usual 4·N·C² of projections plus 2·N·m·D per head for the two
attentions: O(N·m) time and memory, never an N × N matrix.

Shapes: I [m, C] -> stage-1 queries [B, H, m, D] over keys/values of X [B, H, N, D] -> [B, H, m, D]
-> H [B, m, C] -> stage-2 keys/values [B, H, m, D] for the queries of X [B, H, N, D] -> [B, H, N, D].

Padding: padded tokens are masked keys of stage 1 and so never reach H; stage 2 needs no mask
(every token sees all m rows of H). An example with no real token gets zeros: its tokens have no
key. Not causal: H mixes every token, as befits a set model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.core.reference import reference_attention


@dataclasses.dataclass
class InducingConfig(AttentionConfig):
    name = "inducing"
    num_inducing: int = 32  # m: the authors' SetTransformer default (num_inds=32), used in their point-cloud runs

    def validate(self):
        super().validate()
        check_positive_int("num_inducing", self.num_inducing)


class InducingAttention(Attention):
    config_class = InducingConfig

    def __init__(self, config: InducingConfig):
        super().__init__(config)
        c, m = config.dim, config.num_inducing
        self.inducing = nn.Parameter(nn.init.xavier_uniform_(torch.empty(m, c)))  # I, as the authors' init
        self.inducing_q = nn.Linear(c, c, bias=config.bias)  # stage 1: queries of I
        self.inducing_out = nn.Linear(c, c, bias=config.bias)  # stage 1: Multihead's output projection
        self.inducing_norm = nn.LayerNorm(c, bias=config.bias)  # H' = LN(I + Multihead(I, X, X))
        self.inducing_ff = nn.Linear(c, c, bias=config.bias)  # rFF
        self.summary_norm = nn.LayerNorm(c, bias=config.bias)  # H = LN(H' + rFF(H'))
        self.summary_kv = nn.Linear(c, 2 * c, bias=config.bias)  # stage 2: keys and values of H

    # -- the call ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attend` on the fused projection, in two steps so that at most one of X's projections is held:
        keys and values [B, N, 2C] make H, and are released (without grad) before the queries exist."""
        keep = self.check_input(x, attention_mask)
        b, n, c = x.shape
        h, d = self.config.heads, self.config.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, weight[c:], None if bias is None else bias[c:]).view(b, n, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N, D), views
        k_h, v_h = self.split_summary(self.summarize(k, v, keep, sdpa_zero_empty_rows))  # 2 x (B, H, m, D)
        del kv, k, v
        q = F.linear(x, weight[:c], None if bias is None else bias[:c]).view(b, n, h, d).transpose(1, 2)
        return self.merge(self._stage_two(q, k_h, v_h, keep))

    def attend(self, q, k, v, keep, **extra):
        k_h, v_h = self.split_summary(self.summarize(k, v, keep, sdpa_zero_empty_rows))  # 2 x (B, H, m, D)
        return self._stage_two(q, k_h, v_h, keep)

    @staticmethod
    def _stage_two(q, k_h, v_h, keep) -> torch.Tensor:
        """Every token attends to the m rows of H: [B, H, N, D]; an example with no real token: zeros."""
        out = F.scaled_dot_product_attention(q, k_h, v_h)  # (B, H, N, D)
        return out if keep is None else out * keep.any(dim=1)[:, None, None, None]

    def summarize(self, k, v, keep, attention) -> torch.Tensor:
        """H = MAB(I, X) from X's keys and values [B, H, N, D] -> [B, m, C]. `attention(q, k, v, mask,
        scale)` is the kernel (the fused one, or the dense oracle)."""
        b, h, _, d = k.shape
        m, c = self.config.num_inducing, self.config.dim
        q_i = self.inducing_q(self.inducing).view(m, h, d).transpose(0, 1)  # (H, m, D)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, N)
        a = attention(q_i.expand(b, h, m, d), k, v, mask, None)  # (B, H, m, D); no real key: zeros
        a = a.transpose(1, 2).reshape(b, m, c)
        h1 = self.inducing_norm(self.inducing + self.inducing_out(a))  # H'
        return self.summary_norm(h1 + F.relu(self.inducing_ff(h1)))  # H

    def split_summary(self, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, _ = summary.shape
        kv = self.summary_kv(summary).view(b, m, 2, self.config.heads, self.config.head_dim)
        k_h, v_h = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, m, D)
        return k_h, v_h

    # -- cost -----------------------------------------------------------------------------------------
    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """Projections of the n tokens; the two attentions (m × n and n × m pairs per head); the
        linear maps of the m inducing rows (their queries, output projection, rFF, keys and values:
        5·m·C², counted under `other`)."""
        cfg = self.config
        m, c = cfg.num_inducing, cfg.dim
        return pairwise(cfg.heads * 2 * n * m, cfg.head_dim, self.projection_macs(n), other=5 * m * c * c)

    # -- the oracle -----------------------------------------------------------------------------------
    def reference_attend(self, q, k, v, keep):
        """Both attentions through the dense softmax oracle (explicit score matrices)."""

        def dense(q_, k_, v_, mask, scale):
            return reference_attention(q_, k_, v_, mask, scale=scale)

        k_h, v_h = self.split_summary(self.summarize(k, v, keep, dense))
        out = reference_attention(q, k_h, v_h)
        if keep is not None:
            out = torch.where(keep.any(dim=1)[:, None, None, None], out, torch.zeros_like(out))
        return out

    @classmethod
    def test_configs(cls):
        return [{"num_inducing": 4}, {"num_inducing": 1}, {"num_inducing": 9, "bias": False}]
