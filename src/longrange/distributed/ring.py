"""`full` attention sharded as ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers").

Each rank keeps its queries; the key/value shards travel around the ring (`Comm`'s send to rank
r + 1, receive from rank r - 1), so after P - 1 shifts every rank has seen every key block once.
Each block's scores are merged into a running (max, normaliser, weighted sum): one softmax over all
keys, exactly (online softmax, as FlashAttention merges its key tiles).

Unequal shards: the travelling buffer is padded to the longest shard; which positions a buffer
holds is known from the agreed `Shards` and the ring step (the block seen at step s came from rank
r - s), so only the key-padding mask travels with it (as uint8, and only when some rank has one).

Causal: a block whose keys all come after this shard's queries is not computed (it still passes
on); the diagonal block is masked by position. A query row with no visible real key gives zeros.

Backward (`_RingAttention.backward`) is a second ring, as in the paper: the key/value blocks travel
again together with their gradient accumulators, each rank adding its queries' share to the block
it holds, and one last shift hands every accumulator back to its owner. Memory per rank is
O(n_r·D) plus the scores of one chunk of query rows against one block (`ROW_CHUNK_BYTES`): no rank
ever holds the whole sequence or its scores.

Bytes sent per rank (L = longest shard, X = B·H·L·D·itemsize, M = B·L if a mask travels else 0):
forward (P-1)·(2X + M) ("ring"), backward (P-1)·(2X + M) + P·2X ("ring:backward").

Attention dropout is refused in training: `full` drops with SDPA's random mask, which no sharded
computation can reproduce.
"""

from __future__ import annotations

import torch

from longrange.core.dtypes import compute_dtype
from longrange.distributed.comm import Comm, _shift
from longrange.distributed.context import ContextParallelUnsupported, sharded
from longrange.distributed.shards import Shards
from longrange.mechanisms.feature_maps import finite_or_zero
from longrange.mechanisms.full import FullAttention

NEG_INF = float("-inf")
#: score-sized buffers (scores, probabilities, their gradient) of one chunk of query rows against
#: one travelling block: the ring's memory stays linear in the shard length
ROW_CHUNK_BYTES = 64 * 2**20


@sharded(FullAttention)
def ring_full(cp, attn: FullAttention, x: torch.Tensor, keep: torch.Tensor | None, **inputs) -> torch.Tensor:
    """`full` on this rank's rows [B, n_r, C] -> [B, n_r, C], by ring attention (module docstring)."""
    check_ring_dropout(attn)  # the same config on every rank: every rank raises it, no agreement needed
    with cp.comm.guard():
        if inputs:
            raise TypeError(f"full attention takes no inputs beside x and attention_mask, got {sorted(inputs)}")
    masked = any(flag for (flag,) in cp.comm.gather_ints([int(keep is not None)]))  # does a mask travel?
    q, k, v = attn.project(x)  # 3 x [B, H, n_r, D]
    out = ring_attention(cp.comm, cp.shards, q, k, v, keep, causal=attn.config.causal, masked=masked)
    return attn.merge(out)


def check_ring_dropout(attn: FullAttention) -> None:
    """Attention dropout in training has no sharded form (`ContextParallelUnsupported`)."""
    if attn.training and attn.config.dropout > 0:
        raise ContextParallelUnsupported(
            f"full attention with dropout={attn.config.dropout} in training cannot run sharded: its dropout is "
            "SDPA's random mask, which a ring of key blocks cannot reproduce; set dropout=0 (or call attn.eval()) "
            "for context parallelism")


def ring_attention(comm: Comm, shards: Shards, q, k, v, keep: torch.Tensor | None, *, causal: bool = False,
                   masked: bool | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale) v over the keys of every rank. q, k, v [B, H, n_r, D] this rank's rows
    (`shards` says where they sit); keep [B, n_r] bool (True = real) or None; masked: whether any
    rank passes a keep (they must agree, as the mask travels; None: this rank's keep decides, so pass
    it whenever ranks may differ). Returns [B, H, n_r, D] in q's dtype; rows with no key are zeros."""
    masked = keep is not None if masked is None else masked
    if shards.total == 0:
        return q * 0.0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, keep, comm, shards, causal, masked, scale)


# -- the ring ---------------------------------------------------------------------------------------------
class _RingAttention(torch.autograd.Function):
    """Forward: P blocks merged by online softmax, P - 1 shifts of [k | v] (and the mask). Saves q, k,
    v, the output and the per-row log-sum-exp. Backward: the blocks travel again with their gradient
    accumulators (FlashAttention's backward per block: dS = P ∘ (dP - rowsum(dO ∘ O)))."""

    @staticmethod
    def forward(ctx, q, k, v, keep, comm, shards, causal, masked, scale):
        dtype = compute_dtype(q.dtype)
        ring = _Ring(comm, shards, causal, masked, scale)
        qc = q.to(dtype)
        acc = torch.zeros_like(qc)  # [B, H, n_r, D]: Σ exp(s - top) v
        top = torch.full(q.shape[:3], NEG_INF, dtype=dtype, device=q.device)  # [B, H, n_r]
        total = torch.zeros_like(top)  # Σ exp(s - top)
        for src, kv, keep_src in ring.blocks(_pack(k, v, dtype, ring.width), ring.travelling_mask(keep, q.device)):
            for rows in ring.row_chunks(q):  # [B, H, c, L] scores at a time: memory linear in the shard
                scores = ring.scores(qc[:, :, rows], kv, keep_src, src, rows)
                if scores is None:
                    break
                t0 = top[:, :, rows]
                new_top = torch.maximum(t0, scores.amax(dim=-1))
                shift = finite_or_zero(new_top)
                rescale = torch.exp(t0 - shift)  # exp(-inf) = 0 before the first key
                probs = torch.exp(scores - shift[..., None])  # [B, H, c, L]
                total[:, :, rows] = total[:, :, rows] * rescale + probs.sum(dim=-1)
                acc[:, :, rows] = acc[:, :, rows] * rescale[..., None] + probs @ kv[..., q.shape[-1] :]  # values
                top[:, :, rows] = new_top
        has_key = total > 0
        out = acc / torch.where(has_key, total, 1.0)[..., None]
        lse = torch.where(has_key, finite_or_zero(top) + torch.log(torch.where(has_key, total, 1.0)), NEG_INF)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, keep, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, keep, out, lse = ctx.saved_tensors
        ring, d = ctx.ring, q.shape[-1]
        dtype = out.dtype
        qc, g = q.to(dtype), grad.to(dtype)
        delta = (g * out).sum(dim=-1)  # [B, H, n_r]: rowsum(dO ∘ O)
        lse_safe = finite_or_zero(lse)[..., None]
        dq = torch.zeros_like(qc)
        dkv = None  # [B, H, L, 2D]: the gradient of the block held now, travelling with it
        blocks = ring.blocks(_pack(k, v, dtype, ring.width), ring.travelling_mask(keep, q.device), backward=True)
        for step, (src, kv, keep_src) in enumerate(blocks):
            dkv = torch.zeros_like(kv) if step == 0 else _shift(ring.comm, dkv, 1, "ring:grad:backward")
            for rows in ring.row_chunks(q):
                scores = ring.scores(qc[:, :, rows], kv, keep_src, src, rows)
                if scores is None:
                    break
                probs = torch.exp(scores - lse_safe[:, :, rows])  # [B, H, c, L]; masked keys, keyless rows: 0
                g_c = g[:, :, rows]
                dprobs = g_c @ kv[..., d:].transpose(-1, -2)
                dscores = probs * (dprobs - delta[:, :, rows, None]) * ring.scale
                dq[:, :, rows] += dscores @ kv[..., :d]
                dkv[..., :d] += dscores.transpose(-1, -2) @ qc[:, :, rows]
                dkv[..., d:] += probs.transpose(-1, -2) @ g_c
        dkv = _shift(ring.comm, dkv, 1, "ring:grad:backward")  # home: the owner is the next rank
        n = k.shape[2]
        dk, dv = dkv[..., :n, :d], dkv[..., :n, d:]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


class _Ring:
    """One call's ring: who sends which block when, and each block's mask against this rank's queries."""

    def __init__(self, comm: Comm, shards: Shards, causal: bool, masked: bool, scale: float):
        self.comm, self.shards, self.causal, self.masked, self.scale = comm, shards, causal, masked, scale
        self.width = max(shards.lengths())  # L: every travelling block is padded to the longest shard

    def travelling_mask(self, keep: torch.Tensor | None, device) -> torch.Tensor | None:
        """[B or 1, L] uint8 (1 = real key) of this rank's block, or None when no rank has a mask."""
        if not self.masked:
            return None
        n = self.shards.length
        if keep is None:  # [1, L]: only the fill is padding
            return (torch.arange(self.width, device=device) < n).to(torch.uint8)[None]
        return torch.nn.functional.pad(keep.to(torch.uint8), (0, self.width - n))

    def blocks(self, kv: torch.Tensor, keep: torch.Tensor | None, backward: bool = False):
        """Yield (source rank, [k | v] block [B, H, L, 2D], its mask [B, L] or None), one per rank, shifting
        between them (P - 1 shifts)."""
        kind = "ring:kv:backward" if backward else "ring:kv"
        world, rank = self.comm.world, self.comm.rank
        keep = None if keep is None else self._batch_mask(keep, kv.shape[0])
        for step in range(world):
            if step:
                kv = _shift(self.comm, kv, 1, kind)
                keep = None if keep is None else _shift(self.comm, keep, 1, kind.replace("kv", "mask"))
            yield (rank - step) % world, kv, keep

    @staticmethod
    def _batch_mask(keep: torch.Tensor, batch: int) -> torch.Tensor:
        return keep.expand(batch, -1).contiguous() if keep.shape[0] != batch else keep

    def row_chunks(self, q: torch.Tensor) -> list[slice]:
        """This rank's query rows in chunks whose [B, H, c, L] scores stay within `ROW_CHUNK_BYTES`."""
        n, per_row = q.shape[2], q.shape[0] * q.shape[1] * max(self.width, 1) * 4 * 3  # scores, probs, dS
        c = max(1, ROW_CHUNK_BYTES // per_row)
        return [slice(r0, min(r0 + c, n)) for r0 in range(0, n, c)] or [slice(0, 0)]

    def scores(self, q: torch.Tensor, kv: torch.Tensor, keep_src: torch.Tensor | None, src: int,
               rows: slice | None = None):
        """q [B, H, c, D] (rows `rows` of this rank's queries) · the block's keys -> scaled scores
        [B, H, c, L] with -inf where a key is padding, past the source's length or (causal) after the
        query; None when no pair counts."""
        s, d = self.shards, q.shape[-1]
        rows = slice(0, s.length) if rows is None else rows
        src_lo, src_len = s.offsets[src], s.offsets[src + 1] - s.offsets[src]
        if src_len == 0 or s.length == 0 or (self.causal and src_lo >= s.hi):
            return None  # nothing to see: an empty block, no queries, or keys all in the future
        allowed = torch.arange(self.width, device=q.device) < src_len  # [L]
        if self.causal and src_lo + src_len > s.lo + 1:  # some key after some query: mask by position
            q_pos = torch.arange(s.lo + rows.start, s.lo + rows.stop, device=q.device)[:, None]
            allowed = allowed & (src_lo + torch.arange(self.width, device=q.device) <= q_pos)  # [n_r, L]
        allowed = allowed[None, None] if allowed.dim() == 2 else allowed[None, None, None]
        if keep_src is not None:
            allowed = allowed & keep_src.bool()[:, None, None, :]  # [B, 1, c or 1, L]
        scores = (q @ kv[..., :d].transpose(-1, -2)) * self.scale
        return scores.masked_fill(~allowed, NEG_INF)


def _pack(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
    """[k | v] [B, H, L, 2D] in `dtype`, zero rows padding n_r up to L."""
    kv = torch.cat([k, v], dim=-1).to(dtype)
    return torch.nn.functional.pad(kv, (0, 0, 0, width - k.shape[2]))

