"""The feature-map attention core shared by `performer` and `linear`: one algorithm, two feature maps.

Kernelised attention replaces exp(q·k) by φ(q)·φ(k) for a feature map φ: [..., D] -> [..., m]
with non-negative outputs, so that

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)

can be computed without the [N, N] matrix, in O(N·m·D) time and O(N·(m + D)) memory:

- bidirectional: one key summary S = Σ_j φ(k_j) [v_j, 1]ᵀ ([m, D+1]; its last column is z = Σ_j φ(k_j),
  the normaliser, computed by the same matmul), then out_i = φ(q_i) S.
- causal: chunks of c tokens; inside a chunk the small masked [c, c] product φ(q) φ(k)ᵀ, across
  chunks the state S of all earlier keys (prefix sums over chunks: N/c states of [m, D+1], never the
  N states, O(N·m·D), of a per-token prefix sum).
- recurrent step (decoding): the causal algorithm started from a given state, returning the new one.

Long inputs are taken in row chunks of at most CHUNK_ELEMENTS features (keys, then queries; causal:
groups of chunks with S carried between groups), which bounds the memory beyond ~16K tokens.

Training (a gradient needed) runs `FeatureAttentionFunction`: the same algorithm in chunks of at
most GRAD_CHUNK_ELEMENTS features, keeping q, k, v, the output, the normalisers and the summaries
only, and recomputing φ chunk by chunk in backward (causal: group by group in reverse, the summary's
gradient carried backwards). Autograd would keep φ(q), φ(k) and their stabilisers: N·m per head each.

A `FeatureMap` gives row-local `queries(q)` and `keys(k, keep)` (row j's features depend on row j
only, so any chunking and any order of steps gives the same features). It may also give
`key_logits(k, keep)`: then the bidirectional call uses φ(k) = exp(logits - c) with c the max over
all real keys and features of a head (a constant per head, so it cancels in the normalisation);
the chunked key loop keeps a running max and rescales S when it grows, as online softmax does.
Padded keys get zero features; a query with no real key (zero normaliser) returns zeros, never NaN.
Half-precision inputs are computed in float32 (the sums over N overflow fp16) and returned in their
own dtype; float64 stays float64.

Symbols: B batch, H heads, N tokens, D head dim, m features, c chunk length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from longrange.core.config import check_bool, check_positive_int
from longrange.core.dtypes import compute_dtype
from longrange.core.flops import MacCount
from longrange.core.interface import Attention, CacheSpec, Capabilities
from longrange.core.masking import check_key_padding_mask, check_qkv

Tensor = torch.Tensor

#: the row loops (bidirectional keys and queries, causal groups) take at most this many [B, H, rows, m]
#: feature elements at a time (256 MB in float32): up to 16K tokens x 12 heads x 256 features the whole
#: sequence is one chunk, beyond that memory stays bounded. Measured on CPU: a few large ops beat
#: cache-sized chunks, since every op is a thread barrier and on a busy machine their count dominates.
CHUNK_ELEMENTS = 2**26
#: the training path (`FeatureAttentionFunction`) takes at most this many feature elements at a time
#: (and at most CHUNK_ELEMENTS): its backward holds a few such chunks (φ, dφ) beside the gradients
GRAD_CHUNK_ELEMENTS = 2**22


class RecurrentState(NamedTuple):
    """Constant-size decoding state of causal feature-map attention (accumulation dtype)."""

    kv: Tensor  # S = Σ_j φ(k_j) v_jᵀ   [B, H, m, D]
    k_sum: Tensor  # z = Σ_j φ(k_j)      [B, H, m]


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    """φ for queries and keys, on rows [..., n, D] in the compute dtype -> [..., n, m].

    `queries(q)` and `keys(k, keep)` are row-local; `keep` is the [B, n] key-padding mask (or None)
    and padded keys get zero features. `key_logits(k, keep)` (optional) gives log-features with
    padded keys at -inf, for the bidirectional call's shared per-head stabiliser (module docstring).
    `queries_grad(q, φ(q), dφ)` and `keys_grad(k, keep, φ(k), dφ)` (optional) give the gradient
    reaching the rows from the gradient dφ reaching their features (they may overwrite dφ); every
    stabiliser (a constant per row or per head) counts as a constant, as it cancels. Without them
    (or without a gradient) autograd runs through the forward.
    """

    num_features: int
    queries: Callable[[Tensor], Tensor]
    keys: Callable[[Tensor, Tensor | None], Tensor]
    key_logits: Callable[[Tensor, Tensor | None], Tensor] | None = None
    macs_per_row: int = 0  # MACs to map one row (query or key) to its features, for MAC counts
    exps_per_row: int = 0  # exponentials per row, likewise
    queries_grad: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    keys_grad: Callable[[Tensor, Tensor | None, Tensor, Tensor], Tensor] | None = None

    @property
    def differentiable(self) -> bool:
        """True when the training path can differentiate the features by hand."""
        return self.queries_grad is not None and self.keys_grad is not None

    def shared_keys(self, k: Tensor, keep: Tensor | None) -> Tensor:
        """Key features of the bidirectional call, for all of k at once (the dense oracle's view)."""
        if self.key_logits is None:
            return self.keys(k, keep)
        logits = self.key_logits(k, keep)  # [B, H, N, m]
        return logits.sub_(finite_or_zero(logits.detach().amax(dim=(-2, -1), keepdim=True))).exp_()


def padding_rows(keep: Tensor | None, like: Tensor) -> Tensor | None:
    """[B, n] key mask -> [B, 1, n, 1] (broadcast over heads and features), or None."""
    return None if keep is None else keep[:, None, :, None].to(like.device)


# -- the three algorithms -------------------------------------------------------------------------------
def feature_attention(
    fmap: FeatureMap,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    *,
    causal: bool = False,
    chunk_size: int = 64,
    recompute: bool = True,
) -> Tensor:
    """Normalised feature-map attention on [B, H, N, D]; returns [B, H, N, D] in q's dtype.

    `fmap` must already work in `compute_dtype(q.dtype)` (its projection cast there). When a
    gradient is needed and `fmap` gives the derivatives of its features, the call is one autograd
    Function that keeps only q, k, v, the output, the per-row normalisers and the key summary, and
    recomputes the features chunk by chunk in backward (`FeatureAttentionFunction`);
    `recompute=False` runs plain autograd through the forward instead (the tests' reference)."""
    check_qkv(q, k, v)
    check_positive_int("chunk_size", chunk_size)
    check_bool("recompute", recompute)
    keep = check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[2], "key_padding_mask")
    if q.shape[2] == 0:
        return q * 0.0  # no tokens: an empty output
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if recompute and needs_grad and fmap.differentiable:
        return FeatureAttentionFunction.apply(fmap, q, k, v, keep, causal, chunk_size)
    in_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if causal:
        state = zero_state(q.shape[0], q.shape[1], fmap.num_features, q.shape[3], q.device, dtype)
        out, _ = causal_chunks(fmap, q, k, v, keep, state, chunk_size)
    else:
        out = bidirectional(fmap, q, k, v, keep)
    return out.to(in_dtype)


def bidirectional(fmap: FeatureMap, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """All keys for every query: S = Σ_j φ(k_j) [v_j, 1]ᵀ, then φ(q_i) S, both chunk by chunk of rows."""
    n, rows = q.shape[2], group_rows(q, fmap.num_features)
    summary, _ = key_summary(fmap, k, v, keep, rows)  # [B, H, m, D+1]
    outs = [fmap.queries(q[:, :, i : i + rows]) @ summary for i in range(0, n, rows)]  # [B, H, rows, D+1]
    return normalise(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])  # [B, H, N, D]


def group_rows(q: Tensor, features: int, multiple: int = 1, budget: int | None = None) -> int:
    """Rows per chunk of the row loops for q [B, H, N, D]: see `rows_per_chunk`."""
    return rows_per_chunk(q.shape[0] * q.shape[1], features, multiple, budget)


def rows_per_chunk(batch_heads: int, features: int, multiple: int = 1, budget: int | None = None) -> int:
    """At most `budget` (default CHUNK_ELEMENTS) feature elements per chunk (at least one row),
    rounded up to a multiple of `multiple`."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    rows = max(1, budget // (batch_heads * features))
    return -(-rows // multiple) * multiple


def key_summary(
    fmap: FeatureMap, k: Tensor, v: Tensor, keep: Tensor | None, rows: int, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor | None]:
    """Σ_j φ(k_j) [v_j, 1]ᵀ over all keys, `rows` keys at a time (cast to `dtype` chunk by chunk)
    -> ([B, H, m, D+1], the key offset c [B, H, 1, 1] or None). With `key_logits`,
    φ(k_j) = exp(logits_j - c) for c the max over every real key of the head: a running max, the
    partial sum rescaled by exp(c_old - c_new) <= 1 whenever it grows (the online-softmax trick).
    c is 0 for a head without a real key (its sum is 0)."""
    summary, top = None, None
    for start in range(0, k.shape[2], rows):
        part = slice(start, start + rows)
        kc, keep_c = _chunk(k, part, dtype), None if keep is None else keep[:, part]
        vc = with_ones(_chunk(v, part, dtype))  # [B, H, rows, D+1]
        if fmap.key_logits is None:
            contribution = fmap.keys(kc, keep_c).transpose(-1, -2) @ vc  # [B, H, m, D+1]
            summary = contribution if summary is None else summary + contribution
            continue
        logits = fmap.key_logits(kc, keep_c)  # [B, H, rows, m], padding -inf
        chunk_top = logits.detach().amax(dim=(-2, -1), keepdim=True)  # [B, H, 1, 1]
        new_top = chunk_top if top is None else torch.maximum(top, chunk_top)
        safe_top = finite_or_zero(new_top)  # -inf while a head has seen no real key
        contribution = logits.sub_(safe_top).exp_().transpose(-1, -2) @ vc  # [B, H, m, D+1]
        if summary is None:
            summary = contribution
        else:  # exp(-inf - x) = 0 rescales the (all-zero) sum of a head that had no real key yet
            summary = (summary * torch.exp(top - safe_top)).add_(contribution)
        top = new_top
    return summary, None if top is None else finite_or_zero(top)


def _chunk(t: Tensor, part: slice, dtype: torch.dtype | None) -> Tensor:
    """Rows `part` of t [B, H, N, ...], in `dtype` (None: as they are)."""
    rows = t[:, :, part]
    return rows if dtype is None else rows.to(dtype)


def causal_chunks(
    fmap: FeatureMap, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, state: RecurrentState, chunk_size: int
) -> tuple[Tensor, RecurrentState]:
    """Query i sees keys j <= i plus everything in `state`, in chunks of c = chunk_size tokens: inside
    a chunk the masked [c, c] product, across chunks the summary S of all earlier keys. Chunks are
    batched in groups (prefix sums over the group's chunks; the summary is carried across groups), so
    the loop runs few ops, and memory is O(rows·(m + c) + rows/c·m·D) for rows = min(N, group size)."""
    c = min(chunk_size, q.shape[2])
    rows = group_rows(q, fmap.num_features, multiple=c)
    summary = torch.cat([state.kv, state.k_sum[..., None]], dim=-1)  # [B, H, m, D+1]
    v1 = with_ones(v)  # [B, H, N, D+1]
    outs = []
    for start in range(0, q.shape[2], rows):
        part = slice(start, start + rows)
        fq = fmap.queries(q[:, :, part])  # [B, H, rows, m]
        fk = fmap.keys(k[:, :, part], None if keep is None else keep[:, part])  # [B, H, rows, m]
        out, summary = causal_group(fq, fk, v1[:, :, part], summary, c)
        outs.append(out)
    out = normalise(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    return out, RecurrentState(summary[..., :-1], summary[..., -1])


def causal_group(fq: Tensor, fk: Tensor, v1: Tensor, summary: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """One group of rows, cut into g chunks of c (zero rows pad the last: zero features add nothing).
    fq, fk [B, H, n, m], v1 [B, H, n, D+1], summary [B, H, m, D+1] of the keys before the group
    -> (Σ_j φ(q_i)·φ(k_j) [v_j, 1] for every row [B, H, n, D+1], the summary after the group)."""
    n = fq.shape[2]
    fq, fk, v1 = (as_chunks(t, c) for t in (fq, fk, v1))  # [B, H, g, c, *]
    sums = fk.transpose(-1, -2) @ v1  # [B, H, g, m, D+1], each chunk's keys
    prefix = torch.cat([summary[:, :, None], sums], dim=2).cumsum_(dim=2)  # [B, H, g+1, m, D+1]
    within = (fq @ fk.transpose(-1, -2)).tril_()  # [B, H, g, c, c], key j <= query i
    out = (fq @ prefix[:, :, :-1]).add_(within @ v1)  # [B, H, g, c, D+1]: earlier chunks + own chunk
    return out.flatten(2, 3)[:, :, :n], prefix[:, :, -1]


def as_chunks(t: Tensor, c: int) -> Tensor:
    """[B, H, n, X] -> [B, H, ceil(n / c), c, X], zero rows padding the last chunk."""
    b, h, n, x = t.shape
    pad = -n % c
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    return t.view(b, h, (n + pad) // c, c, x)


# -- training: a Function that recomputes the features in backward ---------------------------------------
class FeatureAttentionFunction(torch.autograd.Function):
    """`feature_attention` with gradients, FlashAttention's principle applied to feature maps: the
    forward keeps q, k, v, the output o, the per-row normalisers z = φ(q_i)·Σ_j φ(k_j) and (bidirectional)
    the key summary S and key offset c, or (causal) the summary at the start of every group of rows;
    the backward recomputes φ(q), φ(k) chunk by chunk and differentiates by hand. Memory beyond the
    inputs and outputs: O(rows·m) for a chunk of `rows` (GRAD_CHUNK_ELEMENTS), never [N, m].

    With u_i = φ(q_i) S = [Σ_j w_ij v_j, z_i] and o_i = u_i[:D] / z_i, the gradient reaching u_i is
    du_i = [g_i, -g_i·o_i] / z_i (a row with z_i = 0 divides by 1, as the forward does). Then
    bidirectional: dS = Σ_i φ(q_i)ᵀ du_i, dφ(q_i) = du_i Sᵀ, dφ(k_j) = [v_j, 1] dSᵀ, dv_j = φ(k_j) dS[:, :D];
    causal: the same per chunk with the exclusive prefix P_t of the chunks before t and the masked
    within-chunk product A; the prefix's gradient runs over the chunks in reverse (groups last to
    first, a carried dS). φ's own derivative comes from `FeatureMap.queries_grad` / `keys_grad`."""

    @staticmethod
    def forward(ctx, fmap, q, k, v, keep, causal, chunk_size):
        dtype = compute_dtype(q.dtype)
        rows = group_rows(q, fmap.num_features, budget=min(CHUNK_ELEMENTS, GRAD_CHUNK_ELEMENTS))
        out = torch.empty_like(q)  # [B, H, N, D] in q's dtype
        z = q.new_empty(q.shape[:3], dtype=dtype)  # [B, H, N]
        c = max(1, min(chunk_size, q.shape[2]))
        if causal:
            rows = -(-rows // c) * c
            states = _causal_train_forward(fmap, q, k, v, keep, rows, c, dtype, out, z)
            saved = (states,)
        else:
            summary, top = key_summary(fmap, k, v, keep, rows, dtype)  # [B, H, m, D+1], [B, H, 1, 1]
            for start in range(0, q.shape[2], rows):
                part = slice(start, start + rows)
                _normalise_into(fmap.queries(_chunk(q, part, dtype)) @ summary, out[:, :, part], z[:, :, part])
            saved = (summary, top)
        ctx.fmap, ctx.causal, ctx.rows, ctx.dtype, ctx.chunk = fmap, causal, rows, dtype, c
        ctx.save_for_backward(q, k, v, out, z, keep, *saved)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, z, keep, *saved = ctx.saved_tensors
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (ctx.fmap, q, k, v, keep, out, z, g, ctx.rows, ctx.dtype, grads)
        if ctx.causal:
            _causal_train_backward(*args, saved[0], ctx.chunk)
        else:
            _bidirectional_train_backward(*args, *saved)
        return None, *grads, None, None, None


def _normalise_into(weighted: Tensor, out: Tensor, z: Tensor) -> None:
    """weighted [..., D+1] (Σ w v, Σ w) -> out [..., D] (0 where Σ w = 0) and z [...] = Σ w."""
    total = weighted[..., -1]
    z.copy_(total)
    out.copy_(weighted[..., :-1] / torch.where(total > 0, total, 1.0)[..., None])


def _output_grad(g: Tensor, out: Tensor, z: Tensor) -> Tensor:
    """The gradient reaching u = [Σ w v, Σ w]: [g, -g·o] / z ([..., D+1]; rows with z = 0 divide by 1,
    and there o = 0). g, out [..., D] (any dtype), z [...] in the compute dtype."""
    g, out = g.to(z.dtype), out.to(z.dtype)
    du = torch.cat([g, (g * out).sum(dim=-1, keepdim=True).neg_()], dim=-1)  # [..., D+1]
    return du.div_(torch.where(z > 0, z, 1.0)[..., None])


def _bidirectional_train_backward(fmap, q, k, v, keep, out, z, g, rows, dtype, grads, summary, top):
    dq, dk, dv = grads
    d = v.shape[-1]
    d_summary = torch.zeros_like(summary)  # [B, H, m, D+1]
    summary_t = summary.transpose(-1, -2)  # [B, H, D+1, m]
    for start in range(0, q.shape[2], rows):  # queries: dS and dq
        part = slice(start, start + rows)
        qc = _chunk(q, part, dtype)
        fq = fmap.queries(qc)  # [B, H, rows, m]
        du = _output_grad(g[:, :, part], out[:, :, part], z[:, :, part])  # [B, H, rows, D+1]
        d_summary.add_(fq.transpose(-1, -2) @ du)
        dq[:, :, part] = fmap.queries_grad(qc, fq, du @ summary_t)
    dsv, dsz = d_summary[..., :d], d_summary[..., d]  # [B, H, m, D], [B, H, m]
    for start in range(0, k.shape[2], rows):  # keys: dφ(k) = [v, 1] dSᵀ, dv = φ(k) dS[:, :D]
        part = slice(start, start + rows)
        kc, keep_c = _chunk(k, part, dtype), None if keep is None else keep[:, part]
        fk = fmap.keys(kc, keep_c) if fmap.key_logits is None else fmap.key_logits(kc, keep_c).sub_(top).exp_()
        dv[:, :, part] = fk @ dsv
        dfk = (_chunk(v, part, dtype) @ dsv.transpose(-1, -2)).add_(dsz[:, :, None, :])  # [B, H, rows, m]
        dk[:, :, part] = fmap.keys_grad(kc, keep_c, fk, dfk)


def _causal_train_forward(fmap, q, k, v, keep, rows, c, dtype, out, z) -> Tensor:
    """The causal forward group by group, writing out and z -> the summary before each group
    [G, B, H, m, D+1] (what backward restarts every group from)."""
    b, h, n, d = q.shape
    summary = q.new_zeros(b, h, fmap.num_features, d + 1, dtype=dtype)
    starts = []
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        starts.append(summary)
        fq = fmap.queries(_chunk(q, part, dtype))  # [B, H, rows, m]
        fk = fmap.keys(_chunk(k, part, dtype), None if keep is None else keep[:, part])
        weighted, summary = causal_group(fq, fk, with_ones(_chunk(v, part, dtype)), summary, c)
        _normalise_into(weighted, out[:, :, part], z[:, :, part])
    return torch.stack(starts)


def _causal_train_backward(fmap, q, k, v, keep, out, z, g, rows, dtype, grads, starts, c):
    """Groups last to first; `carry` is dS of the summary after the current group (the gradient from
    every later query)."""
    dq, dk, dv = grads
    n, d = q.shape[2], q.shape[3]
    carry = torch.zeros_like(starts[0])  # [B, H, m, D+1]
    for index in reversed(range(len(starts))):
        start = index * rows
        part = slice(start, start + rows)
        length = min(rows, n - start)
        qc, kc, keep_c = _chunk(q, part, dtype), _chunk(k, part, dtype), None if keep is None else keep[:, part]
        fq, fk = fmap.queries(qc), fmap.keys(kc, keep_c)  # [B, H, n_g, m]
        du = _output_grad(g[:, :, part], out[:, :, part], z[:, :, part])  # [B, H, n_g, D+1]
        v1 = with_ones(_chunk(v, part, dtype))
        dfq, dfk, dv1, carry = _causal_group_backward(fq, fk, v1, du, starts[index], carry, c)
        dq[:, :, part] = fmap.queries_grad(qc, fq, dfq[:, :, :length])
        dk[:, :, part] = fmap.keys_grad(kc, keep_c, fk, dfk[:, :, :length])
        dv[:, :, part] = dv1[:, :, :length, :d]


def _causal_group_backward(fq, fk, v1, du, summary, carry, c):
    """The backward of `causal_group`: fq, fk [B, H, n, m], v1, du [B, H, n, D+1], summary [B, H, m, D+1]
    before the group, carry = dS after it -> (dφ(q), dφ(k) [B, H, n_pad, m], d[v, 1] [B, H, n_pad, D+1],
    dS before the group)."""
    fq, fk, v1, du = (as_chunks(t, c) for t in (fq, fk, v1, du))  # [B, H, g, c, *]
    sums = fk.transpose(-1, -2) @ v1  # [B, H, g, m, D+1]
    prefix = torch.cat([summary[:, :, None], sums[:, :, :-1]], dim=2).cumsum_(dim=2)  # before each chunk
    within = (fq @ fk.transpose(-1, -2)).tril_()  # [B, H, g, c, c]
    d_within = (du @ v1.transpose(-1, -2)).tril_()  # [B, H, g, c, c]
    dfq = (du @ prefix.transpose(-1, -2)).add_(d_within @ fk)  # [B, H, g, c, m]
    d_prefix = fq.transpose(-1, -2) @ du  # [B, H, g, m, D+1]: dP_t
    # the sums of chunk t reach every later chunk's prefix and the carried summary after the group
    d_sums = torch.cat([d_prefix[:, :, 1:], carry[:, :, None]], dim=2).flip(2).cumsum_(dim=2).flip(2)
    carry = d_sums[:, :, 0] + d_prefix[:, :, 0]  # dS before the group
    dfk = (d_within.transpose(-1, -2) @ fq).add_(v1 @ d_sums.transpose(-1, -2))  # [B, H, g, c, m]
    dv1 = (within.transpose(-1, -2) @ du).add_(fk @ d_sums)  # [B, H, g, c, D+1]
    return dfq.flatten(2, 3), dfk.flatten(2, 3), dv1.flatten(2, 3), carry


def feature_attention_macs(
    fmap: FeatureMap, n: int, heads: int, head_dim: int, causal: bool, chunk_size: int, projections: int = 0
) -> MacCount:
    """MACs of `feature_attention` at length n, batch 1, exactly as its path computes them (the causal
    path's padded chunk rows included): `other` maps queries and keys to features, `scores` are the
    products of query features with key features or key summaries, `weighted` the products with
    values ([v, 1]: the normaliser column included). Not pairwise attention, so `pairs` = 0."""
    m, dv = fmap.num_features, head_dim + 1  # [v, 1] has D+1 columns
    count = MacCount(
        projections=projections, other=2 * heads * n * fmap.macs_per_row, exps=2 * heads * n * fmap.exps_per_row
    )
    if not causal:  # S = φ(K)ᵀ [V, 1], then φ(Q) S
        count.weighted, count.scores = heads * n * m * dv, heads * n * m * dv
        return count
    c = min(chunk_size, n)
    rows = rows_per_chunk(heads, m, multiple=c)
    for start in range(0, n, rows):
        padded = -(-min(rows, n - start) // c) * c  # the group's rows, padded to whole chunks
        count.weighted += heads * padded * (m * dv + c * dv)  # chunk sums φ(k)ᵀ[v, 1]; within-chunk A [v, 1]
        count.scores += heads * padded * (m * dv + c * m)  # φ(q) · prefix; within-chunk φ(q) φ(k)ᵀ
    return count


def dense_feature_attention(
    fmap: FeatureMap, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool
) -> Tensor:
    """The O(N²) oracle: A = φ(Q) φ(K)ᵀ materialised, masked by causality and padding, rows
    normalised by their sums, times V. The same features as the fast path, so float64 agrees exactly."""
    dtype = compute_dtype(q.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    fk = (fmap.keys if causal else fmap.shared_keys)(k, keep)  # [B, H, N, m]
    scores = fmap.queries(q) @ fk.transpose(-1, -2)  # [B, H, N, N]
    n = q.shape[2]
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if keep is not None:
        allowed = allowed & keep[:, None, None, :].to(q.device)
    scores = scores.masked_fill(~allowed, 0.0)
    total = scores.sum(dim=-1, keepdim=True)  # [B, H, N, 1]
    return (scores @ v) / torch.where(total > 0, total, torch.ones_like(total))


# -- pieces ---------------------------------------------------------------------------------------------
def with_ones(v: Tensor) -> Tensor:
    """[..., n, D] -> [..., n, D+1] with a last column of ones, so one matmul also sums the weights."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def normalise(weighted: Tensor) -> Tensor:
    """[..., D+1] (Σ w v, Σ w) -> [..., D]; rows with Σ w = 0 (no real key) are exactly 0."""
    total = weighted[..., -1:]  # features are >= 0, so the sum is > 0 or exactly 0
    return weighted[..., :-1] / torch.where(total > 0, total, torch.ones_like(total))


def finite_or_zero(t: Tensor) -> Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def zero_state(batch: int, heads: int, features: int, head_dim: int, device, dtype) -> RecurrentState:
    return RecurrentState(
        torch.zeros(batch, heads, features, head_dim, device=device, dtype=dtype),
        torch.zeros(batch, heads, features, device=device, dtype=dtype),
    )


def recurrent_step(
    fmap: FeatureMap,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: RecurrentState,
    key_padding_mask: Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> tuple[Tensor, RecurrentState]:
    """T >= 1 new tokens [B, H, T, D] after the tokens summarised in `state` -> (out [B, H, T, D] in
    q's dtype, the state after them). Computed in the state's dtype, exactly as the causal call."""
    check_qkv(q, k, v)
    check_positive_int("chunk_size", chunk_size)
    keep = check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[2], "key_padding_mask")
    check_state(state, (q.shape[0], q.shape[1], fmap.num_features, q.shape[3]))
    dtype = state.kv.dtype
    out, state = causal_chunks(fmap, *(t.to(dtype) for t in (q, k, v)), keep, state, chunk_size)
    return out.to(q.dtype), state


def check_state(state, expected: tuple[int, int, int, int] | None = None) -> None:
    """The state must be a RecurrentState (kv [B, H, m, D], k_sum [B, H, m]); with `expected` =
    (B, H, m, D) its shapes must match the new tokens."""
    if not (isinstance(state, tuple) and len(state) == 2 and all(isinstance(t, Tensor) for t in state)):
        raise TypeError(f"state must be a RecurrentState (kv, k_sum) from initial_state(), got {type(state).__name__}")
    if expected is None:
        return
    kv, k_sum = state
    if tuple(kv.shape) != expected or tuple(k_sum.shape) != expected[:3]:
        raise ValueError(
            f"state does not match q: kv must be [B, H, m, D] = {list(expected)} and k_sum [B, H, m] = "
            f"{list(expected[:3])}, got {list(kv.shape)} and {list(k_sum.shape)}"
        )


# -- the module base ------------------------------------------------------------------------------------
class FeatureMapAttention(Attention):
    """Attention through a feature map: subclasses give `feature_map(dtype, device)`; configs have
    `causal` and `chunk_size`. Causal modules also decode: `initial_state` then `step`."""

    capabilities = Capabilities(causal=True)

    def cache_spec(self) -> CacheSpec:
        super().cache_spec()  # causal only
        return CacheSpec("state")

    def feature_map(self, dtype: torch.dtype, device: torch.device) -> FeatureMap:
        raise NotImplementedError

    def attend(self, q, k, v, keep, **extra):
        fmap = self.feature_map(compute_dtype(q.dtype), q.device)
        return feature_attention(fmap, q, k, v, keep, causal=self.config.causal, chunk_size=self.config.chunk_size)

    def reference_attend(self, q, k, v, keep):
        fmap = self.feature_map(compute_dtype(q.dtype), q.device)
        return dense_feature_attention(fmap, q, k, v, keep, self.config.causal).to(q.dtype)

    def dense_mask(self, n: int) -> Tensor:
        full = torch.ones(n, n, dtype=torch.bool)
        return full.tril() if self.config.causal else full

    def macs(self, n: int, **extra) -> MacCount:
        """MACs of one forward at length n, batch 1: projections + `feature_attention_macs`."""
        cfg = self.config
        fmap = self.feature_map(torch.float32, torch.device("cpu"))
        return feature_attention_macs(
            fmap, n, cfg.heads, cfg.head_dim, cfg.causal, cfg.chunk_size, projections=self.projection_macs(n)
        )

    # -- decoding ------------------------------------------------------------------------------------
    def initial_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> RecurrentState:
        """Empty state for `batch` sequences. `dtype` is the dtype you will step with (default: the
        module's); the state accumulates in float32 for half types, float64 for float64."""
        self._check_causal("initial_state")
        check_positive_int("batch", batch)
        weight = self.qkv.weight
        device = weight.device if device is None else device
        dtype = compute_dtype(weight.dtype if dtype is None else dtype)
        m = self.feature_map(dtype, torch.device(device)).num_features
        return zero_state(batch, self.config.heads, m, self.config.head_dim, device, dtype)

    def step(self, q, k, v, state: RecurrentState, *, key_padding_mask=None) -> tuple[Tensor, RecurrentState]:
        """Decode T >= 1 new tokens: q, k, v [B, H, T, D] as `project()` returns them -> (o [B, H, T, D],
        new state). Stepping through a sequence in any pieces equals the causal call on all of it."""
        self._check_causal("step")
        check_state(state)
        fmap = self.feature_map(state.kv.dtype, state.kv.device)
        return recurrent_step(fmap, q, k, v, state, key_padding_mask, chunk_size=self.config.chunk_size)

    def _check_causal(self, what: str) -> None:
        if not self.config.causal:
            name = self.config.name
            raise ValueError(f"{what}() is for decoding and needs causal=True (this {name} config has causal=False)")
