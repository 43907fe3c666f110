"""`memory_compressed`: memory-compressed attention (Liu et al. 2018, "Generating Wikipedia by
Summarizing Long Sequences", §4.2.4), optionally within local blocks.

After the Q/K/V projections the keys and values are shortened by a strided convolution over the
sequence (kernel = stride = `compression` c, over all C channels): slot t compresses tokens
t·c .. t·c + c - 1. The queries are not compressed:

    K̃ = Conv_k(K), Ṽ = Conv_v(V)           # [B, ⌈N/c⌉, C]
    out = softmax(Q K̃ᵀ / √D) Ṽ              # per head: [B, H, N, D]

`block_size` b: the sequence is cut into blocks of b tokens (b a multiple of c) and each block's
queries attend only to their own block's b / c slots. With c = 1 this is the paper's "local
attention" (its L layers, blocks of 256 tokens); with block_size None, the paper's M layers
("convolution kernels of size 3 with stride 3"), which exchange information over the whole input.

Causal (the paper's decoder-only T-DMCA): query i may see slot t only when every token of the
slot is at or before i, t·c + c - 1 <= i (Mesh TensorFlow's `mask_right` rule for this layer).
A query before its first complete slot (i < c - 1; in blocks, the first c - 1 queries of each
block) has no key and gets zeros. The last, partial slot (N not a multiple of c) is never visible
to a causal query. With c = 1 this is ordinary causal attention.

Padding: padded tokens' keys and values are zeroed before the convolution, so a slot that mixes
real and padded tokens compresses the real ones only; a slot with no real token is masked. For
the convolution the sequence is padded at the end with zeros to a multiple of c (or b); those
zeros are not tokens.

Cost per layer (batch 1): projections 4·N·C², the two convolutions 2·N'·C² (N' = N rounded up to
c, or to b), attention N·⌈N/c⌉·D per head (O(N²/c) time; memory O(N) through the fused kernel
when no mask is needed), or with blocks N'·(b/c)·D per head: linear in N.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.core.reference import reference_attention


@dataclasses.dataclass
class MemoryCompressedConfig(AttentionConfig):
    name = "memory_compressed"
    compression: int = 3  # the paper: "convolution kernels of size 3 with stride 3"
    block_size: int | None = None  # None: one memory over the whole input (the paper's M layers); b: local blocks
    causal: bool = False

    def validate(self):
        super().validate()
        check_positive_int("compression", self.compression)
        if self.block_size is not None:
            check_positive_int("block_size", self.block_size)
            if self.block_size % self.compression:
                raise ValueError(f"block_size={self.block_size} must be a multiple of compression="
                                 f"{self.compression} (each block compresses to block_size / compression slots)")


class MemoryCompressedAttention(Attention):
    config_class = MemoryCompressedConfig
    capabilities = Capabilities(causal=True)

    def __init__(self, config: MemoryCompressedConfig):
        super().__init__(config)
        c, rate = config.dim, config.compression
        self.compress_k = nn.Conv1d(c, c, rate, stride=rate, bias=config.bias)
        self.compress_v = nn.Conv1d(c, c, rate, stride=rate, bias=config.bias)

    @property
    def unit(self) -> int:
        """The length the sequence is padded to a multiple of: the block, or one slot."""
        return self.config.block_size or self.config.compression

    # -- the call ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attend` without the head-major round trip: keys and values are projected straight into the
        [B, N, C] layout the convolution reads and compressed one at a time, so neither N-long key nor
        value tensor outlives its convolution (without grad), and the queries are a view."""
        keep = self.check_input(x, attention_mask)
        b, n, c = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias

        def projected(i, masked=True):  # (B, N, C): rows [i·C, (i + 1)·C) of the fused projection
            t = F.linear(x, weight[i * c:(i + 1) * c], None if bias is None else bias[i * c:(i + 1) * c])
            return t if keep is None or not masked else t * keep[..., None]

        k_c = self._conv(self.compress_k, projected(1))  # (B, H, T, D)
        v_c = self._conv(self.compress_v, projected(2))
        q = projected(0, masked=False).view(b, n, self.config.heads, self.config.head_dim).transpose(1, 2)
        return self.merge(self.attend_slots(q, k_c, v_c, self.slot_real(keep, b, n, x.device)))

    def attend(self, q, k, v, keep, **extra):
        """The same on head-major q, k, v [B, H, N, D] (the generic path: funnel pooling, tests)."""
        b, h, n, d = k.shape
        if keep is not None:
            k, v = k * keep[:, None, :, None], v * keep[:, None, :, None]
        k_c, v_c = (self._conv(conv, t.transpose(1, 2).reshape(b, n, h * d))
                    for conv, t in ((self.compress_k, k), (self.compress_v, v)))
        return self.attend_slots(q, k_c, v_c, self.slot_real(keep, b, n, q.device))

    def attend_slots(self, q, k_c, v_c, slot_real) -> torch.Tensor:
        """Queries [B, H, N, D] against the slots [B, H, T, D] (real ones: slot_real [B, T] or None)."""
        if self.config.block_size is None:
            mask = self._global_mask(q.shape[2], k_c.shape[2], slot_real, q.device)
            return sdpa_zero_empty_rows(q, k_c, v_c, mask, None)  # (B, H, N, D)
        return self._blocks(q, k_c, v_c, slot_real)

    def slot_real(self, keep, b: int, n: int, device) -> torch.Tensor | None:
        """[B, T] bool: slots holding a real token (None: all of them). T = N padded to the unit, over c."""
        rate = self.config.compression
        padded = math.ceil(n / self.unit) * self.unit
        if keep is None and padded == n:
            return None
        real = torch.ones(b, n, dtype=torch.bool, device=device) if keep is None else keep
        return F.pad(real, (0, padded - n), value=False).view(b, padded // rate, rate).any(dim=-1)

    def _conv(self, conv: nn.Conv1d, t: torch.Tensor) -> torch.Tensor:
        """The strided convolution as one matmul over windows: [B, N, C] -> [B, H, T, D]."""
        b, n, c = t.shape
        rate = self.config.compression
        pad = (-n) % self.unit
        windows = (F.pad(t, (0, 0, 0, pad)) if pad else t).view(b, -1, rate * c)  # (B, T, c·C): token r at [r·C, ..)
        weight = conv.weight.permute(0, 2, 1).reshape(c, rate * c)  # [C_out, C_in, c] -> [C_out, c·C_in]
        out = F.linear(windows, weight, conv.bias)  # (B, T, C)
        return out.view(b, -1, self.config.heads, self.config.head_dim).transpose(1, 2).contiguous()

    def _global_mask(self, n, t, slot_real, device):
        """[B or 1, 1, N, T] bool (or None: nothing to mask): real slots, and the causal rule."""
        mask = None if slot_real is None else slot_real[:, None, None, :]
        if self.config.causal:
            allowed = slot_visible(torch.arange(n, device=device), torch.arange(t, device=device),
                                   self.config.compression)  # (N, T)
            mask = allowed[None, None] if mask is None else mask & allowed
        return mask

    def _blocks(self, q, k_c, v_c, slot_real):
        """Each block of b queries against its block's s = b / c slots, blocks folded into the heads:
        q [B, H·nb, b, D] against [B, H·nb, s, D], one fused call."""
        b_, h, n, d = q.shape
        size, rate = self.config.block_size, self.config.compression
        nb, s = k_c.shape[2] * rate // size, size // rate
        q = F.pad(q, (0, 0, 0, nb * size - n)).reshape(b_, h * nb, size, d)  # a copy (q may be a strided view)
        k_c, v_c = k_c.view(b_, h * nb, s, d), v_c.view(b_, h * nb, s, d)
        mask = None
        if slot_real is not None:
            mask = slot_real.view(b_, 1, nb, 1, s).expand(b_, h, nb, 1, s).reshape(b_, h * nb, 1, s)
        if self.config.causal:
            allowed = slot_visible(torch.arange(size, device=q.device), torch.arange(s, device=q.device), rate)
            mask = allowed if mask is None else mask & allowed
        out = sdpa_zero_empty_rows(q, k_c, v_c, mask, None)  # (B, H·nb, b, D)
        return out.view(b_, h, nb * size, d)[:, :, :n]

    # -- cost -----------------------------------------------------------------------------------------
    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """Projections for n tokens, the two convolutions over the padded length, and the pairs the
        fused kernel computes: n × T (global) or, with blocks, every padded block's b × b/c."""
        cfg = self.config
        c, rate = cfg.dim, cfg.compression
        padded = math.ceil(n / self.unit) * self.unit
        slots = padded // rate
        queries = n if cfg.block_size is None else padded
        keys = slots if cfg.block_size is None else cfg.block_size // rate
        conv = 2 * slots * rate * c * c
        return pairwise(cfg.heads * queries * keys, cfg.head_dim, self.projection_macs(n), other=conv)

    # -- the oracle -----------------------------------------------------------------------------------
    def dense_mask(self, n: int) -> torch.Tensor:
        """[n, T] bool: which slots each query may see (blocks and the causal rule; padding aside)."""
        rate, t = self.config.compression, math.ceil(n / self.unit) * self.unit // self.config.compression
        i, j = torch.arange(n)[:, None], torch.arange(t)[None, :]
        mask = torch.ones(n, t, dtype=torch.bool)
        if self.config.block_size is not None:
            mask &= (i // self.config.block_size) == (j * rate // self.config.block_size)
        if self.config.causal:
            mask &= slot_visible(torch.arange(n), torch.arange(t), rate)
        return mask

    def reference_attend(self, q, k, v, keep):
        """Written out: `F.conv1d` (kernel = stride = c) on the zero-padded keys and values, then
        softmax attention over the slots `dense_mask` allows that hold a real token."""
        b, h, n, d = q.shape
        rate, unit = self.config.compression, self.unit
        real = torch.ones(b, n, dtype=torch.bool, device=q.device) if keep is None else keep
        pad = (-n) % unit

        def conv(conv_, t):
            t = (t * real[:, None, :, None]).transpose(1, 2).reshape(b, n, h * d).transpose(1, 2)  # (B, C, N)
            out = F.conv1d(F.pad(t, (0, pad)), conv_.weight, conv_.bias, stride=rate)  # (B, C, T)
            return out.view(b, h, d, -1).transpose(-1, -2)  # (B, H, T, D)

        k_c, v_c = conv(self.compress_k, k), conv(self.compress_v, v)
        slot_real = F.pad(real, (0, pad), value=False).view(b, -1, rate).any(dim=-1)  # (B, T)
        mask = self.dense_mask(n).to(q.device)[None, None] & slot_real[:, None, None, :]
        return reference_attention(q, k_c, v_c, mask)

    @classmethod
    def test_configs(cls):
        return [
            {"compression": 3},
            {"compression": 2, "causal": True},
            {"compression": 3, "block_size": 6, "bias": False},
            {"compression": 2, "block_size": 4, "causal": True},
        ]


def slot_visible(query_pos: torch.Tensor, slot: torch.Tensor, rate: int) -> torch.Tensor:
    """The causal rule: [Nq, T] bool, True where slot t is made of tokens at or before the query
    (its last token t·c + c - 1 <= i)."""
    return slot[None, :] * rate + (rate - 1) <= query_pos[:, None]
