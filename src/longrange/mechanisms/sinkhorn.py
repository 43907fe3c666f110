"""`sinkhorn`: Sparse Sinkhorn Attention (Tay et al., ICML 2020), block-sorted attention.

The sequence is cut into nb blocks of b = `block_size` tokens. Per head:

1. Pool each block: ψQ_i, ψK_j [nb, D] (means over the block's real tokens).
2. Sorting network: R_ij = (ψQ_i W) · ψK_j / √D, how much block i wants block j as its partner
   (W [D, D] a learned map per head, initialised to the identity).
3. Sinkhorn normalisation: L = (R + g) / τ (g Gumbel noise, training only), then
   `sinkhorn_iters` rounds of row and column normalisation in log space and a last row
   normalisation: P = exp(L) [nb, nb], a soft permutation whose rows are convex combinations.
4. Sorted blocks: K̃ = P · K and Ṽ = P · V on the blocked keys/values ([nb, nb] × [nb, b·D]).
5. Each query block attends, with ONE softmax, over 2b keys: its sorted partner block K̃_i and its
   own block K_i.

Shapes: q, k, v [B, H, N, D]; N is padded to nb·b (padding keys masked, padding queries dropped).
Cost per head: O(N·2b·D) for the attention, O(nb²·b·D) = O(N²·D / b) for the mixing in step 4
(a dense matmul: ~15% of the layer's MACs at 16K with b = 64), O(nb·D² + nb²·D) for the sort net;
memory O(N·(2b + D) + nb²).

`causal=True` (the paper's Causal Sinkhorn Balancing): block i may only be sorted to blocks j < i
(R is masked to the strictly lower triangle before the normalisation), its pooled query is its first
token's (the only token every query of the block may see), its own block is attended causally, and
the first block has no partner. Outputs then depend only on earlier tokens (tested bit for bit).

Padding never changes real tokens: pooling, the sorted keys and the masks use real tokens only
(padded keys and values are zeroed before the mixing; a block with no real token takes part in no
sorting). A sorted slot t of block i is a key when some block that can be sorted to block i has a
real token in slot t.

Exact limits (tested): a hard identity permutation gives block-local attention (the own block
counted twice, which leaves a softmax unchanged); block_size >= N gives full softmax attention
(causal or not) whatever the sorting network says.

Where the paper and the released codes differ (our choice first): the paper's SortNet maps each
pooled block to nb slot scores with a feed-forward layer, which needs a maximum length (LRA's code:
`max_num_blocks=25`); we score block pairs directly (lucidrains' `AttentionSortNet`, its default) with
a learned per-head map, so any length runs. LRA's released model uses a plain row softmax
(`sort_activation="softmax"`, no Sinkhorn rounds, no noise) and adds two separate softmaxes (own block
+ sorted block); we take one softmax over both (lucidrains). `lra.presets` sets LRA's block of 50,
no Sinkhorn rounds and no noise.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from longrange.core.config import AttentionConfig, check_nonnegative_int, check_positive_int
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import pad_to_multiple, sdpa_zero_empty_rows
from longrange.core.reference import reference_attention

#: a finite "minus infinity" for masked logits (the normalisation runs in float32 or float64)
_NEG = -1e30


@dataclasses.dataclass
class SinkhornConfig(AttentionConfig):
    name = "sinkhorn"
    block_size: int = 64  # lucidrains' bucket_size (LRA: 50, set by lra.presets)
    sinkhorn_iters: int = 7  # rounds of row + column normalisation (lucidrains' SinkhornAttention: 7); 0: a row softmax
    temperature: float = 0.75  # τ of the Gumbel-Sinkhorn operator (lucidrains: 0.75)
    gumbel_noise: bool = True  # Gumbel noise on the sorting logits in training (the paper); never in eval
    causal: bool = False

    def validate(self):
        super().validate()
        check_positive_int("block_size", self.block_size)
        check_nonnegative_int("sinkhorn_iters", self.sinkhorn_iters)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a positive number, got {t!r}")
        if not isinstance(self.gumbel_noise, bool):
            raise ValueError(f"gumbel_noise must be True or False, got {self.gumbel_noise!r}")


# -- the steps, as functions -------------------------------------------------------------------------
def sinkhorn_normalise(logits: torch.Tensor, valid: torch.Tensor, iters: int) -> torch.Tensor:
    """exp of `logits` [.., nb, nb] after `iters` rounds of row then column normalisation in log space
    and a last row normalisation, over the `valid` entries only (the rest are 0 in the result, and a
    row with no valid entry is all 0). Computed in float32 (float64 stays)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_p = logits.to(compute).masked_fill(~valid, _NEG)

    def normalise(x, dim):  # masked entries stay at _NEG: exp gives exactly 0 and no gradient
        return (x - torch.logsumexp(x, dim=dim, keepdim=True)).masked_fill(~valid, _NEG)

    for _ in range(iters):
        log_p = normalise(normalise(log_p, -1), -2)
    return normalise(log_p, -1).exp()


def gumbel_like(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gumbel(0, 1) noise of t's shape from the global RNG: -log(-log U), U ~ Uniform(eps, 1 - eps)."""
    u = torch.rand(t.shape, dtype=t.dtype, device=t.device).clamp(eps, 1 - eps)
    return -torch.log(-torch.log(u))


def block_keep(keep: torch.Tensor | None, B: int, N: int, b: int, device) -> torch.Tensor | None:
    """[B, nb, b] bool: real tokens by block (N padded to nb·b), or None when every slot is real."""
    if keep is None and N % b == 0:
        return None
    real = torch.ones(B, N, dtype=torch.bool, device=device) if keep is None else keep
    return pad_to_multiple(real, b, dim=1, value=False).view(B, -1, b)


def valid_pairs(kb: torch.Tensor | None, nb: int, causal: bool, device) -> torch.Tensor:
    """[B or 1, 1, nb, nb] bool: block i may be sorted to block j (both hold a real token; j < i if causal)."""
    valid = torch.ones(1, 1, nb, nb, dtype=torch.bool, device=device)
    if kb is not None:
        real = kb.any(-1)  # (B, nb)
        valid = real[:, None, :, None] & real[:, None, None, :]
    if causal:
        valid = valid & torch.ones(nb, nb, dtype=torch.bool, device=device).tril(-1)
    return valid


def sorted_slot_keep(kb: torch.Tensor | None, valid: torch.Tensor, causal: bool, b: int) -> torch.Tensor | None:
    """[B or 1, 1, nb, b] bool: slot t of block i's sorted partner holds real content (some block
    that block i may be sorted to has a real token in slot t), or None when all do."""
    if kb is None:
        if not causal:
            return None
        nb = valid.shape[-1]
        return valid.any(-1)[..., None].expand(1, 1, nb, b)  # block 0 has no partner
    real = kb.any(-1)  # (B, nb)
    if causal:  # any over j < i of keep_j[t]: cumulative, shifted by one block
        seen = torch.cummax(kb.to(torch.uint8), dim=1).values.bool()  # (B, nb, b): any over j <= i
        slot = torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1)
    else:
        slot = kb.any(1, keepdim=True).expand_as(kb)  # any real block's slot t
    return (slot & real[..., None])[:, None]  # (B, 1, nb, b)


def sinkhorn_block_attention(q, k, v, perm, block_size: int, keep=None, causal: bool = False) -> torch.Tensor:
    """Steps 4-5 for a given (soft) permutation. q, k, v [B, H, N, D]; perm [B, H, nb, nb] (rows:
    query blocks, columns: source blocks; nb = ceil(N / block_size)); keep [B, N] bool or None.
    Returns [B, H, N, D]; a query with no real key gets zeros."""
    B, H, N, D = q.shape
    b = block_size
    kb = block_keep(keep, B, N, b, q.device)  # (B, nb, b) or None
    q, k, v = (pad_to_multiple(t, b, dim=2) for t in (q, k, v))
    nb = q.shape[2] // b
    if kb is not None:  # padded keys and values carry nothing into the sorted blocks
        real = kb.reshape(B, 1, nb * b, 1)
        k, v = k * real, v * real
    perm = perm.to(q.dtype)
    k_sorted = torch.matmul(perm, k.reshape(B, H, nb, b * D)).view(B, H, nb, b, D)  # (B, H, nb, b, D)
    v_sorted = torch.matmul(perm, v.reshape(B, H, nb, b * D)).view(B, H, nb, b, D)
    keys = torch.cat([k_sorted, k.view(B, H, nb, b, D)], dim=3).view(B, H * nb, 2 * b, D)
    values = torch.cat([v_sorted, v.view(B, H, nb, b, D)], dim=3).view(B, H * nb, 2 * b, D)
    valid = valid_pairs(kb, nb, causal, q.device)
    mask = _block_mask(kb, sorted_slot_keep(kb, valid, causal, b), B, H, nb, b, causal, q.device)
    qb = q.view(B, H * nb, b, D)
    if mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(qb, keys, values)
    else:
        out = sdpa_zero_empty_rows(qb, keys, values, mask, None)
    return out.view(B, H, nb * b, D)[:, :, :N]


def _block_mask(kb, slot_keep, B, H, nb, b, causal, device):
    """[B or 1, H·nb or 1, b, 2b] bool over (sorted slots, own block), or None when all may be seen."""
    if kb is None and slot_keep is None and not causal:
        return None
    own = torch.ones(1, 1, nb, 1, b, dtype=torch.bool, device=device)
    if kb is not None:
        own = kb[:, None, :, None, :]  # (B, 1, nb, 1, b)
    if causal:
        own = own & torch.ones(b, b, dtype=torch.bool, device=device).tril()  # (.., nb, b, b)
    srt = torch.ones(1, 1, nb, 1, b, dtype=torch.bool, device=device) if slot_keep is None else slot_keep[:, :, :, None]
    rows = own.shape[-2]
    Bm = max(own.shape[0], srt.shape[0])
    mask = torch.cat([srt.expand(Bm, 1, nb, rows, b), own.expand(Bm, 1, nb, rows, b)], dim=-1)  # (Bm, 1, nb, r, 2b)
    return mask.expand(Bm, H, nb, rows, 2 * b).reshape(Bm, H * nb, rows, 2 * b)


# -- the module ------------------------------------------------------------------------------------------------
class SinkhornAttention(Attention):
    """Sparse Sinkhorn attention (see the module docstring). forward(x [B, N, C], attention_mask
    [B, N] bool or None) -> [B, N, C]. In training the sorting logits get fresh Gumbel noise from the
    global RNG each call (seed it with torch.manual_seed for a reproducible step); eval has none."""

    config_class = SinkhornConfig
    capabilities = Capabilities(causal=True)

    def __init__(self, config: SinkhornConfig):
        super().__init__(config)
        d = config.head_dim
        self.sort_net = nn.Parameter(torch.eye(d).repeat(config.heads, 1, 1))  # (H, D, D): W per head

    def num_blocks(self, n: int) -> int:
        return -(-n // self.config.block_size)

    def sort_logits(self, q, k, keep) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2: (R [B, H, nb, nb] in q's dtype, valid [B or 1, 1, nb, nb])."""
        B, H, N, D = q.shape
        b, causal = self.config.block_size, self.config.causal
        kb = block_keep(keep, B, N, b, q.device)
        nb = self.num_blocks(N)
        qb, kbk = (pad_to_multiple(t, b, dim=2).view(B, H, nb, b, D) for t in (q, k))
        weights = torch.ones(1, 1, nb, b, 1, dtype=q.dtype, device=q.device) if kb is None else \
            kb[:, None, :, :, None].to(q.dtype)
        counts = weights.sum(3).clamp(min=1)  # (B, 1, nb, 1)
        pooled_k = (kbk * weights).sum(3) / counts  # (B, H, nb, D): mean of the block's real keys
        if causal:
            pooled_q = qb[:, :, :, 0] * weights[:, :, :, 0]  # the block's first token (if real)
        else:
            pooled_q = (qb * weights).sum(3) / counts
        scores = torch.matmul(torch.matmul(pooled_q, self.sort_net.to(q.dtype)), pooled_k.transpose(-1, -2))
        return scores * D**-0.5, valid_pairs(kb, nb, causal, q.device)

    def permutation(self, q, k, keep) -> torch.Tensor:
        """Steps 1-3: the soft permutation P [B, H, nb, nb] (float32, or float64 for float64 inputs)."""
        cfg = self.config
        scores, valid = self.sort_logits(q, k, keep)
        scores = scores.float() if scores.dtype != torch.float64 else scores
        if self.training and cfg.gumbel_noise:
            scores = scores + gumbel_like(scores)
        return sinkhorn_normalise(scores / cfg.temperature, valid, cfg.sinkhorn_iters)

    def attend(self, q, k, v, keep, **extra):
        perm = self.permutation(q, k, keep)
        return sinkhorn_block_attention(q, k, v, perm, self.config.block_size, keep, self.config.causal)

    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """Per head: 2b keys for each of nb·b queries; the sort net (nb·D² + nb²·D) and the mixing of
        keys and values by P (2·nb²·b·D)."""
        h, d, b = self.config.heads, self.config.head_dim, self.config.block_size
        nb = self.num_blocks(n)
        pairs = h * nb * b * 2 * b
        other = h * (nb * d * d + nb * nb * d + 2 * nb * nb * b * d)
        return pairwise(pairs, d, self.projection_macs(n), other=other)

    # -- the oracle ----------------------------------------------------------------------------------------
    def reference_attend(self, q, k, v, keep):
        """Written out densely: the mixing as one [N', N'] matrix kron(P, I_b) on the keys and values,
        then softmax attention over [sorted keys; keys] with a mask that keeps, for a query of block i,
        the sorted slots of block i (that hold real content) and its own block's real (earlier) keys."""
        B, H, N, D = q.shape
        b, causal = self.config.block_size, self.config.causal
        perm = self.permutation(q, k, keep).to(q.dtype)  # (B, H, nb, nb)
        nb = perm.shape[-1]
        n_pad = nb * b
        real = torch.ones(B, N, dtype=torch.bool, device=q.device) if keep is None else keep
        real = pad_to_multiple(real, b, dim=1, value=False)  # (B, n_pad)
        q, k, v = (pad_to_multiple(t, b, dim=2) for t in (q, k, v))
        k, v = k * real[:, None, :, None], v * real[:, None, :, None]
        mix = torch.kron(perm, torch.eye(b, dtype=q.dtype, device=q.device))  # (B, H, n_pad, n_pad)
        k_sorted, v_sorted = mix @ k, mix @ v
        pos = torch.arange(n_pad, device=q.device)
        blk = pos // b
        same_block = blk[:, None] == blk[None, :]
        block_real = real.view(B, nb, b).any(-1)  # (B, nb)
        can_sort = block_real[:, :, None] & block_real[:, None, :]  # (B, nb, nb): i may take j
        if causal:
            ids = torch.arange(nb, device=q.device)
            can_sort = can_sort & (ids[None, :] < ids[:, None])
        # sorted slot (block j', slot t) is content when some block i' that j' may take has slot t real
        slot_real = (can_sort[:, :, :, None] & real.view(B, 1, nb, b)).any(2).reshape(B, n_pad)
        sorted_mask = same_block[None] & slot_real[:, None, :]  # (B, n_pad, n_pad)
        own_mask = same_block[None] & real[:, None, :]
        if causal:
            own_mask = own_mask & (pos[None, :] <= pos[:, None])[None]
        mask = torch.cat([sorted_mask, own_mask], dim=-1)[:, None]  # (B, 1, n_pad, 2·n_pad)
        out = reference_attention(q, torch.cat([k_sorted, k], 2), torch.cat([v_sorted, v], 2), mask)
        return out[:, :, :N]

    @classmethod
    def test_configs(cls):
        # Gumbel noise off here: the oracle draws its own noise (tests/test_survey_13a.py checks it seeded)
        return [
            {"block_size": 3, "gumbel_noise": False},
            {"block_size": 2, "sinkhorn_iters": 2, "temperature": 0.5, "gumbel_noise": False, "causal": True},
            {"block_size": 4, "sinkhorn_iters": 0, "gumbel_noise": False},
            {"block_size": 3, "gumbel_noise": False, "causal": True},
        ]
