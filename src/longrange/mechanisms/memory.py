"""`xl` and `compressive`: segment-level recurrence with relative positions (Transformer-XL, Dai et al.
2019) and its compressed memory (Compressive Transformer, Rae et al. 2020).

A layer attends from its current segment x [B, n, C] to [memory ; x], where `memory` [B, M, C] holds
the layer's *input* hidden states of past segments (the model keeps and passes them, detached; see
`longrange.models.memory`). Memory keys and values come from the layer's own K and V projections.
With L = M + n keys, query i (at position M + i) and key j (at position j) score

    score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r r_{M+i-j}           (then · 1/√D, softmax over j)

r_d is the sinusoid of the distance d, W_r a learned C x C map, u and v learned [H, D] biases (XL's
r_w_bias and r_r_bias, one pair per layer as in XL's released code with untie_r=True). The segment
runs on a rectangular block layout (n queries at M .. M + n - 1 among the L keys: causal tiles past
the diagonal are skipped) on the config's `backend` (`longrange.sparse.backends`: the engine, or
FlexAttention): the first term with q + u as the query; the second as an additive score term read
from the table (q + v) · (W_r r)ᵀ of the R distinct distances ([B, H, n, R]): flex's `score_mod`
(`sparse.score.distance_table`) and the engine's per-chunk bias (`DistanceBias`, whose table gets
its gradient in the engine's backward). Nothing [n, L]-sized is built beyond one chunk's scores.
Cost per segment O(n·(M + n)).

Causal (default): query i sees every memory slot and segment keys j <= i; `span` limits the distance
M + i - j <= span; `clamp_len` encodes distances beyond it as clamp_len (XL's clamp). Without
memory a layer is a causal (or bidirectional) attention with the relative bias.

`compressive` adds a compression network per layer (`compression`: max / mean pooling, conv or
dilated conv, rate c = `compression_rate`) that turns memories falling out of the FIFO into
compressed memories; the model attends over [compressed ; memory ; segment] (one memory to this
module: `compressed_memory` is put in front of `memory`). `reconstruction_loss` is the paper's
attention-reconstruction loss, on stop-gradient inputs and weights: only the compression network
gets its gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from longrange.core.config import AttentionConfig, check_nonnegative_int, check_positive_int
from longrange.core.flops import MacCount
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import check_key_padding_mask
from longrange.patterns.band import INF, Band
from longrange.sparse.backends import Decision, call_records_grad, check_backend, decide, run_layout
from longrange.sparse.bias import ScoreBias
from longrange.sparse.layout import BlockLayout, compile_layout
from longrange.sparse.score import distance_table

COMPRESSIONS = ("max", "mean", "conv", "dilated_conv")


# -- configs ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class XLConfig(AttentionConfig):
    name = "xl"
    causal: bool = True
    mem_len: int = 128  # past positions a model keeps per layer (the module takes any memory length)
    span: int | None = None  # None: every memory slot and earlier token; k: only distances <= k
    clamp_len: int | None = None  # distances above it share clamp_len's encoding (XL's clamp_len)
    tile: int = 128  # the kernel's tile on the segment's layout (not part of the graph; 64: 1.1x slower
    # fwd+bwd at 512 tokens and 512 memory slots, 768 / 12)
    backend: str = "auto"  # "auto" | "engine" | "flex": what runs the segment (longrange.sparse.backends)

    def validate(self) -> None:
        super().validate()
        check_backend(self.backend)
        check_positive_int("tile", self.tile)
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if self.dim % 2:
            raise ValueError(f"{self.name} needs an even dim (sinusoid of sin/cos pairs), got dim={self.dim}")
        check_nonnegative_int("mem_len", self.mem_len)
        for key in ("span", "clamp_len"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key))


@dataclasses.dataclass
class CompressiveConfig(XLConfig):
    name = "compressive"
    compression: str = "conv"  # max, mean (pooling), conv (kernel = stride = c), dilated_conv
    compression_rate: int = 4  # c: old memories per compressed memory
    cmem_len: int = 128  # compressed memories a model keeps per layer

    def validate(self) -> None:
        super().validate()
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {self.compression!r}")
        check_positive_int("compression_rate", self.compression_rate)
        check_nonnegative_int("cmem_len", self.cmem_len)
        check_rate_divides("mem_len", self.mem_len, self.compression_rate)


def check_rate_divides(name: str, length: int, rate: int) -> None:
    if length % rate:
        raise ValueError(f"compression_rate={rate} must divide {name}={length} (memories leave the FIFO in "
                         f"groups of compression_rate); use {name}={length - length % rate or rate}")


# -- relative positions ------------------------------------------------------------------------------
def sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """XL's relative encoding: [R] distances -> [R, dim] = [sin(d·f) ; cos(d·f)], f = 10000^(-2k/dim).
    Elementwise products only (float64), so no matmul hides here."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=distances.device) / dim)
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]  # (R, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (R, dim)


def distance_range(n: int, length: int, causal: bool) -> tuple[int, int]:
    """(largest, smallest) distance M + i - j between n queries and `length` keys (M = length - n)."""
    return length - 1, (0 if causal else -(n - 1))


def allowed_keys(n: int, length: int, causal: bool, span: int | None, device) -> torch.Tensor:
    """[n, L] bool: query i (position M + i) may see key j (position j)."""
    dist = (torch.arange(n, device=device)[:, None] + (length - n)) - torch.arange(length, device=device)[None, :]
    allowed = torch.ones(n, length, dtype=torch.bool, device=device)
    if causal:
        allowed &= dist >= 0
    if span is not None:
        allowed &= dist.abs() <= span
    return allowed


def check_memory(x: torch.Tensor, memory, memory_mask, name: str = "memory", mask_name: str = "memory_mask"):
    """memory [B, M, C] (or None / M = 0) and memory_mask [B, M] bool -> (memory or None, mask or None)."""
    if memory is None:
        if memory_mask is not None:
            raise ValueError(f"{mask_name} was given without {name}")
        return None, None
    b, _, c = x.shape
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or memory.shape[0] != b or memory.shape[2] != c:
        got = list(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(f"{name} must be [B, M, C] = [{b}, M, {c}] (the layer's past inputs), got {got}")
    if memory.dtype != x.dtype or memory.device != x.device:
        raise TypeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"{memory.dtype}, {memory.device}")
    mask = check_key_padding_mask(memory_mask, b, memory.shape[1], mask_name)
    if memory.shape[1] == 0:
        return None, None
    return memory, mask


def join_masks(masks: list[torch.Tensor | None], lengths: list[int]) -> torch.Tensor | None:
    """Concatenate [B, l] key masks (None = all real) along the length; None when all are None."""
    if all(m is None for m in masks):
        return None
    ref = next(m for m in masks if m is not None)
    parts = [m if m is not None else torch.ones(ref.shape[0], n, dtype=torch.bool, device=ref.device)
             for m, n in zip(masks, lengths, strict=True)]
    return torch.cat(parts, dim=1)


# -- the module -------------------------------------------------------------------------------------
class XLAttention(Attention):
    """Transformer-XL attention. forward(x [B, n, C], attention_mask [B, n] = None, *, memory [B, M, C]
    = None, memory_mask [B, M] = None) -> [B, n, C]; masks are True = real token."""

    config_class = XLConfig
    capabilities = Capabilities(causal=True, inputs=("memory", "memory_mask"))
    applies_attention_dropout = True  # XL's dropatt, in training: the engine's hashed dropout
    #: takes `memory=` (the model's recurrence path reads this)

    def __init__(self, config: XLConfig):
        super().__init__(config)
        c, h, d = config.dim, config.heads, config.head_dim
        self.r_net = nn.Linear(c, c, bias=False)  # W_r: sinusoid -> per-head position keys
        self.content_bias = nn.Parameter(torch.randn(h, d) * 0.02)  # u (XL's r_w_bias)
        self.position_bias = nn.Parameter(torch.randn(h, d) * 0.02)  # v (XL's r_r_bias)
        self._layouts: dict[tuple[int, int, str], BlockLayout] = {}

    # -- the call --------------------------------------------------------------------------------
    def forward(self, x, attention_mask=None, *, memory=None, memory_mask=None):
        keep = self.check_input(x, attention_mask)
        memory, memory_mask = check_memory(x, memory, memory_mask)
        m = 0 if memory is None else memory.shape[1]
        q, k, v = self.project_with_memory(x, memory)
        return self.merge(self.attend(q, k, v, join_masks([memory_mask, keep], [m, x.shape[1]])))

    def project_with_memory(self, x, memory):
        """q [B, H, n, D] from x; k, v [B, H, M + n, D] from [memory ; x] (memory through the K and V
        rows of the fused projection only: 2·M·C² MACs, no query for memory slots)."""
        q, k, v = self.project(x)
        if memory is None:
            return q, k, v
        b, m, c = memory.shape
        w, bias = self.qkv.weight[c:], None if self.qkv.bias is None else self.qkv.bias[c:]
        kv = F.linear(memory, w, bias).view(b, m, 2, self.config.heads, self.config.head_dim)
        km, vm = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, M, D)
        return q, torch.cat([km, k], dim=2), torch.cat([vm, v], dim=2)  # k, v: (B, H, M + n, D)

    def attend(self, q, k, v, keep, **extra):
        """q [B, H, n, D]; k, v [B, H, L, D] (L = M + n, memory first); keep [B, L] bool or None.
        The segment's layout on the config's backend, the position term as a score term."""
        n, length = q.shape[2], k.shape[2]
        scale = q.shape[-1] ** -0.5
        table = self.position_table(q, length)  # (B, H, n, R), unscaled
        d_max, m = length - 1, length - n
        query = q + self.content_bias[:, None].to(q.dtype)  # (B, H, n, D)
        return run_layout(query, k, v, self.segment_layout(n, length, q.device), keep, backend=self.backend,
                          score=distance_table(table, d_max, q_offset=m, scale=scale),
                          score_bias=DistanceBias(table.transpose(1, 2) * scale, d_max, m),
                          dropout_p=self.config.dropout if self.training else 0.0, who=self.config.name)

    # -- the segment's layout and its backend ----------------------------------------------------------
    def segment_pattern(self) -> Band:
        """Which keys a query sees, by distance d = (its position) - (key position): d >= 0 when
        causal, |d| <= span when given."""
        c = self.config
        hi = INF if c.span is None else c.span
        lo = 0 if c.causal else -hi
        return Band(lo, hi)

    def segment_layout(self, n: int, length: int, device) -> BlockLayout:
        """n queries at positions length - n .. length - 1 among `length` keys, on tiles of `tile`
        tokens (of n, when the segment is shorter: no padded query rows)."""
        key = (n, length, str(device))
        if key not in self._layouts:
            self._layouts[key] = compile_layout(self.segment_pattern(), n, min(self.config.tile, n), n_kv=length,
                                                q_offset=length - n).to(device)
        return self._layouts[key]

    @property
    def backend(self) -> str:
        return self.config.backend

    def decide_backend(self, x: torch.Tensor, memory_len: int = 0, **inputs) -> Decision:
        """The backend a segment of x with `memory_len` memory slots runs on, and why."""
        n = x.shape[1]
        needs_grad = call_records_grad(self, x)
        engine_only = "the position table trains (the engine's ScoreBias backward)" if needs_grad else None
        return decide(x, self.segment_layout(n, memory_len + n, x.device), self.backend, needs_grad=needs_grad,
                      dropout_p=self.config.dropout if self.training else 0.0, engine_only=engine_only)

    def explain(self, x: torch.Tensor, memory_len: int = 0, **inputs) -> str:
        try:
            verdict = str(self.decide_backend(x, memory_len))
        except ValueError as err:
            verdict = f"error: {err}"
        mode = "training (autograd)" if call_records_grad(self, x) else "inference"
        return (f"{self.config.name} (backend={self.backend!r}) at n={x.shape[1]} with {memory_len} memory slots "
                f"on {x.device.type} {str(x.dtype).removeprefix('torch.')}, {mode}: {verdict}")

    def position_table(self, q, length: int) -> torch.Tensor:
        """(q_i + v)·W_r r_d for the R distinct distances d = d_max .. d_min: [B, H, n, R], unscaled
        (column c is distance d_max - c)."""
        rel = self.position_keys(q.shape[2], length, q)  # (H, D, R)
        return torch.matmul(q + self.position_bias[:, None].to(q.dtype), rel)  # (B, H, n, R)

    def position_scores(self, q, length: int) -> torch.Tensor:
        """(q_i + v)·W_r r_{M+i-j} for every (i, j): [B, H, n, L], unscaled, via one gather."""
        n = q.shape[2]
        bd = self.position_table(q, length)  # (B, H, n, R)
        # column of distance M + i - j is d_max - (M + i - j) = (n - 1 - i) + j; future keys (causal)
        # fall past the last column: clamped here, masked by the caller
        col = (n - 1 - torch.arange(n, device=q.device))[:, None] + torch.arange(length, device=q.device)[None, :]
        col = col.clamp_(max=bd.shape[-1] - 1)  # (n, L)
        return torch.gather(bd, -1, col.expand(*bd.shape[:2], n, length))  # (B, H, n, L)

    def position_keys(self, n: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """W_r r_d for the distances d_max, d_max - 1, .., d_min: [H, D, R]."""
        hi, lo = distance_range(n, length, self.config.causal)
        dist = torch.arange(hi, lo - 1, -1, device=like.device)  # (R,)
        if self.config.clamp_len is not None:
            dist = dist.clamp(-self.config.clamp_len, self.config.clamp_len)
        r = self.r_net(sinusoid(dist, self.config.dim).to(like.dtype))  # (R, C)
        return r.view(-1, self.config.heads, self.config.head_dim).permute(1, 2, 0)  # (H, D, R)

    # -- cost -------------------------------------------------------------------------------------
    def projection_macs(self, n: int, memory_len: int = 0) -> int:
        """Q, K, V, output for the segment (4·n·C²), K and V for the memory (2·M·C²) and W_r on the R
        distances (R·C²; R = M + n causal, M + 2n - 1 bidirectional)."""
        hi, lo = distance_range(n, memory_len + n, self.config.causal)
        return (4 * n + 2 * memory_len + hi - lo + 1) * self.config.dim**2

    def macs(self, n: int, memory_len: int = 0, **extra) -> MacCount:
        """One segment of n tokens with `memory_len` memory slots: the pairs of the segment layout's
        tiles (whole tiles, masked pairs in them too; causal tiles past the diagonal skipped), plus
        the position products (q + v)·W_r r over n x R."""
        if extra:
            raise TypeError(f"{self.config.name}.macs got unknown argument(s) {sorted(extra)}")
        cfg = self.config
        length = memory_len + n
        hi, lo = distance_range(n, length, cfg.causal)
        pairs = cfg.heads * self.segment_layout(n, length, "cpu").computed_pairs()
        return MacCount(projections=self.projection_macs(n, memory_len), scores=pairs * cfg.head_dim,
                        weighted=pairs * cfg.head_dim, other=n * (hi - lo + 1) * cfg.dim, exps=pairs, pairs=pairs)

    # -- the oracle's view --------------------------------------------------------------------------
    def dense_mask(self, n: int) -> torch.Tensor:
        return allowed_keys(n, n, self.config.causal, self.config.span, "cpu")

    def reference_forward(self, x, attention_mask=None, *, memory=None, memory_mask=None):
        """The same layer written out densely: Q, K, V of [memory ; x] through the whole fused projection,
        W_r r_{M+i-j} materialised for every pair ([n, L, C]), softmax in float32/64."""
        keep = self.check_input(x, attention_mask)
        memory, memory_mask = check_memory(x, memory, memory_mask)
        m = 0 if memory is None else memory.shape[1]
        return self.reference_over(x, memory, join_masks([memory_mask, keep], [m, x.shape[1]]))

    def reference_over(self, x, memory, keep):
        h = x if memory is None else torch.cat([memory, x], dim=1)  # (B, L, C)
        b, length, _ = h.shape
        qkv = self.qkv(h).view(b, length, 3, self.config.heads, self.config.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        return self.merge(self.reference_attend(q[:, :, length - x.shape[1] :], k, v, keep))  # segment queries

    def reference_attend(self, q, k, v, keep):
        """The oracle for `attend`: q [B, H, n, D], k, v [B, H, L, D] (memory first), keep [B, L]."""
        n, length = q.shape[2], k.shape[2]
        i, j = torch.arange(n, device=q.device)[:, None], torch.arange(length, device=q.device)[None, :]
        dist = (length - n + i - j).flatten()
        if self.config.clamp_len is not None:
            dist = dist.clamp(-self.config.clamp_len, self.config.clamp_len)
        r = self.r_net(sinusoid(dist, self.config.dim).to(q.dtype)).view(n, length, self.config.heads, -1)  # (n,L,H,D)
        u, pv = self.content_bias[:, None], self.position_bias[:, None]  # (H, 1, D)
        scores = torch.einsum("bhid,bhjd->bhij", q + u, k) + torch.einsum("bhid,ijhd->bhij", q + pv, r)
        allowed = allowed_keys(n, length, self.config.causal, self.config.span, q.device)[None, None]
        if keep is not None:
            allowed = allowed & keep[:, None, None, :]
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = (scores.to(compute) / math.sqrt(self.config.head_dim)).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zeros
        return (probs @ v.to(compute)).to(q.dtype)

    @classmethod
    def test_configs(cls):
        return [{"mem_len": 8}, {"causal": False}, {"span": 5, "clamp_len": 6}]


# -- compression ----------------------------------------------------------------------------------------
class Compression(nn.Module):
    """[B, m, C] -> [B, m / c, C]: max / mean pooling, or a conv (kernel c, stride c), or a dilated conv
    (kernel c, dilation 2, stride c, c - 1 zeros on the left: output k sees slots k·c - c + 1 ..
    k·c + c - 1, every second one). The convs start as mean pooling (weights I / c, bias 0)."""

    def __init__(self, kind: str, rate: int, dim: int):
        super().__init__()
        if kind not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {kind!r}")
        self.kind, self.rate = kind, rate
        self.conv = None
        if kind in ("conv", "dilated_conv"):
            self.conv = nn.Conv1d(dim, dim, kernel_size=rate, stride=rate, dilation=2 if kind == "dilated_conv" else 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(dim)[:, :, None].expand(dim, dim, rate) / rate)
                self.conv.bias.zero_()

    def forward(self, old: torch.Tensor) -> torch.Tensor:
        b, m, c = old.shape
        if m % self.rate:
            raise ValueError(f"compression_rate={self.rate} must divide the {m} memories to compress")
        t = old.transpose(1, 2)  # (B, C, m)
        if self.kind == "max":
            out = F.max_pool1d(t, self.rate)
        elif self.kind == "mean":
            out = F.avg_pool1d(t, self.rate)
        else:
            if self.kind == "dilated_conv":
                t = F.pad(t, (self.rate - 1, 0))  # (B, C, c - 1 + m)
            out = self.conv(t)
        return out.transpose(1, 2)  # (B, m / c, C)

    def macs(self, m: int) -> int:
        """MACs to compress m memories (the convs: C·C·c per output slot, c per channel at each of
        m / c slots; pooling: none)."""
        if self.conv is None:
            return 0
        return (m // self.rate) * self.conv.in_channels * self.conv.out_channels * self.rate


class CompressiveAttention(XLAttention):
    """XL attention over [compressed_memory ; memory ; x] plus the compression network of its layer.

    forward(x, attention_mask=None, *, memory=None, memory_mask=None, compressed_memory [B, Mc, C] =
    None, compressed_mask [B, Mc] = None). `compress(old)` and `reconstruction_loss(h, old)` are
    what the model's memory update calls."""

    config_class = CompressiveConfig

    def __init__(self, config: CompressiveConfig):
        super().__init__(config)
        self.compression = Compression(config.compression, config.compression_rate, config.dim)

    def forward(self, x, attention_mask=None, *, memory=None, memory_mask=None, compressed_memory=None,
                compressed_mask=None):
        memory, memory_mask = self.joined_memory(x, memory, memory_mask, compressed_memory, compressed_mask)
        return super().forward(x, attention_mask, memory=memory, memory_mask=memory_mask)

    def reference_forward(self, x, attention_mask=None, *, memory=None, memory_mask=None, compressed_memory=None,
                          compressed_mask=None):
        memory, memory_mask = self.joined_memory(x, memory, memory_mask, compressed_memory, compressed_mask)
        return super().reference_forward(x, attention_mask, memory=memory, memory_mask=memory_mask)

    def joined_memory(self, x, memory, memory_mask, compressed, compressed_mask):
        """[compressed ; memory] as one memory for the XL attention (and its mask)."""
        compressed, compressed_mask = check_memory(x, compressed, compressed_mask, "compressed_memory",
                                                   "compressed_mask")
        memory, memory_mask = check_memory(x, memory, memory_mask)
        if compressed is None:
            return memory, memory_mask
        if memory is None:
            return compressed, compressed_mask
        mask = join_masks([compressed_mask, memory_mask], [compressed.shape[1], memory.shape[1]])
        return torch.cat([compressed, memory], dim=1), mask

    def compress(self, old: torch.Tensor) -> torch.Tensor:
        """Memories leaving the FIFO [B, m, C] (m a multiple of compression_rate) -> [B, m / c, C]."""
        return self.compression(old)

    def reconstruction_loss(self, h: torch.Tensor, old: torch.Tensor,
                            compressed: torch.Tensor | None = None) -> torch.Tensor:
        """Rae et al.'s attention-reconstruction loss ||attn(h, old) - attn(h, compress(old))||² (mean
        over elements) with attn(h, m) = softmax((h Q)(m K)ᵀ / √D)(m V) per head, content only, all of
        h, old and Q, K, V under stop-gradient: only the compression network gets a gradient.
        h [B, n, C] (the segment the layer attends from), old [B, m, C]; `compressed`: compress(old)
        when already computed."""
        h, old = h.detach(), old.detach()
        compressed = self.compress(old) if compressed is None else compressed
        c, heads, d = self.config.dim, self.config.heads, self.config.head_dim
        w = self.qkv.weight.detach()
        bias = None if self.qkv.bias is None else self.qkv.bias.detach()
        q = F.linear(h, w[:c], None if bias is None else bias[:c])  # (B, n, C)
        q = q.view(*h.shape[:2], heads, d).transpose(1, 2)  # (B, H, n, D)

        def attend(m):  # content-only attention of q over m [B, m, C] -> (B, H, n, D)
            kv = F.linear(m, w[c:], None if bias is None else bias[c:])  # (B, m, 2C)
            k, v = kv.view(*m.shape[:2], 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, m, D)
            return F.scaled_dot_product_attention(q, k, v)

        return F.mse_loss(attend(compressed), attend(old))

    def macs(self, n: int, memory_len: int = 0, compressed_len: int = 0, **extra) -> MacCount:
        """One segment over [compressed (compressed_len) ; memory (memory_len) ; segment (n)]."""
        return super().macs(n, memory_len + compressed_len, **extra)

    def compression_macs(self, n: int, old: int) -> int:
        """MACs of one memory update that compresses `old` memories for a segment of n tokens: the
        compression and the reconstruction loss (Q for n, K, V for old and old / c, two attentions)."""
        c, cm = self.config.dim, old // self.config.compression_rate
        return (self.compression.macs(old) + n * c * c + 2 * (old + cm) * c * c + 2 * n * (old + cm) * c)

    @classmethod
    def test_configs(cls):
        return [{"compression": "conv", "compression_rate": 2, "mem_len": 8, "cmem_len": 4},
                {"causal": False, "compression": "max"},
                {"span": 5, "compression": "dilated_conv", "compression_rate": 2, "mem_len": 4}]


class DistanceBias(ScoreBias):
    """XL's position term for the engine: table[b, i, h, d_max - (M + i - j)] for query i (position
    M + i) and key j, with the table's gradient (the engine slices its rows per chunk and hands each
    chunk's dS to `backward`, a scatter-add into those rows). table [B, n, H, R] (query rows on axis
    1, already scaled), column c for distance d_max - c (clamped: future keys, masked anyway)."""

    def __init__(self, table: torch.Tensor, d_max: int, q_offset: int):
        self.inputs = (table,)
        self.d_max, self.q_offset = d_max, q_offset

    def columns(self, q_tok, kv_tok, rows) -> torch.Tensor:
        """[B, R, H, r, c] long: the table column of each scored pair."""
        b, groups, r, h, width = rows.shape
        kv = kv_tok[0]  # (R, c): one key layout for every head
        col = (self.d_max - (q_tok[:, :, None] + self.q_offset - kv[:, None, :])).clamp(0, width - 1)  # (R, r, c)
        return col[None, :, None].expand(b, groups, h, r, col.shape[-1])

    def __call__(self, q_tok, kv_tok, rows):  # rows (B, R, r, H, Rd)
        return torch.gather(rows.transpose(2, 3), 4, self.columns(q_tok, kv_tok, rows))  # (B, R, H, r, c)

    def backward(self, dscores, q_tok, kv_tok, rows):
        """dS [B, R, H, r, c] summed into the table columns its pairs read -> [B, R, r, H, Rd]."""
        grad = torch.zeros(rows.shape, dtype=dscores.dtype, device=dscores.device)
        grad.transpose(2, 3).scatter_add_(4, self.columns(q_tok, kv_tok, rows), dscores)
        return (grad,)
