"""Kernel and low-rank mechanisms sharded by all-reducing their key summaries.

Each of these mechanisms reads the keys only through a summary whose size does not grow with N (a
sum over keys), so every rank computes its own keys' share, one all-reduce (or all-gather) adds
the shares, and every rank finishes its own queries locally:

- `performer`, `linear`: S = Σ_j φ(k_j) [v_j, 1]ᵀ [B, H, m, D+1]. Performer's bidirectional key
  stabiliser (a max over every real key of a head) is a `max_all` first. Causal: each rank's total
  is all-gathered and the sum over lower ranks is the state its causal chunks start from.
- `linformer`: E·K and F·V over the sequence axis: rank r applies columns lo..hi-1 of E and F (the
  columns the single-process call gives its positions), then an all-reduce of [B, k, C] (shared
  projections, the input compressed first, with the mass of E over real tokens for the bias) or
  [B, H, k, D] (per-head projections).
- `nystrom`: the landmarks are segment means over the whole sequence (segments may straddle
  shards): per-rank sums and counts per landmark, all-reduced. softmax(Q̃ Kᵀ) V runs over every
  rank's keys, merged exactly by a shared max (`max_all`) and an all-reduce of [Σ e·v, Σ e]. The
  m×m kernel and its pseudo-inverse are then computed identically on every rank, and each rank's
  queries attend to the landmarks locally. The convolution skip takes K // 2 halo rows of v from
  the neighbouring shards (an all-gather of every rank's edge rows).
- `inducing`: ISAB's first stage (the m inducing points attend to every key) is the same merged
  softmax; the rest of MAB(I, X) works on m rows, identically on every rank.

Gradients run through the collectives' adjoints: a value every rank recomputes from an all-reduced
summary gets each rank's share of its gradient, summed by the all-reduce's backward.

Bytes per rank, forward (P ranks, s = itemsize; an all-reduce is counted as ring: 2(P-1)/P of it):
performer/linear 2(P-1)/P·B·H·m·(D+1)·s (+ the max, 2(P-1)/P·B·H·s, for performer's softmax
kernel), causal (P-1)·B·H·m·(D+1)·s; linformer 2(P-1)/P·B·k·(C+1)·s per projection (shared) or
2(P-1)/P·2·B·H·k·D·s (per head); nystrom 2(P-1)/P·(B·H·m·(3D+1) + B·m + B·H·m)·s
+ (P-1)·2·w·B·H·D·s with a convolution of half-width w; inducing 2(P-1)/P·(B·H·m·(D+2)·s + 4·B)
(the last: which examples hold a real token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longrange.core.dtypes import compute_dtype
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.distributed.comm import Comm
from longrange.distributed.context import refuse, sharded
from longrange.distributed.shards import Shards
from longrange.distributed.softmax import global_softmax, row_max
from longrange.mechanisms.axial import AxialAttention
from longrange.mechanisms.feature_maps import (
    FeatureMap,
    RecurrentState,
    causal_chunks,
    finite_or_zero,
    group_rows,
    normalise,
    with_ones,
)
from longrange.mechanisms.inducing import InducingAttention
from longrange.mechanisms.linear import LinearAttention
from longrange.mechanisms.linformer import LinformerAttention, _affine, _compress_input, compress
from longrange.mechanisms.memory_compressed import MemoryCompressedAttention
from longrange.mechanisms.nystrom import NystromAttention, landmark_kernel, pinv, sequence_conv
from longrange.mechanisms.performer import PerformerAttention
from longrange.mechanisms.reformer import ReformerAttention
from longrange.mechanisms.routing import RoutingAttention
from longrange.mechanisms.sinkhorn import SinkhornAttention
from longrange.mechanisms.synthesizer import SynthesizerAttention

Tensor = torch.Tensor


# -- shared pieces ------------------------------------------------------------------------------------------
def check_no_inputs(cp, attn, inputs: dict) -> None:
    """These mechanisms take no inputs beside x and attention_mask (an error on every rank otherwise)."""
    with cp.comm.guard():
        if inputs:
            raise TypeError(f"{attn.config.name} takes no inputs beside x and attention_mask, got {sorted(inputs)}")


def real_tokens(keep: Tensor | None, batch: int, n: int, device) -> Tensor:
    """keep [B, n] bool, or all True when there is no mask (so every rank contributes alike)."""
    return torch.ones(batch, n, dtype=torch.bool, device=device) if keep is None else keep


def all_reduce_packed(comm: Comm, parts: list[Tensor], kind: str) -> list[Tensor]:
    """Sum several tensors (one dtype) over the ranks in ONE all-reduce: flattened, concatenated, split."""
    flat = comm.all_reduce(torch.cat([p.reshape(-1) for p in parts]), kind)
    out, start = [], 0
    for p in parts:
        out.append(flat[start : start + p.numel()].view(p.shape))
        start += p.numel()
    return out


def global_any(comm: Comm, flags: Tensor) -> Tensor:
    """Elementwise OR over the ranks of a bool tensor (same shape on every rank)."""
    return comm.max_all(flags.to(torch.float32)) > 0


# -- performer, linear ---------------------------------------------------------------------------------------
@sharded(PerformerAttention, LinearAttention)
def feature_map_sharded(cp, attn, x: Tensor, keep: Tensor | None, **inputs) -> Tensor:
    """Performer / linear attention on this rank's rows: the key summary all-reduced (causal: the
    lower ranks' totals all-gathered as the starting state)."""
    check_no_inputs(cp, attn, inputs)
    count = getattr(attn, "_count_training_call", None)
    if count is not None:  # performer's feature redraws follow the calls, as in forward
        count()
    q, k, v = attn.project(x)  # [B, H, n_r, D]
    dtype = compute_dtype(q.dtype)
    fmap = attn.feature_map(dtype, q.device)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if attn.config.causal:
        out = causal_features(cp.comm, fmap, q, k, v, keep, attn.config.chunk_size)
    else:
        out = bidirectional_features(cp.comm, fmap, q, k, v, keep)
    return attn.merge(out.to(x.dtype))


def bidirectional_features(comm: Comm, fmap: FeatureMap, q, k, v, keep) -> Tensor:
    """out_i = φ(q_i) S / φ(q_i) z with S, z summed over every rank's keys. With `key_logits`, φ(k) =
    exp(logits - c) for c the max over every rank's real keys of a head (`max_all`), as one process
    takes it over all keys. Sends one all-reduce of [B, H, m, D+1] (and the max, [B, H])."""
    if fmap.key_logits is None:
        fk = fmap.keys(k, keep)  # [B, H, n_r, m], padding zero
    else:
        logits = fmap.key_logits(k, keep)  # [B, H, n_r, m], padding -inf
        top = row_max(logits.flatten(-2))  # [B, H]
        top = finite_or_zero(comm.max_all(top))[..., None, None]
        fk = torch.exp(logits - top)
    summary = comm.all_reduce(fk.transpose(-1, -2) @ with_ones(v), "all_reduce:summary")  # [B, H, m, D+1]
    return normalise(fmap.queries(q) @ summary)  # [B, H, n_r, D]


def causal_features(comm: Comm, fmap: FeatureMap, q, k, v, keep, chunk_size: int) -> Tensor:
    """Causal feature attention: the state before this shard is Σ over lower ranks of their keys'
    φ(k)[v, 1]ᵀ (each rank's total all-gathered: (P-1)·B·H·m·(D+1) elements sent), then the
    single-process chunked algorithm runs from it."""
    total = local_key_total(fmap, k, v, keep)  # [B, H, m, D+1]
    totals = comm.all_gather(total[None], "all_gather:prefix")  # [P, B, H, m, D+1]
    # Σ over the lower ranks, as a masked sum so that every rank's output depends on `totals`: each rank
    # must run the all-gather's backward, or the ranks above it wait for its share forever
    lower = (torch.arange(comm.world, device=q.device) < comm.rank).to(total.dtype)  # [P]
    before = (totals * lower[:, None, None, None, None]).sum(dim=0)  # [B, H, m, D+1]
    state = RecurrentState(before[..., :-1], before[..., -1])
    if q.shape[2] == 0:  # no queries here (the chunked loop needs rows): still on the graph of `before`
        return q * 0.0 + before.sum() * 0.0
    out, _ = causal_chunks(fmap, q, k, v, keep, state, chunk_size)
    return out


def local_key_total(fmap: FeatureMap, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """Σ_j φ(k_j) [v_j, 1]ᵀ over this rank's keys with the causal (row-local) key features, in row
    chunks -> [B, H, m, D+1]. A rank without keys still computes it from its (empty) k and v, so that
    its total is on the autograd graph like every other rank's (the all-gather's backward runs on all)."""
    rows = group_rows(k, fmap.num_features)
    total = None
    for start in range(0, max(k.shape[2], 1), rows):
        part = slice(start, start + rows)
        fk = fmap.keys(k[:, :, part], None if keep is None else keep[:, part])  # [B, H, rows, m]
        contribution = fk.transpose(-1, -2) @ with_ones(v[:, :, part])
        total = contribution if total is None else total + contribution
    return total


# -- linformer -------------------------------------------------------------------------------------------
@sharded(LinformerAttention)
def linformer_sharded(cp, attn: LinformerAttention, x: Tensor, keep: Tensor | None, **inputs) -> Tensor:
    """Linformer on this rank's rows: its columns lo..hi-1 of E and F compress its keys and values,
    and an all-reduce sums the compressed [k, *] rows over the ranks (module docstring)."""
    check_no_inputs(cp, attn, inputs)
    s = cp.shards
    with cp.comm.guard():
        attn.check_length(s.total)  # the whole sequence must fit seq_len, as in one process
    keep = real_tokens(keep, x.shape[0], x.shape[1], x.device)
    columns = [p[..., s.lo : s.hi] for p in attn.projections]  # E, F: [k or H·k, n_r]
    if attn.config.sharing == "none":
        return attn.merge(_linformer_per_head(cp.comm, attn, x, keep, *columns))
    return attn.merge(_linformer_shared(cp.comm, attn, x, keep, *columns))


def _linformer_per_head(comm: Comm, attn, x, keep, e_cols, f_cols) -> Tensor:
    """Per-head E, F [H, k, n_r]: project, zero padding, compress, all-reduce [B, H, k, 2D]."""
    q, k, v = attn.project(x)  # [B, H, n_r, D]
    k, v = k * keep[:, None, :, None], v * keep[:, None, :, None]
    k_low, v_low = all_reduce_packed(comm, [compress(e_cols, k), compress(f_cols, v)], "all_reduce:compressed")
    return F.scaled_dot_product_attention(q, k_low, v_low)


def _linformer_shared(comm: Comm, attn, x, keep, e_cols, f_cols) -> Tensor:
    """Shared E, F [k, n_r]: compress x first (E x and E·keep, the bias's mass), all-reduce [B, k, C+1]
    per projection, then project the k rows to keys and values, as `_attend_compressed_input`."""
    c = attn.config.dim
    w_q, w_k, w_v = attn.qkv.weight.chunk(3, dim=0)  # [C, C] each
    b_q, b_k, b_v = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)
    q = attn.split_heads(F.linear(x, w_q, b_q))  # [B, H, n_r, D]
    x = x * keep[..., None]
    parts = [_compress_input(e_cols, x, keep)]  # ([B, k, C], [B, k])
    if attn.proj_v is not None:
        parts.append(_compress_input(f_cols, x, keep))
    packed = all_reduce_packed(comm, [torch.cat([px, mass[..., None]], dim=-1) for px, mass in parts],
                               "all_reduce:compressed")  # [B, k, C+1] each
    ex, mass_e = packed[0][..., :c], packed[0][..., c]
    fx, mass_f = (ex, mass_e) if len(packed) == 1 else (packed[1][..., :c], packed[1][..., c])  # kv sharing: E = F
    k_low, v_low = _affine(ex, w_k, b_k, mass_e), _affine(fx, w_v, b_v, mass_f)  # [B, k, C]
    return F.scaled_dot_product_attention(q, attn.split_heads(k_low), attn.split_heads(v_low))


# -- nystrom ---------------------------------------------------------------------------------------------
@sharded(NystromAttention)
def nystrom_sharded(cp, attn: NystromAttention, x: Tensor, keep: Tensor | None, **inputs) -> Tensor:
    """Nyströmformer on this rank's rows (module docstring): landmarks from all-reduced segment sums,
    the landmarks' softmax over every key merged across ranks, the rest m×m or local."""
    check_no_inputs(cp, attn, inputs)
    cfg, s, comm = attn.config, cp.shards, cp.comm
    q, k, v = attn.project(x)  # [B, H, n_r, D]
    scale = q.shape[-1] ** -0.5
    real = real_tokens(keep, x.shape[0], x.shape[1], x.device)
    q_l, k_l, has = sharded_landmarks(comm, s, q, k, real, cfg.num_landmarks)  # [B, H, m, D] x 2, [B, m]
    kernel = landmark_kernel(q_l, k_l, has, scale)  # [B, H, m, m], the same on every rank
    w = global_softmax(comm, q_l, k, v, has[:, None, :, None] & real[:, None, None, :], scale)  # [B, H, m, D]
    w = torch.matmul(pinv(kernel, cfg.pinv_iterations), w.to(kernel.dtype)).to(q.dtype)
    out = _attend_landmarks(q, k_l, w, has, scale)  # [B, H, n_r, D]
    if attn.conv is not None:
        out = out + sharded_conv(comm, s, v * real[:, None, :, None], attn.conv.weight[:, 0, :, 0])
    return attn.merge(out)


def sharded_landmarks(comm: Comm, shards: Shards, q: Tensor, k: Tensor, real: Tensor, m: int):
    """Segment means of q and k over the whole sequence (N padded to a multiple of m: segments of
    ceil(N / m) positions, real tokens only) from this rank's rows: per-landmark sums and counts,
    one all-reduce of [B, H, m, 2D] + [B, m]. -> (q̃, k̃ [B, H, m, D], has [B, m])."""
    seg = -(-shards.total // m)
    positions = torch.arange(shards.lo, shards.hi, device=q.device)
    member = (positions[None, :] // seg == torch.arange(m, device=q.device)[:, None])  # [m, n_r]
    weights = (member[None] & real[:, None, :]).to(q.dtype)  # [B, m, n_r]
    sums = weights[:, None] @ torch.cat([q, k], dim=-1)  # [B, H, m, 2D]
    sums, counts = all_reduce_packed(comm, [sums, weights.sum(dim=-1)], "all_reduce:landmarks")
    means = sums / counts.clamp(min=1)[:, None, :, None]
    d = q.shape[-1]
    return means[..., :d], means[..., d:], counts > 0


def _attend_landmarks(q, k_l, w, has, scale) -> Tensor:
    """softmax(Q K̃ᵀ) W' over the real landmarks, local: [B, H, n_r, D] (rows without one: zeros). Also
    for n_r = 0, so that the output stays on the graph of the collectives (see `causal_features`)."""
    return sdpa_zero_empty_rows(q, k_l, w, has[:, None, None, :], scale)


def sharded_conv(comm: Comm, shards: Shards, v: Tensor, weight: Tensor) -> Tensor:
    """`sequence_conv` (kernel K odd, zero "same" padding) of the whole sequence's v [B, H, N, D] at this
    rank's rows: its rows with w = K // 2 halo rows on each side from the neighbouring shards."""
    w = weight.shape[-1] // 2
    if w == 0:
        return sequence_conv(v, weight)
    left, right = halo_rows(comm, shards, v, w)  # [B, H, w, D] each
    wide = torch.cat([left, v, right], dim=2)  # [B, H, w + n_r + w, D]
    return sequence_conv(wide, weight)[:, :, w : w + v.shape[2]]


def halo_rows(comm: Comm, shards: Shards, t: Tensor, w: int) -> tuple[Tensor, Tensor]:
    """The w rows of the whole sequence just before and just after this shard (zeros beyond its ends).
    Every rank's first and last w rows (fewer if its shard is shorter, zero-filled) are all-gathered:
    (P-1)·2·w·B·H·D elements sent per rank. t [B, H, n_r, D] -> ([B, H, w, D], [B, H, w, D])."""
    n = t.shape[2]
    edges = torch.stack([F.pad(t[:, :, : min(w, n)], (0, 0, 0, w - min(w, n))),  # head, left-aligned
                         F.pad(t[:, :, n - min(w, n) :], (0, 0, w - min(w, n), 0))])  # tail, right-aligned
    every = comm.all_gather(edges, "all_gather:halo")  # [2P, B, H, w, D]: rank r's head at 2r, tail at 2r + 1
    rows = torch.cat([every.movedim(3, 1).flatten(0, 1), every.new_zeros(1, *every.shape[1:3], every.shape[4])])
    owner = shards.owner(torch.arange(shards.total)).tolist()

    def row(p: int, side: int) -> int:  # the index in `rows` of position p (its last row: zeros outside)
        if not 0 <= p < shards.total:
            return rows.shape[0] - 1
        r = owner[p]
        index = p - shards.offsets[r] if side == 0 else w - (shards.offsets[r + 1] - p)
        return (2 * r + side) * w + index

    # gathered by index, never skipped: every rank's output must depend on the all-gather (its backward)
    left = [row(p, 1) for p in range(shards.lo - w, shards.lo)]
    right = [row(p, 0) for p in range(shards.hi, shards.hi + w)]
    picked = rows[torch.tensor(left + right, device=t.device)]  # [2w, B, H, D]
    return picked[:w].movedim(0, 2), picked[w:].movedim(0, 2)


# -- inducing --------------------------------------------------------------------------------------------
@sharded(InducingAttention)
def inducing_sharded(cp, attn: InducingAttention, x: Tensor, keep: Tensor | None, **inputs) -> Tensor:
    """ISAB on this rank's rows: stage 1 (the inducing points over every key) is `global_softmax`, the
    summary H [B, m, C] is then the same on every rank, and stage 2 is local."""
    check_no_inputs(cp, attn, inputs)
    comm = cp.comm
    q, k, v = attn.project(x)  # [B, H, n_r, D]

    def attention(q_i, k_, v_, mask, scale):
        return global_softmax(comm, q_i, k_, v_, mask, q_i.shape[-1] ** -0.5 if scale is None else scale,
                              "all_reduce:inducing")

    k_h, v_h = attn.split_summary(attn.summarize(k, v, keep, attention))  # [B, H, m, D] x 2
    out = F.scaled_dot_product_attention(q, k_h, v_h)  # [B, H, n_r, D] (n_r = 0 too: on the collectives' graph)
    real = real_tokens(keep, x.shape[0], x.shape[1], x.device)
    has_token = global_any(comm, real.any(dim=1))  # [B]: the example has a real token on some rank
    return attn.merge(out * has_token[:, None, None, None].to(out.dtype))


# -- refused ---------------------------------------------------------------------------------------------
refuse(SynthesizerAttention,
       "synthesizer's weights for a query span every position's value with position-specific logits (a "
       "learned N-wide row or matrix), which needs the values of every shard (a ring over them), not implemented")
refuse(AxialAttention,
       "axial's column pass mixes tokens a whole grid row apart, across every shard; it needs an all-to-all "
       "re-layout of the grid, not implemented")
refuse(RoutingAttention,
       "routing picks each cluster's members by a top-w over the whole sequence and runs sliding windows across "
       "shard edges; neither has a sharded form here")
refuse(SinkhornAttention,
       "sinkhorn's sorted blocks are soft mixtures of every block's keys and values (P·K over all N tokens), so "
       "each rank would need the whole K and V: no cheaper than gathering")
refuse(MemoryCompressedAttention,
       "memory_compressed convolves windows of c tokens that straddle shards and lets every query see all N/c "
       "slots, so each rank would assemble every slot (O(N/c) per rank); that sharded form is not implemented")
refuse(ReformerAttention,
       "reformer sorts the whole sequence by hash bucket and attends within chunks of that global order, which "
       "cross shards arbitrarily; an exact sharded form needs a distributed sort, not implemented")
