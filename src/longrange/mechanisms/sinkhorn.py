"""`sinkhorn`: Sparse Sinkhorn Attention (Tay et al., ICML 2020), block-sorted attention.

The sequence is cut into nb blocks of b = `block_size` tokens. Per head:

1. Pool each block: ψQ_i, ψK_j [nb, D] (means over the block's real tokens).
2. Sorting network: R_ij = (ψQ_i W) · ψK_j / √D, how much block i wants block j as its partner
   (W [D, D] a learned map per head, initialised to the identity).
3. Sinkhorn normalisation: L = (R + g) / τ (g Gumbel noise, training only), P = exp(L) [nb, nb],
   then `sinkhorn_iters` rounds of row and column normalisation and a last row normalisation: a
   soft permutation whose rows are convex combinations.
4. Sorted blocks: K̃ = P · K and Ṽ = P · V on the blocked keys/values ([nb, nb] × [nb, b·D]).
5. Each query block attends, with ONE softmax, over 2b keys: its sorted partner block K̃_i and its
   own block K_i.

Shapes: q, k, v [B, H, N, D]; N is padded to nb·b (padding keys masked, padding queries dropped).
Cost per head: O(N·2b·D) for the attention, O(nb²·b·D) = O(N²·D / b) for the mixing in step 4
(a dense matmul: ~15% of the layer's MACs at 16K with b = 64), O(nb·D² + nb²·D) for the sort net;
memory O(N·(2b + D) + nb²).

`causal=True` (the paper's Causal Sinkhorn Balancing): block i may only be sorted to blocks j < i
(R is masked to the strictly lower triangle, and each column is normalised over earlier rows only),
its pooled query is its first token's (the only token every query of the block may see), its own
block is attended causally, and the first block has no partner. Outputs then depend only on earlier
tokens (tested bit for bit).

Padding never changes real tokens: pooling, the sorted keys and the masks use real tokens only
(padded keys and values are zeroed before the mixing; a block with no real token takes part in no
sorting). A sorted slot t of block i is a key when real content is mixed into it, Σ_j P_ij·keep_j[t] > 0
(LRA's sorted padding mask).

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
#: with autograd the blocks' attention is recomputed in backward this many heads at a time (16K,
#: BERT-base, forward+backward peak: 1 head ~700 MiB; 3 heads ~900, 6 heads ~1070, no recomputation 889;
#: lucid's 832)
TRAIN_HEADS_PER_GROUP = 1
#: on CPU the blocks' attention runs over chunks of query blocks whose keys/values with partners take
#: about this many bytes (48 MiB: 64 blocks of 64 at BERT-base, the fastest of 16-128 measured at 16K)
CHUNK_BYTES = 48 * 2**20


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
def sinkhorn_normalise(logits: torch.Tensor, valid: torch.Tensor, iters: int, causal: bool = False) -> torch.Tensor:
    """The soft permutation from `logits` [.., nb, nb]: exp(logits), then `iters` rounds of row then
    column normalisation and a last row normalisation, over the `valid` entries only (the rest are 0,
    and a row with no valid entry is all 0). Computed in float32 (float64 stays).

    The rounds scale rows and columns (Sinkhorn's iteration, which the paper writes in log space);
    starting from exp(logits - row max) keeps every entry in range. causal: Causal Sinkhorn
    Balancing: entry (i, j) is divided by the sum of column j over rows r <= i only (LRA's
    `causal_logsumexp`), so row i depends on rows <= i alone."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute).masked_fill(~valid, _NEG)
    p = torch.exp(x - x.amax(-1, keepdim=True)).masked_fill(~valid, 0.0)
    tiny = torch.finfo(compute).tiny
    keep = None if bool(valid.all()) else valid.to(compute)  # zeroes the gradient of masked entries

    def scaled(p, total):
        p = p / total.clamp_min(tiny)
        return p if keep is None else p * keep

    for _ in range(iters):
        p = scaled(p, p.sum(-1, keepdim=True))
        p = scaled(p, p.cumsum(-2) if causal else p.sum(-2, keepdim=True))
    return scaled(p, p.sum(-1, keepdim=True))


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


def sorted_slot_keep(perm: torch.Tensor, kb: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """[B, H, nb, b] bool: slot t of block i's sorted partner holds real content, Σ_j P_ij·keep_j[t] > 0
    (LRA's sorted padding mask), or None when every slot does (no padding, not causal)."""
    if kb is None:
        if not causal:
            return None
        return (perm.sum(-1) > 0)[..., None].expand(*perm.shape[:-1], 1)  # block 0 has no partner
    return torch.matmul(perm, kb[:, None].to(perm.dtype)) > 0  # (B, H, nb, b)


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
    slot_keep = sorted_slot_keep(perm, kb, causal)  # (B, H, nb, b) bool or None
    blocks = [t.view(B, H, nb, b, D) for t in (q, k, v)]
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, perm))
    if not recording:  # the partner blocks are mixed chunk by chunk, next to their use
        flat = [t.reshape(B, H, nb, b * D) for t in (k, v)]

        def mixed(rows):
            return [torch.matmul(perm[:, :, rows], t).view(B, H, -1, b, D) for t in flat]

        out = _attend_in_chunks(*blocks, mixed, kb, slot_keep, causal)
    else:
        out = _HeadByHead.apply(*blocks, perm, kb, slot_keep, causal)
    return out.view(B, H, nb * b, D)[:, :, :N]


def _attend_blocks(q, k, v, k_mixed, v_mixed, kb, slot_keep, causal):
    """Step 5 on blocks: q, k, v, k_mixed, v_mixed (B, Hh, m, b, D); kb (B, m, b) or None; slot_keep
    (B, Hh, m, b) or None. Each query block over [its sorted partner; itself] -> (B, Hh, m, b, D)."""
    B, Hh, m, b, D = q.shape
    keys = torch.cat([k_mixed, k], dim=3).view(B, Hh * m, 2 * b, D)
    values = torch.cat([v_mixed, v], dim=3).view(B, Hh * m, 2 * b, D)
    mask = _block_mask(kb, slot_keep, B, Hh, m, b, causal, q.device)
    qb = q.reshape(B, Hh * m, b, D)
    if mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(qb, keys, values)
    else:
        out = sdpa_zero_empty_rows(qb, keys, values, mask, None)
    return out.view(B, Hh, m, b, D)


def _attend_in_chunks(q, k, v, mixed, kb, slot_keep, causal):
    """`_attend_blocks` over chunks of query blocks (without autograd), so each chunk's keys/values
    with partners are used while they are in cache: ~1.2-1.4x faster at 16K on CPU than all at once
    (measured, BERT-base). mixed(rows) gives the chunk's (k_mixed, v_mixed)."""
    B, H, nb, b, D = q.shape
    per_block = 2 * 2 * b * D * H * B * q.element_size()
    chunk = nb if q.device.type != "cpu" else max(1, min(nb, CHUNK_BYTES // per_block))
    out = torch.empty_like(q)
    for c0 in range(0, nb, chunk):
        rows = slice(c0, c0 + chunk)
        k_mixed, v_mixed = mixed(rows)
        out[:, :, rows] = _attend_blocks(q[:, :, rows], k[:, :, rows], v[:, :, rows], k_mixed, v_mixed,
                                         None if kb is None else kb[:, rows],
                                         None if slot_keep is None else slot_keep[:, :, rows], causal)
    return out


class _HeadByHead(torch.autograd.Function):
    """Steps 4-5 with autograd, memory-lean. Forward mixes the blocks and attends without a graph,
    saving q, k, v, P and the mixed blocks (not the keys/values with partners, 2x K and V). Backward
    runs one head at a time (`TRAIN_HEADS_PER_GROUP`): it rebuilds that head's keys/values with
    partners, re-runs its SDPA with autograd for the gradients of q, k, v and the mixed blocks, and
    carries the latter through the mixing by hand (∂P = ∂K̃·Kᵀ + ∂Ṽ·Vᵀ, ∂K += Pᵀ·∂K̃, ∂V += Pᵀ·∂Ṽ),
    writing into whole-size gradient buffers. Costs one more forward of the blocks' SDPA (not of the
    projections or the mixing). No double backward. q, k, v: (B, H, nb, b, D) blocks."""

    @staticmethod
    def forward(ctx, q, k, v, perm, kb, slot_keep, causal):
        B, H, nb, b, D = q.shape
        with torch.no_grad():
            k_mixed, v_mixed = (torch.matmul(perm, t.reshape(B, H, nb, b * D)).view(B, H, nb, b, D) for t in (k, v))
            out = _attend_in_chunks(q, k, v, lambda rows: (k_mixed[:, :, rows], v_mixed[:, :, rows]), kb,
                                    slot_keep, causal)
        ctx.kb, ctx.slot_keep, ctx.causal = kb, slot_keep, causal
        ctx.save_for_backward(q, k, v, perm, k_mixed, v_mixed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, perm, k_mixed, v_mixed = ctx.saved_tensors
        B, H, nb, b, D = q.shape
        grads = [torch.empty_like(t) for t in (q, k, v, perm)]
        for h in range(0, H, TRAIN_HEADS_PER_GROUP):
            heads = slice(h, h + TRAIN_HEADS_PER_GROUP)
            parts = [t[:, heads].detach().requires_grad_(True) for t in (q, k, v, k_mixed, v_mixed)]
            slot = None if ctx.slot_keep is None else ctx.slot_keep[:, heads]
            with torch.enable_grad():
                out = _attend_blocks(*parts, ctx.kb, slot, ctx.causal)
            gq, gk, gv, gkm, gvm = torch.autograd.grad(out, parts, grad_out[:, heads])
            p = perm[:, heads]
            gkm, gvm = gkm.reshape(B, -1, nb, b * D), gvm.reshape(B, -1, nb, b * D)
            grads[0][:, heads] = gq
            grads[1][:, heads] = gk + (p.transpose(-1, -2) @ gkm).view_as(gk)
            grads[2][:, heads] = gv + (p.transpose(-1, -2) @ gvm).view_as(gv)
            grads[3][:, heads] = gkm @ k[:, heads].reshape(B, -1, nb, b * D).transpose(-1, -2) + \
                gvm @ v[:, heads].reshape(B, -1, nb, b * D).transpose(-1, -2)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False)), None, None, None)


def _block_mask(kb, slot_keep, B, H, nb, b, causal, device):
    """[B, H·nb, b or 1, 2b] bool over (sorted slots, own block), or None when all may be seen."""
    if kb is None and slot_keep is None and not causal:
        return None
    own = torch.ones(1, 1, nb, 1, b, dtype=torch.bool, device=device)
    if kb is not None:
        own = kb[:, None, :, None, :]  # (B, 1, nb, 1, b)
    if causal:
        own = own & torch.ones(b, b, dtype=torch.bool, device=device).tril()  # (.., nb, b, b)
    rows = own.shape[-2]
    srt = torch.ones(1, 1, nb, 1, b, dtype=torch.bool, device=device) if slot_keep is None else slot_keep[:, :, :, None]
    shape = (B, H, nb, rows, b)
    mask = torch.cat([srt.expand(shape), own.expand(shape)], dim=-1)  # (B, H, nb, rows, 2b)
    return mask.reshape(B, H * nb, rows, 2 * b)


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
        if kb is None:  # every slot real: plain means
            pooled_k = kbk.mean(3)  # (B, H, nb, D)
            pooled_q = qb[:, :, :, 0] if causal else qb.mean(3)
        else:
            weights = kb[:, None, :, :, None].to(q.dtype)  # (B, 1, nb, b, 1)
            counts = weights.sum(3).clamp(min=1)  # (B, 1, nb, 1)
            pooled_k = (kbk * weights).sum(3) / counts  # mean of the block's real keys
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
        return sinkhorn_normalise(scores / cfg.temperature, valid, cfg.sinkhorn_iters, cfg.causal)

    def attend(self, q, k, v, keep, **extra):
        perm = self.permutation(q, k, keep)
        return sinkhorn_block_attention(q, k, v, perm, self.config.block_size, keep, self.config.causal)

    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """Per head: 2b keys for each of nb·b queries; the sort net (nb·D² + nb²·D) and the mixing of
        keys and values by P (2·nb²·b·D); with padding (n not a multiple of b) the sorted slots' mask
        P · keep (nb²·b)."""
        h, d, b = self.config.heads, self.config.head_dim, self.config.block_size
        nb = self.num_blocks(n)
        pairs = h * nb * b * 2 * b
        other = h * (nb * d * d + nb * nb * d + 2 * nb * nb * b * d + (nb * nb * b if n % b else 0))
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
        slot_real = (mix @ real[:, None, :, None].to(q.dtype))[..., 0] > 0  # (B, H, n_pad): real content mixed in
        sorted_mask = same_block[None, None] & slot_real[:, :, None, :]  # (B, H, n_pad, n_pad)
        own_mask = same_block[None] & real[:, None, :]
        if causal:
            own_mask = own_mask & (pos[None, :] <= pos[:, None])[None]
        mask = torch.cat([sorted_mask, own_mask[:, None].expand_as(sorted_mask)], dim=-1)  # (B, H, n_pad, 2·n_pad)
        out = reference_attention(q, torch.cat([k_sorted, k], 2), torch.cat([v_sorted, v], 2), mask)
        return out[:, :, :N]

    @classmethod
    def test_configs(cls):
        # Gumbel noise off here: the oracle draws its own noise (tests/test_survey_learned_axial.py checks it seeded)
        return [
            {"block_size": 3, "gumbel_noise": False},
            {"block_size": 2, "sinkhorn_iters": 2, "temperature": 0.5, "gumbel_noise": False, "causal": True},
            {"block_size": 4, "sinkhorn_iters": 0, "gumbel_noise": False},
            {"block_size": 3, "gumbel_noise": False, "causal": True},
        ]
