"""`reformer`: LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer").

Queries and keys share one projection (shared-QK); keys are the unit-normalised qk vectors. Each
hash round draws a random rotation R [D, n_buckets / 2] and puts a token in bucket
argmax([x R, -x R]), so tokens pointing the same way tend to share a bucket. Per round the tokens
are sorted by (bucket, position), cut into chunks of `bucket_size`, and every query attends to
its own chunk and the chunk before it: O(N · bucket_size) per round instead of O(N²).

Rules (the same in `lsh`, the module, and the dense oracle `lsh_reference`):

- A token's score with itself is lowered by SELF_PENALTY = 5·10⁴ (finite, fp16-safe, as in trax
  and reformer-pytorch): it attends to itself only when nothing else is available.
- Rounds are combined by log-sum-exp: per query, out = Σ_r exp(lse_r − logsumexp_r lse_r) o_r.
  Pairs found in several rounds are counted once per round (duplicates allowed, as in
  reformer-pytorch's default): the result is one softmax over all rounds' keys with multiplicity.
- Padded keys (`key_padding_mask` False, and the fill up to a multiple of bucket_size) are never
  attended; they sort after every real token, into a bucket of their own. A query with no real key
  returns zeros (never NaN), also in fp16/bf16 and in gradients.
- `n_buckets=None` derives n_buckets from the length: ceil(N / bucket_size) rounded up to even,
  at least 2 (the paper's n_buckets ≈ N / bucket_size).
- Rotations come from `torch.Generator().manual_seed(seed)` (never the global RNG) and are shared
  by all heads and examples: a fixed seed gives the same buckets on every call.

Non-causal chunks follow the paper: one global sort per round, fixed chunks, the look-back of the
first chunk wraps to the last one. Causal mode chunks every bucket separately (chunk k of bucket b
holds that bucket's tokens of within-bucket rank k·bs .. k·bs + bs − 1, and looks back to chunk
k − 1 of the same bucket), and chunks are laid out in the order their first token appears. With the
paper's global sort a later token's bucket moves earlier chunk boundaries, which leaks the future;
here which keys a query sees, and where its chunk sits in memory, depend on earlier tokens only, so
changing the future leaves earlier outputs bit-identical.

Fast path (`lsh_table`, on the projection laid out [B, N, H, 2D]: per token and head, [qk | v]):
heads are processed in groups; per group all heads and rounds are hashed with one matmul per token
block, sorted with one argsort, and attended chunk block by chunk block. Non-causal inference
gathers each lane's sorted rows once and reads every chunk's [look-back, own] keys and values as
an overlapping strided window (no look-back copies), through PyTorch's fused CPU flash-attention
kernel, which also returns the log-sum-exp the rounds are combined with; the causal layout
gathers each chunk's keys. Training runs the same forward inside `LSHFunction`, which keeps the
projection, the output, the buckets and one log-sum-exp per token, and recomputes every block of
chunks in backward (FlashAttention's backward with the rounds' combined output and log-sum-exp):
no per-round copy of the keys or scores is ever kept. `lsh_table(..., recompute=False)` is plain
autograd through gathered chunks, kept as the tests' reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from longrange.core.config import AttentionConfig, check_bool, check_nonnegative_int, check_positive_int
from longrange.core.dtypes import compute_dtype
from longrange.core.flops import MacCount
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import check_key_padding_mask

#: subtracted from a token's score with itself (finite: the token still attends to itself when alone)
SELF_PENALTY = 5e4
#: keys are qk / max(|qk|, NORM_EPS), as `torch.nn.functional.normalize`
NORM_EPS = 1e-12
#: work sizes that keep the hot loops in cache and the op count low: hash logits per token block,
#: key slots per chunk block, and (token, round) slots per head group
_HASH_BLOCK = 1 << 20
_BLOCK_SLOTS = 1 << 16
_GROUP_SLOTS = 1 << 16


# -- settings ---------------------------------------------------------------------------------------
def default_n_buckets(n: int, bucket_size: int) -> int:
    """The paper's n_buckets ≈ n / bucket_size: ceil(n / bucket_size) rounded up to even, at least 2."""
    chunks = -(-n // bucket_size)
    return max(2, chunks + chunks % 2)


def check_n_buckets(n_buckets) -> None:
    if n_buckets is None:
        return
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(
            f"n_buckets must be an even int >= 2 (buckets come in ± pairs), or None to derive it from the "
            f"length, got {n_buckets!r}"
        )


@dataclasses.dataclass(frozen=True)
class LSHSettings:
    """Validated settings of one call, with n_buckets resolved for the length."""

    n_hashes: int
    bucket_size: int
    n_buckets: int
    causal: bool
    seed: int

    @classmethod
    def make(cls, n, n_hashes, bucket_size, n_buckets, causal, seed) -> LSHSettings:
        check_positive_int("n_hashes", n_hashes)
        check_positive_int("bucket_size", bucket_size)
        check_n_buckets(n_buckets)
        check_nonnegative_int("seed", seed)
        check_bool("causal", causal)
        n_buckets = default_n_buckets(n, bucket_size) if n_buckets is None else n_buckets
        return cls(n_hashes, bucket_size, n_buckets, causal, seed)


def _check_qk_v(qk, v) -> None:
    for name, t in (("qk", qk), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, H, N, D], got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if qk.shape != v.shape:
        raise ValueError(f"qk and v must share shape [B, H, N, D], got {list(qk.shape)} and {list(v.shape)}")
    if qk.dtype != v.dtype:
        raise TypeError(f"qk and v must share a dtype, got {qk.dtype} and {v.dtype}")


# -- hashing ------------------------------------------------------------------------------------------
def lsh_rotations(seed: int, dim: int, n_hashes: int, n_buckets: int, *, dtype=torch.float32, device=None):
    """The random rotations [n_hashes, dim, n_buckets // 2], a function of the arguments only (drawn
    in float32 from `torch.Generator().manual_seed(seed)`, then cast): round r is the same for any
    n_hashes > r."""
    check_nonnegative_int("seed", seed)
    check_n_buckets(n_buckets)
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn((n_hashes, dim, n_buckets // 2), generator=gen, dtype=torch.float32)
    return rot.to(dtype=dtype, device=device)


def _rotation_rows(rotations: torch.Tensor) -> torch.Tensor:
    """[R, D, nb/2] -> [R·nb/2, D]: row r·nb/2 + i is rotation r's i-th direction."""
    return rotations.transpose(1, 2).reshape(-1, rotations.shape[1])


def head_groups(heads: int, n: int, n_hashes: int) -> list[range]:
    """The heads hashed and attended together: about _GROUP_SLOTS (token, round) slots a group."""
    size = max(1, min(heads, _GROUP_SLOTS // (n_hashes * max(n, 1))))
    return [range(h0, min(heads, h0 + size)) for h0 in range(0, heads, size)]


def _hash_heads(qk: torch.Tensor, rot_rows: torch.Tensor, n_hashes: int, out: torch.Tensor, work=None) -> None:
    """Buckets of a group of heads: qk [g, N, D] (any strides) -> out [g, R, N] (int64): the first
    maximum of [x R, -x R] per round.

    Per block of tokens (all g heads at once) the logits are made as [R, nb/2, T·g], so the max and
    min run across columns (vectorised); the winner's index is read off with one comparison pass
    and a small matmul against [0, 1, 2, ...] (plus a count, so exact ties fall back to argmax).
    The fast path and the oracle hash through this function with the same groups and blocks, so
    they agree bit for bit."""
    g, n, d = qk.shape
    rows, dtype, dev = rot_rows.shape[0], rot_rows.dtype, qk.device
    half = rows // n_hashes
    step = max(1, min(n, _HASH_BLOCK // (rows * g)))  # tokens per block
    work = Workspace() if work is None else work
    logits_buf = work.get("logits", rows * step * g, dtype, dev)
    hits_buf = work.get("hits", rows * step * g, dtype, dev)
    probe = torch.stack([torch.arange(half, dtype=dtype, device=dev), torch.ones(half, dtype=dtype, device=dev)])
    probe = probe.expand(n_hashes, 2, half)  # [R, 2, nb/2]: index, count
    for t0 in range(0, n, step):
        x = qk[:, t0 : t0 + step].transpose(0, 1).to(dtype).contiguous().view(-1, d)  # [T·g, D]
        cols = x.shape[0]
        logits = torch.mm(rot_rows, x.t(), out=logits_buf[: rows * cols].view(rows, cols))
        logits = logits.view(n_hashes, half, cols)
        top, low = logits.amax(dim=1, keepdim=True), logits.amin(dim=1, keepdim=True)
        positive = top >= -low  # the winner of [xR, -xR] is in xR (ties go to xR, as argmax would)
        hits = torch.eq(logits, torch.where(positive, top, low), out=hits_buf[: rows * cols].view(logits.shape))
        index, count = torch.bmm(probe, hits).unbind(1)  # [R, T·g] each
        positive = positive.squeeze(1)
        bucket = torch.where(positive, index, index + half).long()
        if bool((count != 1).any()):  # exact ties (e.g. a zero vector): the first one, as argmax
            first = torch.where(positive, logits.argmax(dim=1), logits.argmin(dim=1) + half)
            bucket = torch.where(count == 1, bucket, first)
        out[:, :, t0 : t0 + cols // g] = bucket.view(n_hashes, -1, g).permute(2, 0, 1)


def hash_buckets(qk, n_buckets, n_hashes=1, seed=0, *, key_padding_mask=None) -> torch.Tensor:
    """Bucket of every token in every round: qk [B, H, N, D] -> [B, H, n_hashes, N] int64 in
    [0, n_buckets); padded tokens (`key_padding_mask` False) get the extra bucket `n_buckets`."""
    if not isinstance(qk, torch.Tensor) or qk.dim() != 4 or not qk.is_floating_point():
        raise ValueError(f"qk must be a floating-point [B, H, N, D] tensor, got {getattr(qk, 'shape', qk)}")
    check_positive_int("n_hashes", n_hashes)
    b, h, n, d = qk.shape
    keep = check_key_padding_mask(key_padding_mask, b, n, "key_padding_mask")
    rot_rows = _rotation_rows(lsh_rotations(seed, d, n_hashes, n_buckets, dtype=compute_dtype(qk.dtype),
                                            device=qk.device))
    out = torch.empty(b, h, n_hashes, n, dtype=torch.long, device=qk.device)
    with torch.no_grad():
        for bi in range(b):
            for heads in head_groups(h, n, n_hashes):
                _hash_heads(qk[bi, heads.start : heads.stop], rot_rows, n_hashes, out[bi, heads.start : heads.stop])
    if keep is not None:
        out.masked_fill_(~keep[:, None, None, :], n_buckets)
    return out


# -- the kernel -----------------------------------------------------------------------------------------
def lsh(qk, v, n_hashes=4, bucket_size=64, causal=False, seed=0, *, key_padding_mask=None, n_buckets=None,
        return_buckets=False):
    """LSH attention on qk, v [B, H, N, D] -> [B, H, N, D] (and the buckets [B, H, n_hashes, N] with
    `return_buckets=True`). qk is both query and key (keys are qk / |qk|); scores are scaled by
    1/√D. `key_padding_mask` [B, N] bool, True = real token. See the module docstring for the rules."""
    _check_qk_v(qk, v)
    b, h, n, _ = qk.shape
    keep = check_key_padding_mask(key_padding_mask, b, n, "key_padding_mask")
    settings = LSHSettings.make(n, n_hashes, bucket_size, n_buckets, causal, seed)
    table = torch.cat([qk, v], dim=-1).transpose(1, 2).contiguous()  # [B, N, H, 2D]
    out, buckets = lsh_table(table, keep, settings, return_buckets=return_buckets)
    return (out, buckets) if return_buckets else out


def lsh_table(table, keep, s: LSHSettings, *, return_buckets=False, recompute=True):
    """The fast path on a projection table [B, N, H, 2D] (per token and head: qk, then v) ->
    (o [B, H, N, D], buckets [B, H, R, N] or None).

    Heads go in groups of about _GROUP_SLOTS (token, round) slots (`_attend_group`). Without
    autograd the output is written straight into a [B, N, H, D] buffer, so merging the heads for
    the output projection copies nothing. With autograd the call is `LSHFunction` (the same
    forward; a backward that recomputes every chunk's scores from the saved buckets and per-token
    log-sum-exp); `recompute=False` runs plain autograd through gathered chunks instead (the tests'
    reference: it keeps every round's gathered keys and scores)."""
    b, n, h, d2 = table.shape
    if n == 0:
        buckets = torch.zeros(b, h, s.n_hashes, 0, dtype=torch.long, device=table.device)
        return table.new_zeros(b, h, 0, d2 // 2), (buckets if return_buckets else None)
    if torch.is_grad_enabled() and table.requires_grad:
        if recompute:
            o, buckets = LSHFunction.apply(table, keep, s)
        else:
            o, buckets = _lsh_autograd(table, keep, s)
    else:
        out, _, buckets = lsh_forward(table, keep, s)
        o = out.transpose(1, 2)  # [B, H, N, D]
    return o, (buckets if return_buckets else None)


def _rotation_rows_for(table, s: LSHSettings) -> torch.Tensor:
    compute = compute_dtype(table.dtype)
    return _rotation_rows(lsh_rotations(s.seed, table.shape[-1] // 2, s.n_hashes, s.n_buckets, dtype=compute,
                                        device=table.device))


def lsh_forward(table, keep, s: LSHSettings):
    """The forward without autograd -> (o [B, N, H, D] in table's dtype, the log-sum-exp of every
    token over all its rounds' keys [B, H, N] (compute dtype; −inf for a token with no key), the
    buckets [B, H, R, N])."""
    b, n, h, d2 = table.shape
    rot_rows = _rotation_rows_for(table, s)
    scales = _key_scales(table, compute_dtype(table.dtype))  # [B, N, H]
    out = torch.empty(b, n, h, d2 // 2, dtype=table.dtype, device=table.device)
    lse = torch.empty(b, h, n, dtype=scales.dtype, device=table.device)
    buckets_all = torch.empty(b, h, s.n_hashes, n, dtype=torch.long, device=table.device)
    work = Workspace()
    with torch.no_grad():
        for bi in range(b):
            keep_row = None if keep is None else keep[bi]
            for heads in head_groups(h, n, s.n_hashes):
                rows = Rows.build(table[bi], scales[bi], heads, s.n_hashes)
                o, lse_g, buckets = _attend_group(rows, keep_row, rot_rows, s, work)  # [g, N, D], [g, N], [g, R, N]
                buckets_all[bi, heads.start : heads.stop] = buckets
                lse[bi, heads.start : heads.stop] = lse_g
                out[bi, :, heads.start : heads.stop].copy_(o.transpose(0, 1))
    return out, lse, buckets_all


def _lsh_autograd(table, keep, s: LSHSettings):
    """Plain autograd through gathered chunks -> (o [B, H, N, D], buckets [B, H, R, N])."""
    b, n, h, _ = table.shape
    rot_rows = _rotation_rows_for(table, s)
    scales = _key_scales(table, compute_dtype(table.dtype))  # [B, N, H]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(b)]
    buckets_all = torch.empty(b, h, s.n_hashes, n, dtype=torch.long, device=table.device)
    for bi in range(b):
        keep_row = None if keep is None else keep[bi]
        for heads in head_groups(h, n, s.n_hashes):
            rows = Rows.build(table[bi], scales[bi], heads, s.n_hashes)
            o, _, buckets = _attend_group(rows, keep_row, rot_rows, s, None)  # [g, N, D], [g, N], [g, R, N]
            buckets_all[bi, heads.start : heads.stop] = buckets
            pieces[bi].append(o)
    o = torch.stack([torch.cat(p, 0) for p in pieces])  # [B, H, N, D]
    return o.to(table.dtype), buckets_all


def _attend_group(rows: Rows, keep_row, rot_rows, s: LSHSettings, work: Workspace | None):
    """One head group of one example: hash, sort into chunks, attend, combine the rounds ->
    (o [g, N, D] and the log-sum-exp over all rounds [g, N], both in the compute dtype, buckets
    [g, R, N]). Non-causal inference (a workspace, no autograd) reads keys and values through
    overlapping windows (`_attend_windows`); autograd and the causal layout gather every chunk's
    keys (`_attend_chunks`)."""
    buckets = _hash_group(rows, keep_row, rot_rows, s, work or Workspace())  # [g, R, N]
    lanes = buckets.flatten(0, 1)  # [L, N]
    if work is not None and not s.causal:
        layout = WindowLayout.build(rows, _sorted_order(lanes, s), keep_row, s)
        o_slots, lse_slots = _attend_windows(rows, layout, s, work)
    else:
        layout = ChunkLayout.build(lanes, s)
        o_slots, lse_slots = _attend_chunks(rows, layout, keep_row, s, grad=work is None)
    o, lse = _combine_rounds(o_slots, lse_slots, layout.token_slot, buckets.shape[0], s.n_hashes, work)
    return o, lse, buckets


@dataclasses.dataclass
class Rows:
    """What one head group's chunks gather from, a contiguous copy of those heads (so the gathers
    of every round read a few MB, not rows scattered over the whole table).

    flat [g·N, 2D]: row h·N + n holds [qk | v] of the group's h-th head at token n.
    scale [g·N] (compute dtype): 1 / (max(|qk|, eps) √D), so k̂ / √D = qk · scale.
    Lane l of the group is (head l // R, round l % R)."""

    flat: torch.Tensor
    scale: torch.Tensor
    n: int
    n_hashes: int

    @classmethod
    def build(cls, table_b: torch.Tensor, scale_b: torch.Tensor, heads: range, n_hashes: int) -> Rows:
        """table_b [N, H, 2D], scale_b [N, H] of one example."""
        n, _, d2 = table_b.shape
        flat = table_b[:, heads.start : heads.stop].transpose(0, 1).reshape(-1, d2)
        return cls(flat, scale_b[:, heads.start : heads.stop].t().reshape(-1), n, n_hashes)

    def row_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """Token positions [L, ...] (within range) of each lane -> rows of `flat`."""
        lanes = pos.shape[0]
        head = torch.arange(lanes, device=pos.device).div_(self.n_hashes, rounding_mode="floor")
        return head.view(-1, *([1] * (pos.dim() - 1))) * self.n + pos


def _key_scales(table: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """[B, N, H, 2D] -> [B, N, H]: 1 / (max(|qk|, eps) · √D) in the compute dtype."""
    d = table.shape[-1] // 2
    norm = torch.linalg.vector_norm(table[..., :d].to(compute), dim=-1).clamp_min(NORM_EPS)
    return (norm * math.sqrt(d)).reciprocal()


class Workspace:
    """Buffers reused across blocks and head groups (fresh large allocations cost page faults)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype, device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def _hash_group(rows: Rows, keep_row, rot_rows, s: LSHSettings, work: Workspace) -> torch.Tensor:
    """Buckets [g, R, N] of a head group of one example; padded tokens get the extra bucket
    n_buckets."""
    d2 = rows.flat.shape[1]
    qk = rows.flat.view(-1, rows.n, d2)[..., : d2 // 2]  # [g, N, D]
    out = torch.empty(qk.shape[0], s.n_hashes, rows.n, dtype=torch.long, device=qk.device)
    with torch.no_grad():
        _hash_heads(qk, rot_rows, s.n_hashes, out, work)
    if keep_row is not None:
        out.masked_fill_(~keep_row, s.n_buckets)
    return out


def _sorted_order(buckets: torch.Tensor, s: LSHSettings) -> torch.Tensor:
    """The paper's sort: buckets [L, N] -> [L, N_pad] token positions ordered by (bucket, position),
    N_pad = N rounded up to a multiple of bucket_size; the fill positions N .. N_pad − 1 sort last."""
    lanes, n = buckets.shape
    n_pad = -(-n // s.bucket_size) * s.bucket_size
    key = torch.full((lanes, n_pad), s.n_buckets, dtype=torch.long, device=buckets.device)
    key[:, :n] = buckets
    key.mul_(n_pad).add_(torch.arange(n_pad, device=buckets.device))  # unique: (bucket, position)
    return torch.argsort(key, dim=1)


# -- non-causal inference: overlapping windows --------------------------------------------------------------
@dataclasses.dataclass
class WindowLayout:
    """The paper's layout read through overlapping windows (non-causal inference).

    Each lane's sorted tokens are laid out behind a copy of its last chunk ("ext": C + 1 chunks of
    bs, or just the one chunk when C = 1 and there is no look-back), and the lanes end to end. Window
    w = the `width` = (1 + lead)·bs ext rows from chunk w on = [look-back chunk, own chunk] of the
    queries of chunk w + lead: every chunk's keys and values are an overlapping strided view of one
    gather per lane. (The window straddling two lanes is computed and never read.)

    row_ids [L·span]: the `Rows.flat` row of every ext slot (fill slots point at row 0).
    key_bias [L·span]: 0, or −inf for a padded or fill key. bad_window: per window, any −inf key.
    token_slot [L, N]: the window row (w·bs + i) holding each token's query.
    """

    row_ids: torch.Tensor
    key_bias: torch.Tensor
    bad_window: list[bool]
    token_slot: torch.Tensor
    lead: int

    @classmethod
    def build(cls, rows: Rows, order: torch.Tensor, keep_row, s: LSHSettings) -> WindowLayout:
        """order [L, N_pad]: `_sorted_order` of the group's lanes."""
        lanes, n_pad = order.shape
        bs, dev = s.bucket_size, order.device
        lead = 1 if n_pad > bs else 0
        ext = torch.cat([order[:, n_pad - bs :], order], dim=1) if lead else order  # [L, span] token positions
        real = ext < rows.n
        safe = torch.where(real, ext, 0)
        valid = real if keep_row is None else real & keep_row[safe]
        key_bias = torch.zeros(valid.shape, dtype=rows.scale.dtype, device=dev).masked_fill_(~valid, -math.inf)
        bad_chunk = (~valid).view(-1, bs).any(dim=1)
        bad_window = bad_chunk[: bad_chunk.numel() - lead] | bad_chunk[lead:] if lead else bad_chunk
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_pad, device=dev).expand_as(order))
        token_slot = rank[:, : rows.n] + torch.arange(lanes, device=dev)[:, None] * ext.shape[1]
        return cls(rows.row_ids(safe).view(-1), key_bias.view(-1), bad_window.tolist(), token_slot, lead)


def _attend_windows(rows: Rows, layout: WindowLayout, s: LSHSettings, work: Workspace):
    """Attention in every window of one head group, _BLOCK_SLOTS key slots at a time: per block one
    row gather, the keys normalised, and the fused CPU kernel over strided windows.
    Returns (o [S, D], lse [S]) per window row, in the compute dtype."""
    bs, d, windows = s.bucket_size, rows.flat.shape[1] // 2, len(layout.bad_window)
    compute, dev = rows.scale.dtype, rows.flat.device
    o_slots = work.get("o", windows * bs * d, compute, dev).view(-1, d)
    lse_slots = work.get("lse", windows * bs, compute, dev)
    for block in _window_blocks(rows, layout, s, work):
        o, lse = _attend_block(block.q, block.k, block.v, block.mask)
        o_slots[block.slots].copy_(o.view(-1, d))
        lse_slots[block.slots].copy_(lse.view(-1))
    return o_slots, lse_slots


@dataclasses.dataclass
class Block:
    """One block of chunks (or windows) of a head group, ready for the kernel: q [G, 1, bs, D], k, v
    [G, 1, W, D] (k = k̂ / √D), mask [bs, W] or [G, 1, bs, W] (additive), key_ids [G·W] (the `Rows.flat`
    row of every key slot), and the block's query slots: a slice of the slot numbering (windows)
    or query_ids [G·bs] (chunks: the row of every query slot, −1 = empty)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    slots: slice
    query_ids: torch.Tensor | None = None


def _window_blocks(rows: Rows, layout: WindowLayout, s: LSHSettings, work: Workspace):
    """The windows of one head group, about _BLOCK_SLOTS key slots per Block: one row gather, the
    keys normalised, and every window's keys and values an overlapping strided view of it."""
    bs, d, lead = s.bucket_size, rows.flat.shape[1] // 2, layout.lead
    width, windows, compute, dev = (1 + lead) * bs, len(layout.bad_window), rows.scale.dtype, rows.flat.device
    fixed = _fixed_bias(bs, width, False, compute, dev, self_column=lead * bs)
    per_block = max(1, _BLOCK_SLOTS // width)
    raw_buf = work.get("raw", (per_block + lead) * bs * 2 * d, rows.flat.dtype, dev).view(-1, 2 * d)
    key_buf = work.get("key", (per_block + lead) * bs * d, compute, dev)
    for w0 in range(0, windows, per_block):
        g = min(per_block, windows - w0)
        r0, r1 = w0 * bs, (w0 + g + lead) * bs
        ids = layout.row_ids[r0:r1]
        raw = torch.index_select(rows.flat, 0, ids, out=raw_buf[: r1 - r0]).to(compute)  # [(g + lead)·bs, 2D]
        scale = rows.scale.index_select(0, ids)[:, None]
        key = torch.mul(raw[:, :d], scale, out=key_buf[: d * (r1 - r0)].view(-1, d))  # k̂ / √D
        q = raw[lead * bs :].view(g, 1, bs, 2 * d)[..., :d]
        k = key.as_strided((g, 1, width, d), (bs * d, 0, d, 1))  # window w: rows w·bs .. w·bs + W − 1
        val = raw[:, d:]
        v = val.as_strided((g, 1, width, d), (bs * 2 * d, 0, 2 * d, 1), val.storage_offset())
        mask = fixed
        if any(layout.bad_window[w0 : w0 + g]):
            mask = fixed + layout.key_bias[r0:r1].as_strided((g, 1, 1, width), (bs, 0, 0, 1))
        yield Block(q, k, v, mask, slice(r0, r0 + g * bs))


# -- gradients and the causal layout: gathered chunks ---------------------------------------------------------
@dataclasses.dataclass
class ChunkLayout:
    """Where every (lane, token) sits: lanes are (head, round) pairs, each cut into chunks of bs.

    kpos [C, L, W]: token position of each key slot of each chunk, chunk-major (−1 = empty); the
      first bs slots are the chunk itself (its queries), the next bs its look-back chunk (W = 2·bs),
      or W = bs when there is no look-back (non-causal with a single chunk).
    token_slot [L, N]: flat index ((c · L + lane) · bs + i) of each token's query slot.
    block_rows: chunk rows (of L chunks each) per block of work, about _BLOCK_SLOTS key slots; causal
      layouts are padded with empty chunks to a multiple of it, so every block has the same shape
      and a chunk's place in it depends on earlier tokens only.
    """

    kpos: torch.Tensor
    token_slot: torch.Tensor
    block_rows: int

    @classmethod
    def build(cls, buckets: torch.Tensor, s: LSHSettings) -> ChunkLayout:
        """buckets [L, N] (n_buckets for padded tokens)."""
        slots, prev = (_causal_chunks if s.causal else _sorted_chunks)(buckets, s)  # [L, C, bs], [L, C]
        lanes, chunks, bs = slots.shape
        if chunks > 1 or s.causal:
            back = slots.gather(1, prev.clamp_min(0)[..., None].expand(-1, -1, bs))
            back = back.masked_fill((prev < 0)[..., None], -1)
            slots = torch.cat([slots, back], dim=2)  # [L, C, 2bs]
        kpos = slots.transpose(0, 1)  # [C, L, W]
        block_rows = _block_rows(lanes, kpos.shape[2], buckets.shape[1], s)
        if s.causal:  # always the most chunks an input of this length can need: a function of n only
            fill = kpos.new_full((_causal_chunk_rows(lanes, buckets.shape[1], s) - chunks, lanes, kpos.shape[2]), -1)
            kpos = torch.cat([kpos, fill])
        kpos = kpos.contiguous()
        return cls(kpos, _token_slots(kpos[..., :bs], buckets.shape[1]), block_rows)


def _sorted_chunks(buckets: torch.Tensor, s: LSHSettings):
    """The paper's layout as chunk tables: [L, C, bs] token positions (−1 = fill) and the look-back
    chunk of each chunk [L, C] (c − 1; chunk 0 looks back to the last one)."""
    order = _sorted_order(buckets, s)
    lanes, n_pad = order.shape
    chunks = n_pad // s.bucket_size
    slots = torch.where(order < buckets.shape[1], order, -1).view(lanes, chunks, s.bucket_size)
    prev = (torch.arange(chunks, device=buckets.device) - 1) % chunks
    return slots, prev.expand(lanes, chunks)


def _most_causal_chunks(n: int, s: LSHSettings) -> int:
    """An upper bound on the chunks of a causal lane of length n that depends on n only: whole
    chunks, plus one partial chunk per bucket (the n_buckets hash buckets and the padding one)."""
    return max(1, min(n, n // s.bucket_size + s.n_buckets + 1))


def _block_rows(lanes: int, width: int, n: int, s: LSHSettings) -> int:
    """Chunk rows (of `lanes` chunks each) per block of `_attend_chunks`: about _BLOCK_SLOTS key
    slots, and for causal layouts never more than `_most_causal_chunks`."""
    rows = max(1, _BLOCK_SLOTS // (lanes * width))
    return min(rows, _most_causal_chunks(n, s)) if s.causal else rows


def _causal_chunk_rows(lanes: int, n: int, s: LSHSettings) -> int:
    """Chunk rows of a causal layout: `_most_causal_chunks` rounded up to whole blocks. Fixed by the
    length, so every block has the same shape, a chunk's place depends on earlier tokens only, and
    the work done (`ReformerAttention.macs`) is known in advance."""
    block = _block_rows(lanes, 2 * s.bucket_size, n, s)
    return -(-_most_causal_chunks(n, s) // block) * block


def _causal_chunks(buckets: torch.Tensor, s: LSHSettings):
    """Chunks per bucket: chunk k of bucket b holds b's tokens of within-bucket rank k·bs ..
    k·bs + bs − 1 and looks back to chunk k − 1 of b (none for k = 0). Chunks are numbered in the
    order their first token appears, so a chunk's number and contents depend on earlier tokens only."""
    lanes, n = buckets.shape
    bs = s.bucket_size
    dev = buckets.device
    pos = torch.arange(n, device=dev)
    order = torch.argsort(buckets * n + pos, dim=1)  # [L, N] token at each sorted index
    sorted_b = buckets.gather(1, order)
    first = torch.ones_like(sorted_b, dtype=torch.bool)
    first[:, 1:] = sorted_b[:, 1:] != sorted_b[:, :-1]
    start = torch.where(first, pos, 0).cummax(dim=1).values  # sorted index where the bucket starts
    rank = pos - start  # within-bucket rank, in sorted order
    offset = rank % bs
    opens = torch.zeros_like(first).scatter_(1, order, offset == 0)  # by position: a token opening a chunk
    chunk_at_open = opens.long().cumsum(dim=1) - 1  # by position: chunk number of the opener
    opener = order.gather(1, pos - offset)  # sorted -> position of the chunk's first token
    chunk = chunk_at_open.gather(1, opener)  # sorted -> chunk number
    chunks = int(opens.sum(dim=1).max())
    slots = torch.full((lanes, chunks * bs), -1, dtype=torch.long, device=dev)
    slots.scatter_(1, chunk * bs + offset, order)
    prev_of = torch.where(rank >= bs, chunk.gather(1, (pos - offset - bs).clamp_min(0)), -1)  # sorted
    prev = torch.full((lanes, chunks + 1), -1, dtype=torch.long, device=dev)
    prev.scatter_(1, torch.where(offset == 0, chunk, chunks), prev_of)  # openers write, others to a trash column
    return slots.view(lanes, chunks, bs), prev[:, :chunks]


def _token_slots(qpos: torch.Tensor, n: int, missing: int | None = None) -> torch.Tensor:
    """qpos [C, L, bs] (token position of each slot, −1 empty) -> [L, N]: the flat slot of every
    token, for reading the per-slot outputs back in token order. Every token must have a slot,
    unless `missing` is given: the slot of tokens that have none."""
    chunks, lanes, bs = qpos.shape
    flat = torch.arange(chunks * lanes * bs, device=qpos.device).view(chunks, lanes, bs)
    target = torch.where(qpos >= 0, qpos, n).transpose(0, 1).reshape(lanes, -1)  # empty slots -> column n
    if missing is None:
        slot = torch.empty(lanes, n + 1, dtype=torch.long, device=qpos.device)
    else:
        slot = torch.full((lanes, n + 1), missing, dtype=torch.long, device=qpos.device)
    slot.scatter_(1, target, flat.transpose(0, 1).reshape(lanes, -1))
    return slot[:, :n]


def _attend_chunks(rows: Rows, layout: ChunkLayout, keep_row, s: LSHSettings, grad: bool):
    """Attention inside every chunk of one head group, keys gathered per chunk, block by block ->
    (o [S, D], lse [S]) per query slot (S = C · L · bs, in `layout` order), in the compute dtype."""
    d = rows.flat.shape[1] // 2
    attend = _chunk_softmax_autograd if grad else _attend_block
    o_parts, lse_parts = [], []
    for block in _chunk_blocks(rows, layout, keep_row, s):
        o, lse = attend(block.q, block.k, block.v, block.mask)
        o_parts.append(o)
        lse_parts.append(lse)
    return torch.cat(o_parts).view(-1, d), torch.cat(lse_parts).view(-1)


def _chunk_blocks(rows: Rows, layout: ChunkLayout, keep_row, s: LSHSettings):
    """The chunks of one head group, `layout.block_rows` chunk rows per Block, keys gathered per
    chunk (differentiable: under autograd the gathers are recorded)."""
    kpos = layout.kpos  # [C, L, W]
    chunks, n_lanes, width = kpos.shape
    bs, d = s.bucket_size, rows.flat.shape[1] // 2
    safe = kpos.clamp_min(0)
    row_ids = rows.row_ids(safe.transpose(0, 1)).transpose(0, 1)  # [C, L, W]
    valid = kpos >= 0 if keep_row is None else (kpos >= 0) & keep_row[safe]
    query_ids = torch.where(kpos[..., :bs] >= 0, row_ids[..., :bs], -1)  # [C, L, bs]
    compute = rows.scale.dtype
    key_bias = torch.zeros(valid.shape, dtype=compute, device=kpos.device).masked_fill_(~valid, -math.inf)
    partial = (~valid).flatten(1).any(dim=1).tolist()  # per chunk row: a padded or empty key somewhere
    fixed = _fixed_bias(bs, width, s.causal, compute, kpos.device)  # [bs, W]
    for c0 in range(0, chunks, layout.block_rows):
        blk = slice(c0, c0 + layout.block_rows)
        slots = slice(c0 * n_lanes * bs, min(c0 + layout.block_rows, chunks) * n_lanes * bs)
        ids = row_ids[blk].reshape(-1)
        raw = rows.flat.index_select(0, ids).view(-1, 1, width, 2 * d).to(compute)  # [G, 1, W, 2D]
        k = raw[..., :d] * rows.scale.index_select(0, ids).view(-1, 1, width, 1)  # k̂ / √D
        mask = fixed + key_bias[blk].view(-1, 1, 1, width) if any(partial[blk]) else fixed
        yield Block(raw[:, :, :bs, :d], k, raw[..., d:], mask, slots, query_ids[blk].reshape(-1))


def _fixed_bias(bs: int, width: int, causal: bool, dtype, device, self_column: int = 0) -> torch.Tensor:
    """[bs, W] added to every chunk's scores: −SELF_PENALTY on the query's own slot (column
    self_column + i of row i) and, causal, −inf on later slots of its own chunk (slots are in
    position order)."""
    bias = torch.zeros(bs, width, dtype=dtype, device=device)
    own = bias[:, self_column : self_column + bs]
    if causal:
        own.masked_fill_(torch.ones(bs, bs, dtype=torch.bool, device=device).triu(1), -math.inf)
    own.diagonal().fill_(-SELF_PENALTY)
    return bias


def _chunk_softmax_autograd(q, k, v, mask):
    """q [G, 1, bs, D], k, v [G, 1, W, D], mask (additive) [bs, W] or [G, 1, bs, W] -> (o [G, 1, bs, D],
    lse [G, 1, bs]): softmax(q kᵀ + mask) v. A row with no allowed key gives o = 0 and lse = −inf,
    with finite gradients."""
    scores = torch.matmul(q, k.transpose(-1, -2)) + mask  # [G, 1, bs, W]
    top = scores.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    total = p.sum(dim=-1, keepdim=True)
    some = total > 0
    total_safe = torch.where(some, total, torch.ones_like(total))
    o = torch.matmul(p, v) / total_safe
    lse = torch.where(some, top + torch.log(total_safe), torch.full_like(total, -math.inf))
    return o, lse.squeeze(-1)


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_block(q, k, v, mask):
    """`_chunk_softmax_autograd` for inference. On CPU through PyTorch's fused flash-attention
    kernel, which returns the log-sum-exp too (its lse carries no gradient, hence inference only);
    it gives rows with no allowed key o = 0 but lse = 0, so those are set to −inf here. The kernel
    is skipped where SDPA's flash backend is switched off (`torch.nn.attention.sdpa_kernel`), as
    scaled_dot_product_attention would: the plain products are then what runs (and what
    FlopCounterMode sees)."""
    if _FLASH is None or q.device.type != "cpu" or not torch.backends.cuda.flash_sdp_enabled():
        return _chunk_softmax_autograd(q, k, v, mask)
    full = mask.dim() == 4
    o, lse = _FLASH(q, k, v, attn_mask=mask if full else mask.expand(q.shape[0], 1, *mask.shape), scale=1.0)
    if full:
        lse = lse.masked_fill(torch.isneginf(mask).all(dim=-1), -math.inf)
    return o, lse


def _combine_rounds(o_slots, lse_slots, token_slot, g: int, n_hashes: int, work: Workspace | None = None):
    """Per token, Σ_r exp(lse_r − logsumexp_r lse_r) o_r over its rounds (0 when no round found a
    key), and logsumexp_r lse_r (−inf then). o_slots [S, D], lse_slots [S], token_slot [g·R, N] ->
    ([g, N, D], [g, N]). With a workspace (inference) the rounds are gathered into a reused buffer
    and summed in place."""
    d = o_slots.shape[-1]
    n = token_slot.shape[1]
    idx = token_slot.reshape(-1)
    lse = lse_slots.index_select(0, idx).view(g, n_hashes, n)
    top = lse.detach().amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(lse - top)
    total = weight.sum(dim=1, keepdim=True)
    some = total > 0
    total_safe = torch.where(some, total, torch.ones_like(total))
    lse_all = torch.where(some, top + torch.log(total_safe), torch.full_like(total, -math.inf)).squeeze(1)  # [g, N]
    weight = (weight / total_safe).unsqueeze(-1)  # [g, R, N, 1]
    if work is None:
        o = o_slots.index_select(0, idx).view(g, n_hashes, n, d)
        return (o * weight).sum(dim=1), lse_all
    o = torch.index_select(o_slots, 0, idx, out=work.get("rounds", idx.numel() * d, o_slots.dtype, o_slots.device)
                           .view(-1, d)).view(g, n_hashes, n, d)
    acc = torch.mul(o[:, 0], weight[:, 0])
    for r in range(1, n_hashes):
        acc.addcmul_(o[:, r], weight[:, r])
    return acc, lse_all


# -- training: a backward that recomputes every chunk ----------------------------------------------------------
class LSHFunction(torch.autograd.Function):
    """`lsh_table` with gradients, FlashAttention's recomputation applied to hashing. The forward is
    the inference path; it keeps the table (the projection output: qk and v), the output o, the
    buckets [B, H, R, N] (int64, R·N per head: cheaper to keep than to hash again, which costs
    N·R·nb/2·D MACs per head) and, per token, the log-sum-exp L over all its rounds' keys.

    The rounds combine into one softmax over all rounds' keys (each key counted once per round
    that covers it, module docstring): with s_ij the score of (query i, key j) in a round,
    P_ij = exp(s_ij − L_i) is i's weight on that pair, o_i = Σ over (round, j) of P_ij v_j, so per
    round: dv_j += Σ_i P_ij g_i and ds_ij = P_ij (g_i·v_j − g_i·o_i) — exactly FlashAttention's
    backward with the combined o and L in place of a round's own. The backward rebuilds each head
    group's layout from its buckets, re-gathers every block of chunks and runs that backward on it
    (on CPU PyTorch's fused flash-attention backward), summing the gradients into the rows; per
    round nothing of size N·W is ever kept."""

    @staticmethod
    def forward(ctx, table, keep, s):
        out, lse, buckets = lsh_forward(table, keep, s)  # [B, N, H, D], [B, H, N], [B, H, R, N]
        o = out.transpose(1, 2)  # [B, H, N, D]
        ctx.s = s
        ctx.save_for_backward(table, keep, o, lse, buckets)
        ctx.mark_non_differentiable(buckets)
        return o, buckets

    @staticmethod
    def backward(ctx, g, _):
        table, keep, o, lse, buckets = ctx.saved_tensors
        return lsh_backward(table, keep, ctx.s, buckets, o, lse, g), None, None


def lsh_backward(table, keep, s: LSHSettings, buckets, o, lse, g) -> torch.Tensor:
    """The gradient of `lsh_forward`'s output o [B, H, N, D] (upstream g) with respect to the table
    [B, N, H, 2D], head group by head group."""
    b, n, h, d2 = table.shape
    scales = _key_scales(table, compute_dtype(table.dtype))  # [B, N, H]
    lse = torch.where(torch.isneginf(lse), math.inf, lse)  # a token with no key: P = exp(s − ∞) = 0
    d_table = torch.empty_like(table)
    work = Workspace()
    for bi in range(b):
        keep_row = None if keep is None else keep[bi]
        for heads in head_groups(h, n, s.n_hashes):
            group = slice(heads.start, heads.stop)
            rows = Rows.build(table[bi], scales[bi], heads, s.n_hashes)
            upstream = Upstream.build(g[bi, group], o[bi, group], lse[bi, group], rows.scale.dtype)
            d_rows = _group_backward(rows, keep_row, buckets[bi, group].flatten(0, 1), upstream, s, work)
            d_table[bi, :, group] = d_rows.view(len(heads), n, d2).transpose(0, 1)
    return d_table


@dataclasses.dataclass
class Upstream:
    """Per row of `Rows.flat` (head·N + token): the upstream gradient g and output o [g·N, D] and
    the log-sum-exp L [g·N] (+∞ for a token with no key), in the compute dtype."""

    g: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def build(cls, g, o, lse, dtype) -> Upstream:
        """g, o [g, N, D], lse [g, N] of one example's head group."""
        d = g.shape[-1]
        return cls(g.reshape(-1, d).to(dtype), o.reshape(-1, d).to(dtype), lse.reshape(-1).to(dtype))

    def at(self, query_ids: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g, o [*shape, D], L [*shape]) of the query slots whose rows are `query_ids` [prod(shape)];
        an empty or unread slot (−1) gets g = 0 and L = +∞, so it adds nothing."""
        empty = query_ids < 0
        safe = query_ids.clamp_min(0)
        g = self.g.index_select(0, safe).masked_fill_(empty[:, None], 0.0)
        o = self.o.index_select(0, safe)
        lse = self.lse.index_select(0, safe).masked_fill_(empty, math.inf)
        return g.view(*shape, -1), o.view(*shape, -1), lse.view(shape)


def _group_backward(rows: Rows, keep_row, lanes, up: Upstream, s: LSHSettings, work: Workspace) -> torch.Tensor:
    """One head group: the gradient of every row of `rows.flat` -> [g·N, 2D] (dqk, dv), compute dtype.

    Every block's gradients are written densely into per-slot buffers (no scatter-add, which is
    slow on CPU), then read back per token with one gather per buffer and summed over the rounds."""
    with torch.no_grad():
        if s.causal:
            d_q, d_key, d_value = _chunks_backward(rows, ChunkLayout.build(lanes, s), keep_row, up, s)
        else:
            layout = WindowLayout.build(rows, _sorted_order(lanes, s), keep_row, s)
            d_q, d_key, d_value = _windows_backward(rows, layout, up, s, work)
        return torch.cat([d_q.add_(_normalised_key_grad(rows, d_key)), d_value], dim=1)


def _windows_backward(rows: Rows, layout: WindowLayout, up: Upstream, s: LSHSettings, work: Workspace):
    """-> (dq, dk, dv) per row [g·N, D]: dk reaches the normalised key k = k̂ / √D.

    Window w's keys are the ext rows w·bs .. w·bs + W − 1: ext chunk c gets the first half of window
    c and the second half of window c − 1 (carried over from the previous block at block edges). The
    copy of each lane's last chunk at its front folds back onto that chunk; token t of lane l sits at
    ext row token_slot[l, t] + lead·bs. Every buffer is written once, so none is zero-filled."""
    bs, d, lead = s.bucket_size, rows.flat.shape[1] // 2, layout.lead
    ext_rows, lanes = layout.row_ids.numel(), layout.token_slot.shape[0]
    compute, dev = rows.scale.dtype, rows.flat.device
    slots = ext_rows - lead * bs  # windows · bs
    g_slots, o_slots, lse_slots = up.at(_slot_rows(layout.token_slot, rows, slots), (slots,))  # in slot order
    d_slots = torch.empty(slots, d, dtype=compute, device=dev)  # query slots
    d_ext = torch.empty(2, ext_rows, d, dtype=compute, device=dev)  # keys, values
    carried = None  # the second halves of the previous block's last window [2, bs, D]
    for block in _window_blocks(rows, layout, s, work):
        shape, sl = block.q.shape[:3], block.slots  # [G, 1, bs]
        g, o, lse = g_slots[sl].view(*shape, d), o_slots[sl].view(*shape, d), lse_slots[sl].view(shape)
        dq, dk, dv = _attend_block_backward(block.q, block.k, block.v, block.mask, g, o, lse)
        d_slots[block.slots] = dq.view(-1, d)
        first = torch.stack([dk[:, 0, :bs], dv[:, 0, :bs]])  # [2, G, bs, D]: each window's first bs keys
        if lead:
            first[:, 1:] += torch.stack([dk[:-1, 0, bs:], dv[:-1, 0, bs:]])
            if carried is not None:
                first[:, 0] += carried
            carried = torch.stack([dk[-1, 0, bs:], dv[-1, 0, bs:]])
        d_ext[:, block.slots] = first.flatten(1, 2)
    if lead:
        d_ext[:, slots:] = carried
        ext = d_ext.view(2, lanes, -1, d)  # [2, L, span, D]
        ext[:, :, -bs:] += ext[:, :, :bs]
    token_slot = layout.token_slot
    return (_sum_rounds(d_slots, token_slot, rows), _sum_rounds(d_ext[0], token_slot + lead * bs, rows),
            _sum_rounds(d_ext[1], token_slot + lead * bs, rows))


def _chunks_backward(rows: Rows, layout: ChunkLayout, keep_row, up: Upstream, s: LSHSettings):
    """-> (dq, dk, dv) per row [g·N, D]. A chunk's first bs key slots are its own tokens (its query
    slots), the next bs its look-back chunk's: their gradients go to per-slot buffers, read back per
    token through token_slot and, for the look-back, through the slot where each token is looked
    back at (at most once per lane; a token never looked back at reads a zero row)."""
    bs, d = s.bucket_size, rows.flat.shape[1] // 2
    kpos = layout.kpos  # [C, L, W]
    slots = kpos.shape[0] * kpos.shape[1] * bs
    compute, dev = rows.scale.dtype, rows.flat.device
    d_q, d_own_k, d_own_v = (torch.empty(slots, d, dtype=compute, device=dev) for _ in range(3))  # all written
    back_written = kpos.shape[2] > bs  # causal layouts always look back
    d_back_k, d_back_v = ((torch.empty if back_written else torch.zeros)(slots + 1, d, dtype=compute, device=dev)
                          for _ in range(2))  # + a zero row
    d_back_k[-1], d_back_v[-1] = 0.0, 0.0
    for block in _chunk_blocks(rows, layout, keep_row, s):
        g, o, lse = up.at(block.query_ids, block.q.shape[:3])
        dq, dk, dv = _attend_block_backward(block.q, block.k, block.v, block.mask, g, o, lse)
        d_q[block.slots] = dq.view(-1, d)
        d_own_k[block.slots], d_own_v[block.slots] = dk[:, :, :bs].reshape(-1, d), dv[:, :, :bs].reshape(-1, d)
        if back_written:
            d_back_k[block.slots], d_back_v[block.slots] = dk[:, :, bs:].reshape(-1, d), dv[:, :, bs:].reshape(-1, d)
    own, back = layout.token_slot, _token_slots(kpos[..., bs:], rows.n, missing=slots)
    d_key = _sum_rounds(d_own_k, own, rows).add_(_sum_rounds(d_back_k, back, rows))
    d_value = _sum_rounds(d_own_v, own, rows).add_(_sum_rounds(d_back_v, back, rows))
    return _sum_rounds(d_q, own, rows), d_key, d_value


def _sum_rounds(per_slot: torch.Tensor, token_slot: torch.Tensor, rows: Rows) -> torch.Tensor:
    """per_slot [S, D], token_slot [L, N] (lane l = head l // R, round l % R) -> [g·N, D]: each
    row's slots summed over its rounds."""
    lanes, n = token_slot.shape
    picked = per_slot.index_select(0, token_slot.reshape(-1)).view(lanes // rows.n_hashes, rows.n_hashes, n, -1)
    return picked.sum(dim=1).view(-1, per_slot.shape[1])


def _slot_rows(token_slot: torch.Tensor, rows: Rows, slots: int) -> torch.Tensor:
    """token_slot [L, N] (the window slot of each lane's tokens) -> [slots]: the row read from each
    window slot, −1 for slots no token reads (fill, and the window straddling two lanes)."""
    lanes, n = token_slot.shape
    pos = torch.arange(n, device=token_slot.device).expand(lanes, n)
    out = torch.full((slots,), -1, dtype=torch.long, device=token_slot.device)
    return out.index_put_((token_slot.reshape(-1),), rows.row_ids(pos).reshape(-1))


def _normalised_key_grad(rows: Rows, d_key: torch.Tensor) -> torch.Tensor:
    """The gradient reaching qk through the key k = qk · scale, scale = 1 / (max(|qk|, eps) √D):
    scale · (dk − u (u·dk)) with u = qk / |qk| (the radial part only where |qk| > eps, as clamp's)."""
    d = d_key.shape[1]
    qk = rows.flat[:, :d].to(d_key.dtype)
    norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True)
    unit = qk / norm.clamp_min(NORM_EPS)
    radial = (unit * d_key).sum(dim=-1, keepdim=True).masked_fill_(norm <= NORM_EPS, 0.0)
    return d_key.sub_(unit.mul_(radial)).mul_(rows.scale[:, None])


_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _attend_block_backward(q, k, v, mask, g, o, lse):
    """The backward of a block's softmax(q kᵀ + mask) v given the *combined* output o [G, 1, bs, D]
    and log-sum-exp L [G, 1, bs] (`LSHFunction`) -> (dq [G, 1, bs, D], dk, dv [G, 1, W, D]).
    On CPU PyTorch's fused flash-attention backward, where `_attend_block` uses its forward."""
    if _FLASH_BACKWARD is None or q.device.type != "cpu" or not torch.backends.cuda.flash_sdp_enabled():
        return _chunk_softmax_backward(q, k, v, mask, g, o, lse)
    mask = mask if mask.dim() == 4 else mask.expand(q.shape[0], 1, *mask.shape)
    return _FLASH_BACKWARD(g, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=1.0)


def _chunk_softmax_backward(q, k, v, mask, g, o, lse):
    """`_attend_block_backward` in plain ops: P = exp(q kᵀ + mask − L), dv = Pᵀ g,
    ds = P (g vᵀ − g·o), dq = ds k, dk = dsᵀ q."""
    p = torch.matmul(q, k.transpose(-1, -2)).add_(mask).sub_(lse[..., None]).exp_()  # [G, 1, bs, W]
    dv = torch.matmul(p.transpose(-1, -2), g)
    ds = torch.matmul(g, v.transpose(-1, -2)).sub_((g * o).sum(dim=-1, keepdim=True)).mul_(p)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


# -- the dense oracle -----------------------------------------------------------------------------------
def covered_pairs(buckets: torch.Tensor, bucket_size: int, causal: bool = False) -> torch.Tensor:
    """[..., N] buckets of one round -> [..., N, N] bool: the (query, key) pairs its chunks cover,
    written densely from the bucket assignment (no sort, no chunk tables).

    Non-causal: rank_i = #{j : (b_j, j) < (b_i, i)}, chunk_i = rank_i // bs; i sees j when chunk_j
    is chunk_i or the one before it (cyclic over ceil(N / bs) chunks).
    Causal: k_i = #{j < i : b_j = b_i} // bs; i sees j <= i when b_j = b_i and k_j >= k_i − 1."""
    n = buckets.shape[-1]
    pos = torch.arange(n, device=buckets.device)
    same = buckets[..., :, None] == buckets[..., None, :]  # [..., i, j]
    before = pos[None, :] < pos[:, None]  # j < i
    if causal:
        k = (same & before).sum(dim=-1) // bucket_size  # [..., N]
        return same & (pos[None, :] <= pos[:, None]) & (k[..., None, :] >= k[..., :, None] - 1)
    rank = ((buckets[..., None, :] < buckets[..., :, None]) | (same & before)).sum(dim=-1)
    chunk = rank // bucket_size
    chunks = -(-n // bucket_size)
    own = chunk[..., :, None] == chunk[..., None, :]
    if chunks == 1:
        return own
    return own | (chunk[..., None, :] == (chunk[..., :, None] - 1) % chunks)


def lsh_reference(qk, v, n_hashes=4, bucket_size=64, causal=False, seed=0, *, key_padding_mask=None,
                  n_buckets=None):
    """The O(N²) statement of `lsh`: per round, softmax over the covered pairs (`covered_pairs` of
    the same buckets) with the self penalty, then log-sum-exp across rounds. Computed in float32
    (float64 stays float64); returns q's dtype."""
    _check_qk_v(qk, v)
    b, h, n, d = qk.shape
    keep = check_key_padding_mask(key_padding_mask, b, n, "key_padding_mask")
    s = LSHSettings.make(n, n_hashes, bucket_size, n_buckets, causal, seed)
    if n == 0:
        return torch.zeros_like(v)
    buckets = hash_buckets(qk, s.n_buckets, s.n_hashes, s.seed, key_padding_mask=keep)  # [B, H, R, N]
    compute = compute_dtype(qk.dtype)
    q, vv = qk.to(compute), v.to(compute)
    keys = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    eye = torch.eye(n, dtype=torch.bool, device=qk.device)
    scores = (q @ keys.transpose(-1, -2)) / math.sqrt(d) - SELF_PENALTY * eye  # [B, H, N, N]
    outs, lses = [], []
    for r in range(s.n_hashes):
        allowed = covered_pairs(buckets[:, :, r], s.bucket_size, s.causal)
        if keep is not None:
            allowed = allowed & keep[:, None, None, :]
        o, lse = _dense_softmax(scores, vv, allowed)
        outs.append(o)
        lses.append(lse)
    lse = torch.stack(lses)  # [R, B, H, N]
    top = lse.detach().amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(lse - top)
    total = weight.sum(dim=0)
    weight = weight / torch.where(total > 0, total, torch.ones_like(total))
    out = sum(w[..., None] * o for w, o in zip(weight, outs, strict=True))
    return out.to(qk.dtype)


def _dense_softmax(scores, v, allowed):
    """softmax over `allowed` -> (o, lse); a row with nothing allowed gives (0, −inf)."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    top = masked.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(masked - top)
    total = p.sum(dim=-1, keepdim=True)
    some = total > 0
    total_safe = torch.where(some, total, torch.ones_like(total))
    lse = torch.where(some, top + torch.log(total_safe), torch.full_like(total, float("-inf")))
    return (p @ v) / total_safe, lse.squeeze(-1)


# -- the module --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReformerConfig(AttentionConfig):
    name = "reformer"
    n_hashes: int = 4
    bucket_size: int = 64
    n_buckets: int | None = None  # None: derived from the length (≈ N / bucket_size, even, >= 2)
    causal: bool = False
    seed: int = 0

    def validate(self):
        super().validate()
        check_positive_int("n_hashes", self.n_hashes)
        check_positive_int("bucket_size", self.bucket_size)
        check_n_buckets(self.n_buckets)
        check_nonnegative_int("seed", self.seed)
        check_bool("causal", self.causal)


class ReformerAttention(Attention):
    """Shared-QK LSH attention. One fused projection `qkv` = Linear(C, 2C) whose output is [qk; v]
    (qk of every head, then v of every head, as reformer-pytorch's toqk and tov); there is no
    separate key projection."""

    config_class = ReformerConfig
    capabilities = Capabilities(causal=True)

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        c = config.dim
        self.qkv = nn.Linear(c, 2 * c, bias=config.bias)

    @property
    def block_size(self) -> int:
        return self.config.bucket_size

    def settings(self, n: int) -> LSHSettings:
        c = self.config
        return LSHSettings.make(n, c.n_hashes, c.bucket_size, c.n_buckets, c.causal, c.seed)

    def project_table(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> [B, N, H, 2D]: per token and head, [qk | v] side by side (what the kernel
        gathers: one row per token, head and round). The weight rows are reordered on the fly
        (a [2C, C] copy) so the projection writes this layout directly."""
        b, n, _ = x.shape
        h, d = self.config.heads, self.config.head_dim
        weight = self.qkv.weight.view(2, h, d, -1).transpose(0, 1).reshape(2 * h * d, -1)
        bias = None if self.qkv.bias is None else self.qkv.bias.view(2, h, d).transpose(0, 1).reshape(-1)
        return nn.functional.linear(x, weight, bias).view(b, n, h, 2 * d)

    def project(self, x):
        """-> (qk, qk, v), each [B, H, N, D] (views): queries and keys are the same tensor."""
        table = self.project_table(x)
        d = self.config.head_dim
        qk, v = table[..., :d].transpose(1, 2), table[..., d:].transpose(1, 2)
        return qk, qk, v

    def forward(self, x, attention_mask=None):
        keep = self.check_input(x, attention_mask)
        o, _ = lsh_table(self.project_table(x), keep, self.settings(x.shape[1]))
        return self.merge(o)

    def attend(self, q, k, v, keep, **extra):
        self._check_shared(q, k)
        c = self.config
        return lsh(q, v, c.n_hashes, c.bucket_size, c.causal, c.seed, key_padding_mask=keep, n_buckets=c.n_buckets)

    def reference_attend(self, q, k, v, keep):
        """The dense oracle `lsh_reference`: per-round covered pairs, softmax, log-sum-exp."""
        self._check_shared(q, k)
        c = self.config
        return lsh_reference(q, v, c.n_hashes, c.bucket_size, c.causal, c.seed, key_padding_mask=keep,
                             n_buckets=c.n_buckets)

    @staticmethod
    def _check_shared(q, k):
        if k is not q:
            raise ValueError("reformer shares queries and keys: pass k = q (the same tensor, as `project` returns)")

    def dense_mask(self, n: int) -> torch.Tensor:
        raise NotImplementedError(
            "reformer's graph depends on the input (LSH buckets): see `covered_pairs` and `hash_buckets`"
        )

    def projection_macs(self, n: int) -> int:
        """The qk and v projections (2·n·C²) and the output projection (n·C²): 3·n·C² MACs."""
        return 3 * n * self.config.dim**2

    def macs(self, n: int, **extra) -> MacCount:
        """MACs of the inference path at length n, batch 1: the projections; QKᵀ and PV over every
        query's window of (1 + look-back)·bucket_size keys in every round, as computed (non-causal:
        each head group's lanes end to end, one straddling window between lanes included; causal:
        the fixed-size chunk layout); and, in `other`, the hashing: the rotation x·R
        (nb/2 directions a round) and reading off the winning index (2·nb/2 a round)."""
        c = self.config
        s = self.settings(n)
        bs, chunks = s.bucket_size, -(-n // s.bucket_size)
        pairs = 0
        for heads in head_groups(c.heads, n, c.n_hashes):
            lanes = len(heads) * c.n_hashes
            if s.causal:
                pairs += _causal_chunk_rows(lanes, n, s) * lanes * bs * 2 * bs
            else:
                lead = 1 if chunks > 1 else 0
                pairs += (lanes * (chunks + lead) - lead) * bs * (1 + lead) * bs
        hashing = n * c.heads * c.n_hashes * (s.n_buckets // 2) * (c.head_dim + 2)
        return MacCount(projections=self.projection_macs(n), scores=pairs * c.head_dim, weighted=pairs * c.head_dim,
                        other=hashing, exps=pairs, pairs=pairs)

    @classmethod
    def test_configs(cls):
        return [
            {"bucket_size": 2, "n_hashes": 2},
            {"bucket_size": 3, "n_hashes": 3, "causal": True},
            {"bucket_size": 4, "n_hashes": 1, "seed": 5},
            {"bucket_size": 2, "n_hashes": 2, "causal": True, "n_buckets": 4, "seed": 1},
        ]
