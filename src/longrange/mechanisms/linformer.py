"""`linformer`: low-rank attention over learned projections of the sequence axis (Wang et al. 2020).

Keys and values [N, D] are compressed to [k, D] by learned matrices E and F (k × N), then every
query attends to the k compressed keys: O(N·k) time and memory instead of O(N²).

Sharing options of the paper (`sharing`):
- "none": one E and one F per head (E, F: [H, k, N]);
- "headwise": one E and one F shared by all heads of the layer (the default);
- "kv": a single matrix used as both E and F, shared by all heads;
- layer-wise: one E shared by every layer of a model, by tying modules with `share_projections`
  (the model builder does this; a model config only names it).

Lengths: the module holds E, F for `seq_len` positions. A shorter input uses their first N
columns (as fairseq does); a longer one is a ValueError naming `seq_len`.

Padding: padded tokens are zeroed before the projection, so their content never reaches the
output. (They still widen nothing: compressed keys are mixtures of real keys only.)

Fast path: with shared (headwise/kv) projections E·K = E·(X W_k + b_k) = (E·X)·W_k + (E·1)·b_k, so
the module compresses the [N, C] input once and projects only k rows to keys and values,
instead of projecting all N tokens: the K and V projections shrink from 2·N·C² to 2·k·C² MACs.

Training is plain autograd, with no recomputing Function: besides the input and the queries it
keeps only [k, C]-sized compressed keys and values (SDPA's fused kernel keeps its output and
log-sum-exp, not its scores), so there is nothing of size N·k to save; measured at 16K the layer's
training peak is below the dense SDPA layer's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.dtypes import compute_dtype
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import check_key_padding_mask, check_qkv
from longrange.core.reference import reference_attention

SHARING = ("none", "headwise", "kv")


def linformer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    E: torch.Tensor,
    F_: torch.Tensor | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q (E k)ᵀ · scale) (F v): attention over k compressed keys and values.

    q, k, v: [B, H, N, D]. E, F_: [k, M] (shared by heads) or [H, k, M] (per head), M >= N; only
    the first N columns are used. F_=None uses E for values too (key-value sharing).
    key_padding_mask: [B, N] bool, True = real: padded keys and values are zeroed before the
    projection. Returns [B, H, N, D] in q's dtype.
    """
    check_qkv(q, k, v)
    b, h, n, _ = q.shape
    keep = check_key_padding_mask(key_padding_mask, b, n, "key_padding_mask")
    E = _check_projection("E", E, n, h)
    F_ = E if F_ is None else _check_projection("F", F_, n, h)
    if keep is not None:
        k = k * keep[:, None, :, None]
        v = v * keep[:, None, :, None]
    k_low, v_low = compress(E, k), compress(F_, v)  # [B, H, k, D]
    return F.scaled_dot_product_attention(q, k_low, v_low, scale=scale)


def compress(P: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """P [k, N] or [H, k, N] applied along the sequence axis of t [B, H, N, D] -> [B, H, k, D].
    fp16/bf16 inputs are summed in float32 (N terms with cancellation) and cast back."""
    compute = compute_dtype(t.dtype)
    P, t_c = P.to(compute), t.to(compute)
    out = torch.matmul(P, t_c) if P.dim() == 3 else torch.matmul(P[None, None], t_c)
    return out.to(t.dtype)


def _check_projection(name: str, P: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    if not isinstance(P, torch.Tensor) or P.dim() not in (2, 3):
        shape = list(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
        raise ValueError(f"{name} must be [k, M] or [H, k, M] with M >= N = {n}, got {shape}")
    if P.dim() == 3 and P.shape[0] != heads:
        raise ValueError(f"{name} per head must be [H, k, M] with H = {heads}, got {list(P.shape)}")
    if P.shape[-1] < n:
        raise ValueError(f"{name} covers {P.shape[-1]} positions but the input has N = {n} (need M >= N)")
    return P[..., :n]


@dataclasses.dataclass
class LinformerConfig(AttentionConfig):
    name = "linformer"
    seq_len: int = 4096  # the longest input; shorter ones use the first N columns of E and F
    k: int = 256  # compressed length
    sharing: str = "headwise"  # "none" (per head), "headwise", or "kv" (E = F, shared by heads)

    def validate(self):
        super().validate()
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("k", self.k)
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {self.sharing!r}")


class LinformerAttention(Attention):
    config_class = LinformerConfig
    capabilities = Capabilities(length_options=("seq_len",))

    def __init__(self, config: LinformerConfig):
        super().__init__(config)
        shape = (config.heads, config.k, config.seq_len) if config.sharing == "none" else (config.k, config.seq_len)
        self.proj_k = nn.Parameter(_init_projection(shape))
        self.proj_v = None if config.sharing == "kv" else nn.Parameter(_init_projection(shape))

    def share_projections(self, other: LinformerAttention) -> None:
        """Layer-wise sharing: use `other`'s E (and F) here, the same Parameter objects."""
        if not isinstance(other, LinformerAttention) or other.proj_k.shape != self.proj_k.shape:
            raise ValueError("share_projections needs a LinformerAttention with the same k, seq_len and sharing")
        self.proj_k, self.proj_v = other.proj_k, other.proj_v

    @property
    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj_k, (self.proj_k if self.proj_v is None else self.proj_v)

    def check_length(self, n: int) -> None:
        if n > self.config.seq_len:
            raise ValueError(
                f"linformer was built for seq_len={self.config.seq_len} tokens, got an input of length {n}; "
                "build it with a larger seq_len"
            )

    # -- the call ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = self.check_input(x, attention_mask)
        self.check_length(x.shape[1])
        if self.config.sharing == "none":  # per-head E: compress after projecting
            q, k, v = self.project(x)
            return self.merge(self.attend(q, k, v, keep))
        return self.merge(self._attend_compressed_input(x, keep))

    def attend(self, q, k, v, keep, **extra):
        self.check_length(q.shape[2])
        E, F_ = self.projections
        return linformer(q, k, v, E, F_, key_padding_mask=keep)

    def _attend_compressed_input(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Shared projections: compress x [B, N, C] to [B, k, C] first, then project k rows."""
        n = x.shape[1]
        E, F_ = (p[:, :n] for p in self.projections)  # [k, N]
        w_q, w_k, w_v = self.qkv.weight.chunk(3, dim=0)  # [C, C] each
        b_q, b_k, b_v = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None, None, None)
        q = self.split_heads(F.linear(x, w_q, b_q))  # [B, H, N, D]
        if keep is not None:
            x = x * keep[..., None]  # padded tokens never reach keys or values
        ex, mass_e = _compress_input(E, x, keep)  # [B, k, C], [1 or B, k]
        fx, mass_f = (ex, mass_e) if self.proj_v is None else _compress_input(F_, x, keep)
        k_low = _affine(ex, w_k, b_k, mass_e)  # (E x) W_kᵀ + (E·keep) b_k = E (x W_kᵀ + b_k)
        v_low = _affine(fx, w_v, b_v, mass_f)
        return F.scaled_dot_product_attention(q, self.split_heads(k_low), self.split_heads(v_low))

    def macs(self, n: int, **extra) -> MacCount:
        """The path `forward` takes: shared projections compress x first (k rows projected to K, V)."""
        cfg = self.config
        c, k = cfg.dim, min(cfg.k, n)
        pairs = cfg.heads * n * k
        if cfg.sharing == "none":  # project all tokens, then compress per head
            return pairwise(pairs, cfg.head_dim, self.projection_macs(n), other=2 * k * n * c)
        compressed = 1 if self.proj_v is None else 2  # E x (and F x)
        projections = 2 * n * c * c + 2 * k * c * c  # q and output for n tokens; K and V for k rows
        return pairwise(pairs, cfg.head_dim, projections, other=compressed * k * n * c)

    # -- the oracle ----------------------------------------------------------------------------------
    def reference_attend(self, q, k, v, keep):
        """Written out: project every token, zero padding, compress with E and F, softmax."""
        n = q.shape[2]
        E, F_ = (p[..., :n] for p in self.projections)
        if keep is not None:
            k, v = k * keep[:, None, :, None], v * keep[:, None, :, None]
        spec = "hkn,bhnd->bhkd" if E.dim() == 3 else "kn,bhnd->bhkd"
        k_low = torch.einsum(spec, E.to(k.dtype), k)
        v_low = torch.einsum(spec, F_.to(v.dtype), v)
        return reference_attention(q, k_low, v_low)

    @classmethod
    def test_configs(cls):
        return [
            {"seq_len": 48, "k": 5},
            {"seq_len": 41, "k": 3, "sharing": "none"},
            {"seq_len": 64, "k": 4, "sharing": "kv", "bias": False},
        ]


def _compress_input(P, x, keep):
    """P [k, N], x [B, N, C] (padding zeroed) -> (P x [B, k, C], P·keep [1 or B, k]: how much of
    each compressed row is real, which carries the projection bias)."""
    compute = compute_dtype(x.dtype)  # sums of N terms
    P = P.to(compute)
    mass = P.sum(dim=-1)[None] if keep is None else torch.matmul(keep.to(compute), P.T)
    return torch.matmul(P, x.to(compute)).to(x.dtype), mass.to(x.dtype)


def _affine(px, weight, bias, mass) -> torch.Tensor:
    out = F.linear(px, weight)  # [B, k, C]
    return out if bias is None else out + mass[..., None] * bias


def _init_projection(shape) -> torch.Tensor:
    """Uniform(±1/√k): compressed keys keep the scale of the originals (as in the reference code)."""
    bound = 1 / math.sqrt(shape[-2])
    return torch.empty(shape).uniform_(-bound, bound)
