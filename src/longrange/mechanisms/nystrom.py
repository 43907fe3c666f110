"""`nystrom`: Nyströmformer (Xiong et al. 2021): softmax attention through m landmarks.

    softmax(Q Kᵀ) V  ≈  softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V
                        [N, m]          [m, m]                 [m, N]·[N, D]

Q̃, K̃ [m, D] are landmarks: means of m consecutive segments of the queries and keys. The
pseudo-inverse is the paper's iteration (Razavi et al.), started from Kᵀ / (‖K‖₁‖K‖∞).

Computed as two fused attention calls and one small product, never an [N, m] or [N, N] matrix:
    W  = SDPA(Q̃, K, V)          # [m, D]: softmax(Q̃ Kᵀ) V, over real keys
    W' = pinv(K2) · W           # [m, D]
    out = SDPA(Q, K̃, W')        # [N, D]: softmax(Q K̃ᵀ) W'
so time is O(N·m·D) and memory O(N·D + m²).

Lengths: N is padded at the end to a multiple of m (segments of ceil(N / m) tokens) and un-padded;
a landmark is the mean over its segment's *real* tokens. A landmark whose segment holds no real
token (padding, or N < m) is left out: its column is masked and its row and column of the m×m
kernel are the identity, so it contributes exactly nothing. With m = N and the exact
pseudo-inverse the result is exactly softmax attention (tested).

`conv_kernel`: the optional depthwise convolution of V along the sequence (one kernel per head)
added to the output, the paper's skip connection (off by default; lucidrains' package uses 33),
run by `sequence_conv` as banded matmuls: PyTorch's CPU convolution keeps a K·N·D column buffer
per head in backward, which made the skip the largest part of Nyström's training memory.

Training is plain autograd: what it keeps is the inputs, the two attention outputs (SDPA's fused
kernel recomputes its scores) and m×m landmark matrices (the pseudo-inverse iterations), so a
recomputing Function would save only those m×m products; measured at 16K the layer's training
peak is within 1.3x the dense SDPA layer's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from longrange.core.config import AttentionConfig, check_nonnegative_int, check_positive_int
from longrange.core.dtypes import compute_dtype
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention
from longrange.core.masking import check_key_padding_mask, check_qkv, pad_to_multiple, sdpa_zero_empty_rows


def nystrom(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_landmarks: int = 64,
    *,
    key_padding_mask: torch.Tensor | None = None,
    pinv_iterations: int | None = 6,
    scale: float | None = None,
) -> torch.Tensor:
    """Nyström approximation of softmax(q kᵀ · scale) v with `num_landmarks` segment-mean landmarks.

    q, k, v: [B, H, N, D]; key_padding_mask: [B, N] bool, True = real. pinv_iterations: steps of the
    iterative pseudo-inverse (None: the exact inverse). Returns [B, H, N, D]; a query
    with no real key gets zeros.
    """
    check_qkv(q, k, v)
    check_positive_int("num_landmarks", num_landmarks)
    if pinv_iterations is not None:
        check_nonnegative_int("pinv_iterations", pinv_iterations)
    b, h, n, d = q.shape
    keep = check_key_padding_mask(key_padding_mask, b, n, "key_padding_mask")
    scale = d**-0.5 if scale is None else scale
    keep_p = _padded_keep(keep, b, n, num_landmarks, q.device)  # [B, N_pad]
    q_l, has = segment_means(q, keep_p, num_landmarks)  # [B, H, m, D], [B, m]
    k_l, _ = segment_means(k, keep_p, num_landmarks)
    kernel = landmark_kernel(q_l, k_l, has, scale)  # [B, H, m, m] fp32
    all_real = keep is None and bool(has.all())  # no padding, no empty landmark: no masks at all
    row_mask = None if all_real else has[:, None, :, None]  # [B, 1, m, 1]
    if keep is not None:
        row_mask = row_mask & keep[:, None, None, :]  # [B, 1, m, N]
    w = sdpa_zero_empty_rows(q_l, k, v, row_mask, scale)  # [B, H, m, D] = softmax(Q̃ Kᵀ) V
    w = torch.matmul(pinv(kernel, pinv_iterations), w.to(kernel.dtype)).to(q.dtype)  # [B, H, m, D]
    col_mask = None if all_real else has[:, None, None, :]  # [B, 1, 1, m]
    return sdpa_zero_empty_rows(q, k_l, w, col_mask, scale)  # [B, H, N, D]


def _padded_keep(keep, b, n, m, device) -> torch.Tensor:
    """[B, N_pad] bool: real tokens, with N padded to a multiple of m (the padding is not real)."""
    base = torch.ones(b, n, dtype=torch.bool, device=device) if keep is None else keep
    return pad_to_multiple(base, m, dim=1, value=False)


def segment_means(t: torch.Tensor, keep_p: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of m equal segments over real tokens. t [B, H, N, D], keep_p [B, N_pad] ->
    ([B, H, m, D], has [B, m]: the segment holds a real token). Empty segments give zeros."""
    b, h, n, d = t.shape
    n_pad = keep_p.shape[1]
    weights = keep_p.to(t.dtype)  # [B, N_pad]
    t = pad_to_multiple(t, m, dim=2) * weights[:, None, :, None]
    sums = t.view(b, h, m, n_pad // m, d).sum(dim=3)  # [B, H, m, D]
    counts = weights.view(b, m, n_pad // m).sum(dim=2)  # [B, m]
    return sums / counts.clamp(min=1)[:, None, :, None], counts > 0


def landmark_kernel(q_l, k_l, has, scale) -> torch.Tensor:
    """softmax(Q̃ K̃ᵀ · scale) over real landmarks, in float32 (float64 stays), with the identity in
    the rows and columns of empty landmarks so they decouple from the pseudo-inverse. [B, H, m, m]"""
    compute = compute_dtype(q_l.dtype)
    scores = torch.matmul(q_l.to(compute), k_l.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~has[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.masked_fill(~has[:, None, :, None], 0.0), dim=-1)
    eye = torch.eye(has.shape[1], dtype=compute, device=has.device)
    both = has[:, None, :, None] & has[:, None, None, :]
    return torch.where(both, probs, eye)


def pinv(kernel: torch.Tensor, iterations: int | None = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of [.., m, m]: `iterations` steps of the cubic Newton-Schulz-type
    iteration of the paper. Scaled per matrix, not per batch, so an example's output does not depend
    on the rest of the batch. None: the exact inverse (`torch.linalg.inv`: the kernel is square and,
    for distinct landmarks, invertible; `torch.linalg.pinv`'s gradient is unstable on it)."""
    if iterations is None:
        return torch.linalg.inv(kernel)
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    norm_1 = kernel.abs().sum(dim=-2).amax(dim=-1)  # max column sum [..]
    norm_inf = kernel.abs().sum(dim=-1).amax(dim=-1)  # max row sum [..]
    z = kernel.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iterations):
        kz = torch.matmul(kernel, z)
        z = 0.25 * torch.matmul(z, 13 * eye - torch.matmul(kz, 15 * eye - torch.matmul(kz, 7 * eye - kz)))
    return z


@dataclasses.dataclass
class NystromConfig(AttentionConfig):
    name = "nystrom"
    num_landmarks: int = 64
    pinv_iterations: int | None = 6  # None: the exact inverse
    conv_kernel: int | None = None  # odd kernel size of the depthwise V convolution skip; None = off

    def validate(self):
        super().validate()
        check_positive_int("num_landmarks", self.num_landmarks)
        if self.pinv_iterations is not None:
            check_nonnegative_int("pinv_iterations", self.pinv_iterations)
        if self.conv_kernel is not None:
            check_positive_int("conv_kernel", self.conv_kernel)
            if self.conv_kernel % 2 == 0:
                raise ValueError(f"conv_kernel must be odd (centred on the token), got {self.conv_kernel}")


class NystromAttention(Attention):
    config_class = NystromConfig

    def __init__(self, config: NystromConfig):
        super().__init__(config)
        kernel = config.conv_kernel
        self.conv = None
        if kernel is not None:  # one kernel per head, shared across the head's channels
            self.conv = nn.Conv2d(config.heads, config.heads, (kernel, 1), padding=(kernel // 2, 0),
                                  groups=config.heads, bias=False)

    def attend(self, q, k, v, keep, **extra):
        cfg = self.config
        out = nystrom(q, k, v, cfg.num_landmarks, key_padding_mask=keep, pinv_iterations=cfg.pinv_iterations)
        return out + self.conv_skip(v, keep)

    def conv_skip(self, v, keep) -> torch.Tensor | float:
        """The depthwise convolution of v [B, H, N, D] along N (padded tokens zeroed first), as
        `self.conv` computes it, run by `sequence_conv` (banded matmuls, no im2col buffer)."""
        if self.conv is None:
            return 0.0
        if keep is not None:
            v = v * keep[:, None, :, None]
        return sequence_conv(v, self.conv.weight[:, 0, :, 0])  # [B, H, N, D]: convolved along N

    def macs(self, n: int, **extra) -> MacCount:
        """Two landmark attentions (m × n and n × m pairs per head), the m×m kernel, 4 m×m products
        per pseudo-inverse iteration (an exact inverse is counted as m³), the product with W, and
        the convolution skip as `sequence_conv` computes it (whole Toeplitz blocks, band zeros included)."""
        cfg = self.config
        h, d, m = cfg.heads, cfg.head_dim, cfg.num_landmarks
        pairs = h * 2 * n * m
        iterations = cfg.pinv_iterations
        inverse = m**3 if iterations is None else 4 * m**3 * iterations
        other = h * (m * m * d + inverse + m * m * d + sequence_conv_macs(n, d, cfg.conv_kernel or 0))
        return pairwise(pairs, d, self.projection_macs(n), other=other)

    def reference_attend(self, q, k, v, keep):
        """Written out with explicit matrices: the averaging matrix P [m, N] makes the landmarks,
        the three kernels are materialised, and S̃ = K1 · pinv(K2) · K3 [N, N] multiplies V."""
        cfg = self.config
        b, h, n, d = q.shape
        m, scale = cfg.num_landmarks, d**-0.5
        seg = -(-n // m)
        real = torch.ones(b, n, dtype=torch.bool, device=q.device) if keep is None else keep
        pos = torch.arange(n, device=q.device)
        member = (pos[None, :] // seg == torch.arange(m, device=q.device)[:, None])[None] & real[:, None, :]  # [B,m,N]
        counts = member.sum(dim=-1)  # [B, m]
        has = counts > 0
        P = (member.to(q.dtype) / counts.clamp(min=1)[..., None])[:, None]  # [B, 1, m, N]
        q_l, k_l = P @ q, P @ k  # [B, H, m, D]

        def softmax(scores, mask):
            scores = scores.masked_fill(~mask, float("-inf"))
            return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zeros

        cols = has[:, None, None, :]
        k1 = softmax(q @ k_l.transpose(-1, -2) * scale, cols)  # [B, H, N, m]
        k3 = softmax(q_l @ k.transpose(-1, -2) * scale, real[:, None, None, :] & has[:, None, :, None])  # [B,H,m,N]
        k2 = softmax(q_l @ k_l.transpose(-1, -2) * scale, cols & has[:, None, :, None])
        eye = torch.eye(m, dtype=q.dtype, device=q.device)
        k2 = torch.where(has[:, None, :, None] & cols, k2, eye)
        s = k1 @ pinv(k2, cfg.pinv_iterations) @ k3  # [B, H, N, N]: the approximate attention matrix
        if self.conv is None:
            return s @ v
        return s @ v + self.conv(v if keep is None else v * keep[:, None, :, None])  # nn.Conv2d itself

    @classmethod
    def test_configs(cls):
        return [
            {"num_landmarks": 4},
            {"num_landmarks": 3, "pinv_iterations": 2, "conv_kernel": 3},
            {"num_landmarks": 8, "pinv_iterations": None},
        ]


# -- the convolution skip --------------------------------------------------------------------------------
def sequence_conv(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution along the sequence with one odd kernel per head, zero-padded ("same"):
    out[b, h, n] = Σ_t weight[h, t] · v[b, h, n + t − K // 2]. v [B, H, N, D], weight [H, K] -> [B, H, N, D].

    The same numbers as nn.Conv2d(H, H, (K, 1), padding=(K // 2, 0), groups=H), computed as banded
    matmuls: the rows are cut into blocks of r, and each block's output is a [r, r + K − 1] Toeplitz
    matrix of the kernel times the block's rows with their K − 1 neighbours (a window of the padded
    input). Memory: the output and a padded copy of the input; PyTorch's CPU convolution backward
    builds a K·N·D column buffer per head instead. Backward: the input's gradient is the same
    convolution with the kernel reversed, the kernel's gradient sums the diagonals of the block
    products g · windowᵀ."""
    return _SequenceConv.apply(v, weight)


class _SequenceConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, weight):
        ctx.save_for_backward(v, weight)
        return _banded_conv(v, weight)

    @staticmethod
    def backward(ctx, g):
        v, weight = ctx.saved_tensors
        dv = _banded_conv(g, weight.flip(-1)) if ctx.needs_input_grad[0] else None
        dw = _kernel_grad(v, g, weight.shape[-1]) if ctx.needs_input_grad[1] else None
        return dv, dw


#: rows per Toeplitz block of `sequence_conv` (at least K − 1): small blocks waste fewer MACs on the
#: band's zeros ((r + K − 1) / K per output), 64 keeps the matmuls efficient
_CONV_BLOCK = 64


def sequence_conv_macs(n: int, d: int, k: int) -> int:
    """MACs of `sequence_conv` for one head of [n, d] with a kernel of k (0: no convolution)."""
    if not k or not n:
        return 0
    r = max(_CONV_BLOCK, k - 1)
    return -(-n // r) * r * (r + k - 1) * d


def _padded_windows(x: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """One head's rows x [N, D] -> windows [nb, r + K − 1, D], overlapping views of a zero-padded copy:
    window j holds rows j·r − K // 2 .. j·r + r + K // 2 − 1, what output rows j·r .. j·r + r − 1 need."""
    n, d = x.shape
    blocks = -(-n // r)
    padded = torch.nn.functional.pad(x, (0, 0, k // 2, blocks * r - n + k - 1 - k // 2))  # [nb·r + K − 1, D]
    return padded.as_strided((blocks, r + k - 1, d), (r * d, d, 1))


def _toeplitz(weight: torch.Tensor, r: int) -> torch.Tensor:
    """weight [H, K] -> [H, r, r + K − 1]: row i holds the kernel at columns i .. i + K − 1."""
    h, k = weight.shape
    t = weight.new_zeros(h, r, r + k - 1)
    t.as_strided((h, r, k), (r * (r + k - 1), r + k, 1)).copy_(weight[:, None, :].expand(h, r, k))
    return t


def _banded_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] -> [B, H, N, D], one head at a time: one batched matmul of the head's Toeplitz
    block (the same matrix for every block: a zero batch stride) with its windows."""
    b, h, n, d = x.shape
    k = weight.shape[-1]
    r = max(_CONV_BLOCK, k - 1)
    toeplitz = _toeplitz(weight.to(x.dtype), r)  # [H, r, r+K-1]
    out = x.new_empty(b, h, n, d)
    for bi in range(b):
        for hi in range(h):
            win = _padded_windows(x[bi, hi], k, r)  # [nb, r+K-1, D]
            rows = torch.bmm(toeplitz[hi].expand(win.shape[0], -1, -1), win)  # [nb, r, D]
            out[bi, hi] = rows.view(-1, d)[:n]
    return out


def _kernel_grad(x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """d weight [H, K]: Σ_{b, n, d} g[b, h, n, d] · x[b, h, n + t − K // 2, d], per head from the block
    products g_block · windowᵀ ([r, r + K − 1]), whose t-th diagonal pairs every g_i with x_{i+t}."""
    b, h, n, d = x.shape
    r = max(_CONV_BLOCK, k - 1)
    dw = x.new_zeros(h, k)
    for bi in range(b):
        for hi in range(h):
            win = _padded_windows(x[bi, hi], k, r)  # [nb, r+K-1, D]
            rows = torch.nn.functional.pad(g[bi, hi], (0, 0, 0, win.shape[0] * r - n)).view(-1, r, d)  # [nb, r, D]
            prod = torch.bmm(rows, win.transpose(1, 2))  # [nb, r, r+K-1]
            s0, s1, _ = prod.stride()
            dw[hi] += prod.as_strided((prod.shape[0], r, k), (s0, s1 + 1, 1)).sum(dim=(0, 1))
    return dw
