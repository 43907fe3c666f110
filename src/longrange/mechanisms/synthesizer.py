"""`synthesizer`: synthetic attention (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention
for Transformer Models"): attention weights that do not come from query-key dot products.

    Y = softmax(S) G(X),   G(X) = X W_v (the values), per head; S [N, N] is synthesised:

- "dense":  S[i] = F(X_i) = W2 ReLU(W1 X_i + b1) + b2, a per-token MLP that writes token i's whole
  row of ℓ = `max_length` logits (W1: C -> C, a head_dim-wide hidden per head; W2 [H, ℓ, D]);
- "random": S = R [H, ℓ, ℓ], learned (`trainable`) or fixed (the "Fixed Random Synthesizer");
- "factorized_dense": S[i, j] = A_i[j mod a] · B_i[j div a], A_i = F_A(X_i) ∈ R^a, B_i = F_B(X_i) ∈ R^b,
  a·b >= ℓ (a = ⌈√ℓ⌉): the tiled outer product of two short rows (the paper's H_A(A) * H_B(B));
- "factorized_random": S = R1 R2ᵀ, R1, R2 [H, ℓ, k] (k = `rank`).

Inputs use the first N rows and columns (N <= ℓ); a longer input is a ValueError naming
`max_length`. `dot_product=True` mixes in dot-product attention (the paper's Synthesizer +
Vanilla): S' = α·S + β·QKᵀ/√D with α learned (β = 1 - α, the paper's learnable mixture weights
summing to 1, `mixing="learned"`), fixed (`mixing="fixed"`, α = `mix_weight`), or α = β = 1
(`mixing="sum"`, the plain sum of LRA's released code). Causal (as the paper's decoders): S is
masked above the diagonal; every S[i] depends on X_i only (or on nothing), so the result is causal.

How it runs: "dense" and "factorized_random" are dot products in disguise (S[i, j] = [h_i, 1]·[W2_j,
b2_j] with h_i = ReLU(W1 X_i + b1); S = R1 R2ᵀ), so they run through the fused SDPA kernel with those
features as queries and keys (scale 1; the dot-product mixture concatenates √-free feature blocks
[α·h_i, α, β·q_i/√D]·[W2_j, b2_j, k_j]); q, k and v are zero-padded to one width, as the fused CPU
kernel needs: O(N²·width) time, O(N·width) memory. "random" and "factorized_dense" materialise S
[H or B·H, N, N] (their parameters or features are N × N anyway): O(N²) memory. Every form is
O(N²) time by design: the paper's point is what the weights are made of, not their cost.

Parameters: "random" holds H·ℓ² logits (12 heads, ℓ = 16K: 3.2 G), so it is for short inputs;
"dense" H·ℓ·(D + 1), "factorized_random" 2·H·ℓ·k.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.flops import MacCount
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import sdpa_zero_empty_rows

MODES = ("dense", "random", "factorized_dense", "factorized_random")
MIXINGS = ("learned", "fixed", "sum")


@dataclasses.dataclass
class SynthesizerConfig(AttentionConfig):
    name = "synthesizer"
    mode: str = "dense"  # the paper's lead formulation, the Dense Synthesizer (its §3.1)
    max_length: int = 512  # ℓ: the longest input (LRA's SynthesizerAttention default); longer is an error
    rank: int = 8  # factorized_random's k: the paper "use[s] a small value of k = 8"
    trainable: bool = True  # random modes: learned R (Random Synthesizer) or frozen (Fixed Random Synthesizer)
    dot_product: bool = False  # mix in dot-product attention (the paper's "+ Vanilla" mixtures)
    mixing: str = "learned"  # with dot_product: "learned" α (the paper), "fixed" α = mix_weight, "sum" (LRA's code)
    mix_weight: float = 0.5  # α, the synthetic logits' share: the fixed value, or where the learned one starts
    causal: bool = False

    def validate(self):
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        check_positive_int("max_length", self.max_length)
        check_positive_int("rank", self.rank)
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {list(MIXINGS)}, got {self.mixing!r}")
        if isinstance(self.mix_weight, bool) or not isinstance(self.mix_weight, (int, float)) \
                or not 0.0 < self.mix_weight < 1.0:
            raise ValueError(f"mix_weight must be a number strictly between 0 and 1 (the synthetic logits' share "
                             f"α; β = 1 - α), got {self.mix_weight!r}")

    @property
    def factors(self) -> tuple[int, int]:
        """(a, b) of factorized_dense: a = ⌈√ℓ⌉, b = ⌈ℓ / a⌉, so a·b >= ℓ."""
        a = math.isqrt(self.max_length - 1) + 1
        return a, -(-self.max_length // a)


class SynthesizerAttention(Attention):
    config_class = SynthesizerConfig
    capabilities = Capabilities(causal=True, length_options=("max_length",))

    def __init__(self, config: SynthesizerConfig):
        super().__init__(config)
        c, h, d, length = config.dim, config.heads, config.head_dim, config.max_length
        if not config.dot_product:  # only the values are projected: G(X)
            del self.qkv
            self.value = nn.Linear(c, c, bias=config.bias)
        if config.mode in ("dense", "factorized_dense"):
            self.hidden = nn.Linear(c, c, bias=config.bias)  # W1, b1: a head_dim-wide hidden per head
        if config.mode == "dense":
            self.dense_w = nn.Parameter(_xavier(h, length, d))  # W2 [H, ℓ, D]
            self.dense_b = nn.Parameter(torch.zeros(h, length))  # b2 [H, ℓ]
        elif config.mode == "factorized_dense":
            a, b = config.factors
            self.factor_a_w, self.factor_a_b = nn.Parameter(_xavier(h, a, d)), nn.Parameter(torch.zeros(h, a))
            self.factor_b_w, self.factor_b_b = nn.Parameter(_xavier(h, b, d)), nn.Parameter(torch.zeros(h, b))
        elif config.mode == "random":
            self._logit_table("random", _xavier(h, length, length))  # R [H, ℓ, ℓ]
        else:
            self._logit_table("random_q", _xavier(h, length, config.rank))  # R1 [H, ℓ, k]
            self._logit_table("random_k", _xavier(h, length, config.rank))  # R2 [H, ℓ, k]
        if config.dot_product and config.mixing == "learned":
            w = config.mix_weight
            self.mix_logit = nn.Parameter(torch.tensor(math.log(w / (1 - w))))  # α = sigmoid(mix_logit)

    def _logit_table(self, name: str, value: torch.Tensor) -> None:
        if self.config.trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:  # the Fixed Random Synthesizer: a buffer, saved with the weights, never trained
            self.register_buffer(name, value)

    # -- shapes ----------------------------------------------------------------------------------
    def project(self, x):
        """-> (q, k, v) [B, H, N, D]; q and k are None without the dot-product mixture."""
        if self.config.dot_product:
            return super().project(x)
        return None, None, self.split_heads(self.value(x))

    def check_length(self, n: int) -> None:
        if n > self.config.max_length:
            raise ValueError(f"synthesizer was built for max_length={self.config.max_length} tokens, got an input of "
                             f"length {n}; build it with a larger max_length")

    def mix(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(α, β): the weights of the synthetic and the dot-product logits."""
        cfg = self.config
        if not cfg.dot_product:
            return 1.0, 0.0
        if cfg.mixing == "sum":
            return 1.0, 1.0
        alpha = torch.sigmoid(self.mix_logit) if cfg.mixing == "learned" else cfg.mix_weight
        return alpha, 1 - alpha

    # -- the call ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = self.check_input(x, attention_mask)
        self.check_length(x.shape[1])
        q, k, v = self.project(x)
        return self.merge(self.synthesize(x, q, k, v, keep))

    def synthesize(self, x, q, k, v, keep) -> torch.Tensor:
        """[B, H, N, D]: softmax(α·S + β·QKᵀ/√D, masked) V, on the path this mode runs."""
        if self.config.mode in ("dense", "factorized_random"):
            qs, ks = self.features(x, q, k)
            return feature_attention(qs, ks, v, keep, self.config.causal)
        return logit_attention(self.logits(x, q, k), v, keep, self.config.causal)

    def features(self, x, q, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key features whose products are the mixed logits (scale 1): [B, H, N, F] and
        [B or 1, H, N, F]."""
        n, alpha, beta = x.shape[1], *self.mix()
        if self.config.mode == "dense":
            h = F.relu(self.split_heads(self.hidden(x)))  # (B, H, N, D)
            qs = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)  # [h_i, 1]
            ks = torch.cat([self.dense_w[:, :n], self.dense_b[:, :n, None]], dim=-1)[None]  # [W2_j, b2_j]
        else:
            qs, ks = self.random_q[None, :, :n], self.random_k[None, :, :n]  # R1, R2
        qs = (alpha * qs).to(x.dtype)
        if not self.config.dot_product:
            return qs, ks.to(x.dtype)
        b = x.shape[0]
        qs = torch.cat([qs.expand(b, *qs.shape[1:]), (beta * self.config.head_dim**-0.5) * q], dim=-1)
        return qs, torch.cat([ks.to(x.dtype).expand(b, *ks.shape[1:]), k], dim=-1)

    def logits(self, x, q, k) -> torch.Tensor:
        """The mixed logits [1 or B, H, N, N] of the materialising modes (random, factorized_dense)."""
        n, alpha, beta = x.shape[1], *self.mix()
        if self.config.mode == "random":
            s = self.random[None, :, :n, :n]
        else:
            a = self.config.factors[0]
            h = F.relu(self.split_heads(self.hidden(x)))  # (B, H, N, D)
            fa = torch.matmul(h, self.factor_a_w.transpose(-1, -2)) + self.factor_a_b[:, None]  # (B, H, N, a)
            fb = torch.matmul(h, self.factor_b_w.transpose(-1, -2)) + self.factor_b_b[:, None]  # (B, H, N, b)
            j = torch.arange(n, device=x.device)
            s = fa[..., j % a] * fb[..., j // a]  # (B, H, N, N): A_i[j mod a] · B_i[j div a]
        s = alpha * s.to(x.dtype)
        if self.config.dot_product:
            s = s + (beta * self.config.head_dim**-0.5) * torch.matmul(q, k.transpose(-1, -2))
        return s

    # -- cost -----------------------------------------------------------------------------------------
    def projection_macs(self, n: int) -> int:
        """The value (and, mixed, query and key) projections, the output projection and W1."""
        c = self.config.dim
        maps = (4 if self.config.dot_product else 2) + (self.config.mode in ("dense", "factorized_dense"))
        return maps * n * c * c

    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """All n² pairs per head. Feature modes: both products at the padded feature width; the
        materialising modes: the value product, QKᵀ when mixed, and factorized_dense's F_A, F_B."""
        cfg = self.config
        h, d = cfg.heads, cfg.head_dim
        pairs = h * n * n
        dot = d if cfg.dot_product else 0
        other = 0
        if cfg.mode in ("dense", "factorized_random"):
            width = max(d + 1 if cfg.mode == "dense" else cfg.rank, 1) + dot
            width = max(width, d)
            scores = weighted = pairs * width
        else:
            scores, weighted = pairs * dot, pairs * d
            if cfg.mode == "factorized_dense":
                other = h * n * d * sum(cfg.factors)
        return MacCount(projections=self.projection_macs(n), scores=scores, weighted=weighted, other=other,
                        exps=pairs, pairs=pairs)

    # -- the oracle -----------------------------------------------------------------------------------
    def reference_forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every form written out as its [B, H, N, N] logit matrix (the factorized dense one with
        `repeat` / `repeat_interleave`, the paper's tiling functions), masked, softmax, times V."""
        keep = self.check_input(x, attention_mask)
        b, n, _ = x.shape
        self.check_length(n)
        q, k, v = self.project(x)
        cfg = self.config
        if cfg.mode in ("dense", "factorized_dense"):
            h = F.relu(self.split_heads(self.hidden(x)))  # (B, H, N, D)
        if cfg.mode == "dense":
            s = torch.einsum("bhid,hjd->bhij", h, self.dense_w[:, :n]) + self.dense_b[None, :, None, :n]
        elif cfg.mode == "random":
            s = self.random[None, :, :n, :n]
        elif cfg.mode == "factorized_random":
            s = torch.einsum("hik,hjk->hij", self.random_q[:, :n], self.random_k[:, :n])[None]
        else:
            a, b_ = cfg.factors
            fa = torch.einsum("bhid,had->bhia", h, self.factor_a_w) + self.factor_a_b[:, None]
            fb = torch.einsum("bhid,hed->bhie", h, self.factor_b_w) + self.factor_b_b[:, None]
            s = fa.repeat(1, 1, 1, b_)[..., :n] * fb.repeat_interleave(a, dim=-1)[..., :n]  # H_A(A) * H_B(B)
        alpha, beta = self.mix()
        s = alpha * s.to(x.dtype)
        if cfg.dot_product:
            s = s + beta * torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(cfg.head_dim)
        mask = allowed_keys(keep, n, cfg.causal, x.device)
        probs = masked_softmax(s, mask)
        return self.merge(torch.matmul(probs, v.to(probs.dtype)).to(x.dtype))

    @classmethod
    def test_configs(cls):
        return [
            {"max_length": 48},
            {"mode": "random", "max_length": 41, "causal": True},
            {"mode": "factorized_dense", "max_length": 45, "dot_product": True, "mixing": "fixed", "mix_weight": 0.3},
            {"mode": "factorized_random", "max_length": 48, "rank": 3, "dot_product": True, "causal": True},
            {"mode": "random", "max_length": 41, "trainable": False, "dot_product": True, "mixing": "sum",
             "bias": False},
            {"mode": "dense", "max_length": 44, "dot_product": True, "causal": True},
        ]


def allowed_keys(keep: torch.Tensor | None, n: int, causal: bool, device) -> torch.Tensor | None:
    """[B or 1, 1, N, N] bool: real keys, at or before the query when causal; None: all allowed."""
    mask = None if keep is None else keep[:, None, None, :]
    if causal:
        tril = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        mask = tril if mask is None else mask & tril
    return mask


def feature_attention(qs, ks, v, keep, causal) -> torch.Tensor:
    """softmax(qs ksᵀ, masked) v through the fused kernel (scale 1): qs [B, H, N, F], ks [1 or B, H, N, F],
    v [B, H, N, D]; all zero-padded to one width (zeros change no product) and v's padding cut off."""
    b, h, n, d = v.shape
    width = max(qs.shape[-1], d)
    qs, ks, vp = (F.pad(t, (0, width - t.shape[-1])) for t in (qs, ks, v))
    qs, ks = qs.expand(b, h, n, width), ks.expand(b, h, n, width)
    if keep is None:
        out = F.scaled_dot_product_attention(qs, ks, vp, is_causal=causal, scale=1.0)
    else:
        out = sdpa_zero_empty_rows(qs, ks, vp, allowed_keys(keep, n, causal, v.device), 1.0)
    return out[..., :d]


def logit_attention(logits, v, keep, causal) -> torch.Tensor:
    """softmax(logits, masked) v: logits [1 or B, H, N, N], v [B, H, N, D]; softmax in float32."""
    probs = masked_softmax(logits, allowed_keys(keep, v.shape[2], causal, v.device))
    return torch.matmul(probs.to(v.dtype), v)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Row softmax over allowed entries, in float32 (float64 stays); a row with none is all zeros,
    with finite gradients (no NaN is ever formed)."""
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.to(compute)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def _xavier(heads: int, rows: int, cols: int) -> torch.Tensor:
    """Xavier-uniform per head (LRA's kernel init for these tables)."""
    return torch.stack([nn.init.xavier_uniform_(torch.empty(rows, cols)) for _ in range(heads)])
