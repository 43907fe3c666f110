"""`performer`: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

Softmax attention's kernel exp(q̃·k̃) (q̃ = q / D^¼, k̃ = k / D^¼, so q̃·k̃ = q·k / √D) is estimated by
positive random features φ(x)_l = exp(w_l·x - |x|²/2), w_l ~ N(0, I_D), which satisfy
E[φ(q̃)·φ(k̃)] = exp(q̃·k̃). The rows w_l are drawn in blocks of D orthogonalised by QR and rescaled
to chi(D)-distributed norms (lower variance than i.i.d. rows), from a seeded `torch.Generator`; the
module keeps them as the buffer `projection` [m, D], so a checkpoint reproduces its outputs. The
attention itself is `feature_maps`: bidirectional in O(N·m·D), causal by chunked prefix sums.

Stabilisers. Any positive factor shared by all keys of a query cancels in the normalisation, so:
- queries: the per-query max of w·q̃ is subtracted before exp (and the per-query exp(-|q̃|²/2) and the
  usual 1/√m are dropped: they cancel too). The largest feature of every query is exactly 1.
- keys, bidirectional: one max over all real keys and features of a head (w·k̃ - |k̃|²/2) is subtracted;
  padding keys are left out of it, so they cannot push real keys into underflow.
- keys, causal and decoding: a max over keys would let future keys change earlier outputs and would
  differ between a full call and token-by-token steps. Instead the constant c = max_l |w_l|²/2 is
  subtracted: w·k̃ - |k̃|²/2 = |w|²/2 - |k̃ - w|²/2 <= |w|²/2, so every key feature is <= 1 (no
  overflow, whatever the key) and depends on its own key only, so causal outputs are bit-identical
  whatever follows and steps equal the full call. The price is range: typical key features are
  ~1e-22 (fine in float32, which is what half inputs are computed in), and a key underflows to zero
  features once |k̃ - w_l|²/2 > ~87 for every l: measured at D = 64, m = 256, from |k̃| ≈ 14 (|k| ≈ 40),
  where FAVOR+'s variance (~exp(|q̃ + k̃|²)) is useless anyway. A query whose keys all underflow
  returns zeros, never NaN.

`kernel="relu"` is the generalised-attention variant: φ(x) = relu(W x̃) + 1e-3 (the small constant
keeps a query whose features are all zero attending uniformly instead of returning zeros).
Redraws are explicit: `redraw_features(seed)`, or `redraw_interval` calls in training mode.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from longrange.core.config import AttentionConfig, check_bool, check_nonnegative_int, check_positive_int
from longrange.core.dtypes import compute_dtype
from longrange.mechanisms.feature_maps import FeatureMap, FeatureMapAttention, feature_attention, padding_rows

Tensor = torch.Tensor
KERNELS = ("softmax", "relu")
RELU_EPSILON = 1e-3


# -- the random projection --------------------------------------------------------------------------------
def draw_projection(nb_features: int, head_dim: int, seed: int = 0, orthogonal: bool = True) -> Tensor:
    """[nb_features, head_dim] float32 Gaussian rows from `seed` (never the global RNG).

    orthogonal: blocks of `head_dim` rows orthogonalised by QR (the last block truncated), each row
    rescaled to the norm of an independent Gaussian vector, so every row is still marginally
    N(0, I) but rows in a block are exactly orthogonal (FAVOR+'s lower-variance estimator)."""
    check_positive_int("nb_features", nb_features)
    check_positive_int("head_dim", head_dim)
    check_nonnegative_int("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    if not orthogonal:
        return torch.randn(nb_features, head_dim, generator=gen, dtype=torch.float64).float()
    blocks = []
    for _ in range(math.ceil(nb_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # unique QR: a Haar-distributed rotation
        blocks.append(q.T)  # (D, D), orthonormal rows
    rows = torch.cat(blocks)[:nb_features]  # (m, D)
    norms = torch.randn(nb_features, head_dim, generator=gen, dtype=torch.float64).norm(dim=1)  # chi(D)
    return (rows * norms[:, None]).float()


# -- the feature maps ---------------------------------------------------------------------------------------
def softmax_feature_map(projection: Tensor) -> FeatureMap:
    """Positive random features for exp(q·k / √D); `projection` [m, D] in the compute dtype."""
    m, d = projection.shape
    w_t = (projection * d**-0.25).T.contiguous()  # (D, m): x·(w / D^¼) = x̃·w
    bound = projection.square().sum(dim=1).amax() / 2  # max_l |w_l|²/2 >= w·k̃ - |k̃|²/2 for every k

    def queries(q: Tensor) -> Tensor:  # per-query max subtracted: the largest feature of a query is 1
        logits = project_rows(q, w_t)  # (..., n, m)
        return logits.sub_(logits.detach().amax(dim=-1, keepdim=True)).exp_()

    def key_logits(k: Tensor, offset) -> Tensor:  # w·k̃ - |k̃|²/2 - offset, the offset fused into the matmul
        half_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True).square().mul_(0.5 / math.sqrt(d))
        return project_rows(k, w_t, bias=(half_norm + offset).neg_())  # (..., n, m)

    def keys(k: Tensor, keep: Tensor | None) -> Tensor:  # fixed bound: row-local, every feature <= 1
        return _mask_padding(key_logits(k, bound), keep).exp_()

    def unbounded_logits(k: Tensor, keep: Tensor | None) -> Tensor:  # the core subtracts a per-head max
        return _mask_padding(key_logits(k, 0.0), keep)

    w = w_t.T.contiguous()  # (m, D)

    def queries_grad(q: Tensor, features: Tensor, d_features: Tensor) -> Tensor:  # d logits = dφ φ
        return project_rows(d_features.mul_(features), w)

    def keys_grad(k: Tensor, keep: Tensor | None, features: Tensor, d_features: Tensor) -> Tensor:
        d_logits = d_features.mul_(features)  # padded keys: φ = 0, so 0
        dk = project_rows(d_logits, w)  # through w·k̃, then through -|k̃|²/2 = -|k|²/(2√D):
        return dk.addcmul_(d_logits.sum(dim=-1, keepdim=True), k, value=-1 / math.sqrt(d))

    grads = {} if projection.requires_grad else {"queries_grad": queries_grad, "keys_grad": keys_grad}
    return FeatureMap(
        num_features=m, queries=queries, keys=keys, key_logits=unbounded_logits, macs_per_row=d * m, exps_per_row=m,
        **grads,
    )


def project_rows(x: Tensor, w_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., n, D] @ w_t [D, m] (+ bias [..., n, 1]) as one 2-d GEMM over all rows -> [..., n, m]."""
    rows = x.reshape(-1, x.shape[-1])  # a view for contiguous x, a (small) copy for a chunk
    if bias is None:
        out = rows @ w_t
    else:
        out = torch.addmm(bias.reshape(-1, 1), rows, w_t)
    return out.view(*x.shape[:-1], w_t.shape[1])


def relu_feature_map(projection: Tensor) -> FeatureMap:
    """Generalised attention: φ(x) = relu(x̃ Wᵀ) + ε, the same map for queries and keys."""
    m, d = projection.shape
    w_t = (projection * d**-0.25).T.contiguous()  # (D, m)
    w = w_t.T.contiguous()  # (m, D)

    def queries(x: Tensor) -> Tensor:
        return torch.clamp_min(project_rows(x, w_t), 0.0).add_(RELU_EPSILON)

    def keys(k: Tensor, keep: Tensor | None) -> Tensor:
        rows = padding_rows(keep, k)
        features = queries(k)
        return features if rows is None else features.masked_fill_(~rows, 0.0)

    def queries_grad(x: Tensor, features: Tensor, d_features: Tensor) -> Tensor:  # through relu: where x̃ W > 0
        return project_rows(d_features.mul_(project_rows(x, w_t) > 0), w)

    def keys_grad(k: Tensor, keep: Tensor | None, features: Tensor, d_features: Tensor) -> Tensor:
        rows = padding_rows(keep, k)
        return queries_grad(k, features, d_features if rows is None else d_features.masked_fill_(~rows, 0.0))

    grads = {} if projection.requires_grad else {"queries_grad": queries_grad, "keys_grad": keys_grad}
    return FeatureMap(num_features=m, queries=queries, keys=keys, macs_per_row=d * m, **grads)


def performer_feature_map(projection: Tensor, kernel: str = "softmax") -> FeatureMap:
    check_kernel(kernel)
    return softmax_feature_map(projection) if kernel == "softmax" else relu_feature_map(projection)


def _mask_padding(logits: Tensor, keep: Tensor | None) -> Tensor:
    """Padded keys' logits to -inf (before exp, so their features are exactly 0, never inf·0)."""
    rows = padding_rows(keep, logits)
    return logits if rows is None else logits.masked_fill_(~rows, float("-inf"))


# -- the kernel ---------------------------------------------------------------------------------------------
def performer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    nb_features: int = 256,
    causal: bool = False,
    seed: int = 0,
    *,
    key_padding_mask: Tensor | None = None,
    kernel: str = "softmax",
    orthogonal: bool = True,
    projection: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """FAVOR+ attention: softmax(q kᵀ / √D) v estimated in O(N·m·D) (unbiased estimates of each
    exp(q·k / √D); the normalised ratio is consistent, its error falling as 1/√m).

    q, k, v: [B, H, N, D]. nb_features (m), seed, orthogonal: the random projection, drawn here with
    `draw_projection` unless `projection` [m, D] is given (then those three are unused).
    key_padding_mask: [B, N] bool, True = real token. causal: query i sees keys j <= i (chunks of
    `chunk_size` tokens; the result does not depend on it). kernel: "softmax" (FAVOR+) or "relu".
    Returns [B, H, N, D] in q's dtype (computed in float32 for half inputs).
    """
    check_kernel(kernel)
    if projection is None:
        projection = draw_projection(nb_features, q.shape[-1], seed, orthogonal)
    elif not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        shape = list(projection.shape) if isinstance(projection, Tensor) else type(projection).__name__
        raise ValueError(f"projection must be [m, D] with D = q.shape[-1] = {q.shape[-1]}, got {shape}")
    fmap = performer_feature_map(projection.to(q.device, compute_dtype(q.dtype)), kernel)
    return feature_attention(fmap, q, k, v, key_padding_mask, causal=causal, chunk_size=chunk_size)


# -- the module ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PerformerConfig(AttentionConfig):
    name = "performer"
    nb_features: int = 256  # m random features per head (the peers' default for D = 64)
    causal: bool = False
    kernel: str = "softmax"  # "softmax" (FAVOR+) or "relu" (generalised attention)
    orthogonal: bool = True
    seed: int = 0  # the projection is draw_projection(nb_features, head_dim, seed, orthogonal)
    redraw_interval: int | None = None  # redraw every this many forward calls in training mode
    # causal only: tokens per chunk, a masked [c, c] product inside, prefix sums across; the result
    # does not depend on it. Work per token ~ c·(m + D) + 2·m·D: 64 measured fastest on CPU
    chunk_size: int = 64

    def validate(self):
        super().validate()
        check_positive_int("nb_features", self.nb_features)
        check_bool("causal", self.causal)
        check_kernel(self.kernel)
        check_bool("orthogonal", self.orthogonal)
        check_nonnegative_int("seed", self.seed)
        if self.redraw_interval is not None:
            check_positive_int("redraw_interval", self.redraw_interval)
        check_positive_int("chunk_size", self.chunk_size)


class PerformerAttention(FeatureMapAttention):
    """Multi-head FAVOR+. Buffers: `projection` [m, D] (the features) and `calls_since_redraw`."""

    config_class = PerformerConfig

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.register_buffer("projection", self._draw(config.seed))
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))

    def _draw(self, seed: int) -> Tensor:
        c = self.config
        return draw_projection(c.nb_features, c.head_dim, seed, c.orthogonal)

    def feature_map(self, dtype, device) -> FeatureMap:
        return performer_feature_map(self.projection.to(device, dtype), self.config.kernel)

    def redraw_features(self, seed: int | None = None) -> None:
        """Draw a new projection from `seed` (default: config.seed + 1) and record it as config.seed,
        so the config always names the current draw. Replaces the buffer (no in-place change to a
        tensor an earlier graph may still need for backward)."""
        seed = self.config.seed + 1 if seed is None else seed
        check_nonnegative_int("seed", seed)
        self.config.seed = seed
        old = self.projection
        self.projection = self._draw(seed).to(device=old.device, dtype=old.dtype)
        self.calls_since_redraw.zero_()

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        keep = self.check_input(x, attention_mask)
        self._count_training_call()
        q, k, v = self.project(x)
        return self.merge(self.attend(q, k, v, keep))

    def _count_training_call(self) -> None:
        """With redraw_interval = r, training calls 1..r use the current draw, r+1..2r the next, ..."""
        interval = self.config.redraw_interval
        if not self.training or interval is None:
            return
        if int(self.calls_since_redraw) >= interval:
            self.redraw_features()
        self.calls_since_redraw += 1

    @classmethod
    def test_configs(cls):
        return [
            {"nb_features": 16, "seed": 1},
            {"nb_features": 16, "causal": True, "chunk_size": 3},
            {"nb_features": 6, "kernel": "relu", "orthogonal": False, "causal": True, "chunk_size": 5},
        ]


def check_kernel(kernel) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
