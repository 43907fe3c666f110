"""`xl` and `compressive` under context parallelism, and the sharded memory update of a memory `CausalLM`.

    y = cp(xl, x_shard, keep_shard, memory=mem, memory_mask=mem_mask)   # mem [B, M, C]: the same on every rank
    shard_model(lm, cp)                                                  # an xl / compressive CausalLM
    out = lm(ids_shard, labels=ids_shard, memory=state)                  # state: the last out.memory (or None)
    (out.loss + out.aux_loss).backward(); cp.reduce_gradients(lm)        # shares: see distributed.models

Within one call an `xl` layer is ONE segment: query i of the segment (position M + i) attends to the
M memory slots and to the segment's keys j <= i (causal) or all of them, limited to distances
|M + i - j| <= span when `span` is set, with a relative-position bias of the distance. Nothing in a
call is cut into sub-segments, so a sharded call is exact by construction:

- every rank holds the SAME memory (replicated: what a sharded model's memory update returns);
- rank r needs the keys of one contiguous window of [memory ; segment]: from span before its first
  query (the whole prefix without a span) to its last query (causal) or span after it. Each rank
  projects K and V of its own tokens once; ONE all_to_all sends each rank the K, V rows (and key
  mask) of the window it needs (2·C + 1 values per token sent; the backward sends their gradients
  back); memory rows come from the local replica. Without a span a causal rank r receives all
  earlier ranks' K, V: O(N) keys, as any exact full causal attention;
- the relative positions are the global ones (query M + lo + i, key a + j).

`compressive` attends over [compressed ; memory ; segment]: its forward joins the two memories,
then the same. Its compression runs in the MODEL's memory update (`sharded_update_layer`): when the
segment pushes slots out of the FIFO, those slots and the new memory are gathered to every rank
(O(M + N) rows per rank: the reconstruction loss attends from every query to every old slot),
compressed on every rank alike (the state stays replicated) and the reconstruction loss is split
by queries: rank r's share is its queries' part of the mean, so the shares sum to the loss.
An XL update gathers only the new memory's rows (the last mem_len positions: O(mem_len) per rank).

Memory carried ACROSS calls is exact too: the state a sharded call returns is the one a single
process returns (replicated on every rank), to pass to the next sharded call. Refused, with a
named error: memories of different lengths on different ranks (ShardError on every rank),
decoding caches / `generate` under context parallelism (see `longrange.distributed.models`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from longrange.distributed.comm import ShardError
from longrange.distributed.context import ContextParallel, sharded
from longrange.distributed.shards import Shards
from longrange.distributed.tokens import embed, lm_loss_share
from longrange.mechanisms.memory import (
    CompressiveAttention,
    XLAttention,
    check_memory,
    join_masks,
    sinusoid,
)
from longrange.models.memory import LayerMemory, compress_leaving
from longrange.models.outputs import ModelOutput


# -- the attention --------------------------------------------------------------------------------------
@sharded(XLAttention)
def xl_sharded(cp: ContextParallel, attn: XLAttention, x, keep, *, memory=None, memory_mask=None):
    """x [B, n_r, C] this rank's queries; memory [B, M, C] (+ memory_mask [B, M]) the same on every
    rank. Its gradient on each rank is that rank's share (None where the rank's window misses it)."""
    with cp.comm.guard():
        memory, memory_mask = check_memory(x, memory, memory_mask)
    return windowed_attention(cp, attn, x, keep, memory, memory_mask)


@sharded(CompressiveAttention)
def compressive_sharded(cp: ContextParallel, attn: CompressiveAttention, x, keep, *, memory=None, memory_mask=None,
                        compressed_memory=None, compressed_mask=None):
    """[compressed ; memory] (both replicated) is one memory for the XL computation."""
    with cp.comm.guard():
        memory, memory_mask = attn.joined_memory(x, memory, memory_mask, compressed_memory, compressed_mask)
    return windowed_attention(cp, attn, x, keep, memory, memory_mask)


def windowed_attention(cp: ContextParallel, attn: XLAttention, x, keep, memory, memory_mask):
    """This rank's rows of XL attention over [memory ; whole segment]. Communicates: the memory
    length (one int per rank), then one all_to_all of the K, V rows (+ key mask) of each rank's key
    window (forward), their gradients back (backward)."""
    if attn.training and attn.config.dropout > 0:  # every rank has the same config: all refuse alike
        raise ValueError(f"{attn.config.name}: attention dropout (dropout={attn.config.dropout}) under context "
                         "parallelism is not supported (the sharded rows do not draw the single-process dropout "
                         "pairs); set dropout=0 or call eval()")
    m = 0 if memory is None else memory.shape[1]
    agree_memory_length(cp, m)
    s = cp.shards
    windows = key_windows(attn, s, m)
    a, b = windows[s.rank]
    own = memory[:, a : min(b, m)] if memory is not None and a < m else None  # memory rows of the window
    q, k_all, v_all = attn.project_with_memory(x, own)  # k, v: [own memory ; this shard]
    mo = 0 if own is None else own.shape[1]
    k_seg, v_seg, keep_seg = fetch_window(cp, s, windows, m, k_all[:, :, mo:], v_all[:, :, mo:], keep)
    k = torch.cat([k_all[:, :, :mo], k_seg], dim=2)  # (B, H, b - a, D)
    v = torch.cat([v_all[:, :, :mo], v_seg], dim=2)
    mem_keep = None if memory_mask is None or own is None else memory_mask[:, a : a + mo]
    key_mask = join_masks([mem_keep, keep_seg], [mo, k_seg.shape[2]])
    if x.shape[1] == 0:  # no queries: an empty output, still on the graph of the exchange (its backward
        # runs here too) and of every parameter (zero gradients, so every rank reduces the same ones)
        return x * 0 + (k_seg.sum() + sum(p.sum() for p in attn.parameters())) * 0
    return attn.merge(attend_at(attn, q, k, v, key_mask, m + s.lo - a))


def agree_memory_length(cp: ContextParallel, m: int) -> None:
    """ShardError on every rank when the ranks hold memories of different lengths (it must be replicated)."""
    lengths = [got[0] for got in cp.comm.gather_ints([m])]
    if len(set(lengths)) > 1:  # every rank sees the same lengths: every rank raises
        raise ShardError("memory must be the same on every rank (replicated: the state a sharded call returns); "
                         f"memory lengths per rank are {lengths}")


def key_windows(attn: XLAttention, s: Shards, m: int) -> list[tuple[int, int]]:
    """Per rank, the keys [a, b) of [memory ; segment] (memory at 0 .. M-1) its queries may see:
    `span` back (all without one), none ahead (causal) or `span` ahead (all without one)."""
    total = m + s.total
    back = total if attn.config.span is None else attn.config.span
    ahead = 0 if attn.config.causal else back
    out = []
    for lo, hi in zip(s.offsets, s.offsets[1:], strict=False):
        if hi == lo:
            out.append((m + lo, m + lo))
        else:
            out.append((max(0, m + lo - back), min(total, m + hi + ahead)))
    return out


def fetch_window(cp: ContextParallel, s: Shards, windows, m: int, k, v, keep):
    """k, v [B, H, n_r, D] of this rank's tokens -> the segment part of this rank's window: k, v
    [B, H, w, D] and its key mask [B, w] (rows from every rank that owns some; one all_to_all)."""
    b_, h, n, d = k.shape
    mask = torch.ones(b_, n, dtype=k.dtype, device=k.device) if keep is None else keep.to(k.dtype)
    rows = torch.cat([k.permute(2, 0, 1, 3).reshape(n, b_, h * d), v.permute(2, 0, 1, 3).reshape(n, b_, h * d),
                      mask.t()[:, :, None]], dim=-1)  # (n, B, 2C + 1): token-major for the all_to_all
    send, recv, pieces = [], [], []
    for r, (a, b) in enumerate(windows):
        lo, hi = overlap(a - m, b - m, s.lo, s.hi)  # my tokens in rank r's window
        send.append(hi - lo)
        pieces.append(rows[lo - s.lo : hi - s.lo])
        lo_r, hi_r = overlap(windows[s.rank][0] - m, windows[s.rank][1] - m, s.offsets[r], s.offsets[r + 1])
        recv.append(hi_r - lo_r)
    got = cp.comm.all_to_all(torch.cat(pieces), send, recv, "xl:window")  # (w, B, 2C + 1), in sequence order
    w, c = got.shape[0], h * d
    k_seg = got[..., :c].reshape(w, b_, h, d).permute(1, 2, 0, 3)  # (B, H, w, D)
    v_seg = got[..., c : 2 * c].reshape(w, b_, h, d).permute(1, 2, 0, 3)
    keep_seg = None if w == 0 else got[..., -1].t().detach() > 0.5  # (B, w)
    return k_seg, v_seg, keep_seg


def overlap(a: int, b: int, lo: int, hi: int) -> tuple[int, int]:
    """[a, b) ∩ [lo, hi) as (start, end) with end >= start (empty: start == end)."""
    start = max(a, lo)
    return start, max(start, min(b, hi))


def attend_at(attn: XLAttention, q, k, v, keep, start: int):
    """XL attention of queries at key positions start .. start + n - 1: q [B, H, n, D], k, v
    [B, H, L, D], keep [B, L] or None -> [B, H, n, D]. The same formula as `XLAttention.attend`
    (which has start = L - n): relative bias (q + v)·W_r r_d gathered from the R distinct distances,
    content (q + u)·k in SDPA, rows without a key zero."""
    cfg = attn.config
    n, length = q.shape[2], k.shape[2]
    dist = (start + torch.arange(n, device=q.device))[:, None] - torch.arange(length, device=q.device)[None, :]
    allowed = torch.ones(n, length, dtype=torch.bool, device=q.device)
    if cfg.causal:
        allowed &= dist >= 0
    if cfg.span is not None:
        allowed &= dist.abs() <= cfg.span
    allowed = allowed[None, None]  # (1, 1, n, L)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]  # (B, 1, n, L)
    hi, lo = start + n - 1, start - (length - 1)
    if cfg.causal:
        lo = max(lo, 0)
    distances = torch.arange(hi, lo - 1, -1, device=q.device)  # (R,)
    if cfg.clamp_len is not None:
        distances = distances.clamp(-cfg.clamp_len, cfg.clamp_len)
    r = attn.r_net(sinusoid(distances, cfg.dim).to(q.dtype))  # (R, C)
    rel = r.view(-1, cfg.heads, cfg.head_dim).permute(1, 2, 0)  # (H, D, R)
    bd = torch.matmul(q + attn.position_bias[:, None].to(q.dtype), rel)  # (B, H, n, R)
    col = (hi - dist).clamp_(0, bd.shape[-1] - 1)  # (n, L); future keys (causal) clamped, masked below
    scale = q.shape[-1] ** -0.5
    bias = torch.gather(bd, -1, col.expand(*bd.shape[:2], n, length)) * scale  # (B, H, n, L)
    bias = bias.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)
    empty = not bool(has_key.all())
    if empty:
        bias = bias.masked_fill(~has_key, 0.0)
    query = q + attn.content_bias[:, None].to(q.dtype)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=bias, scale=scale)  # (B, H, n, D)
    return out.masked_fill(~has_key, 0.0) if empty else out


# -- the model's memory update --------------------------------------------------------------------------
def gather_rows(cp: ContextParallel, s: Shards, h, keep, start: int):
    """The rows start .. N-1 of the whole segment (h [B, n_r, C], keep [B, n_r]) on every rank,
    detached: [B, N - start, C] and mask [B, N - start]. One all_gather of (C + 1) values per row."""
    lo, hi = overlap(start, s.total, s.lo, s.hi)
    part = h.detach()[:, lo - s.lo : hi - s.lo]  # (B, k, C)
    mask = torch.ones(part.shape[:2], dtype=h.dtype, device=h.device) if keep is None else \
        keep[:, lo - s.lo : hi - s.lo].to(h.dtype)
    rows = torch.cat([part, mask[..., None]], dim=-1).transpose(0, 1)  # (k, B, C + 1)
    got = cp.comm.all_gather(rows, "memory:gather").transpose(0, 1)  # (B, N - start, C + 1)
    return got[..., :-1], got[..., -1] > 0.5


def sharded_update_layer(cp: ContextParallel, s: Shards, attention, layer: LayerMemory, h_in, keep, mem_len: int,
                         cmem_len: int, frozen_view):
    """`longrange.models.memory.update_layer` for a sharded segment (h_in [B, n_r, C] this rank's input
    hidden states): the same next memory on every rank, and this rank's share of the reconstruction
    loss (None when nothing was compressed). Communicates the rows of [mem ; segment] the update
    keeps (XL: the new memory; compressive with overflow: all of them)."""
    m, total = layer.mem.shape[1], s.total
    rate = getattr(attention.config, "compression_rate", None)
    overflow = max(0, m + total - mem_len)
    leave = overflow if rate is None else overflow - overflow % rate  # slots that leave the FIFO
    first = leave if rate is None or leave == 0 else 0  # first row of cat = [mem ; segment] needed
    seg, seg_mask = gather_rows(cp, s, h_in, keep, max(0, first - m))
    keep_mem = layer.mem_mask if layer.mem_mask is None else layer.mem_mask[:, min(first, m):]
    masks = [keep_mem, None if layer.mem_mask is None and bool(seg_mask.all()) else seg_mask]
    cat = torch.cat([layer.mem[:, min(first, m):], seg], dim=1)  # rows first .. m + N - 1 of cat
    cat_mask = join_masks(masks, [cat.shape[1] - seg.shape[1], seg.shape[1]])
    cut = leave - first
    mem, mem_mask = cat[:, cut:], None if cat_mask is None else cat_mask[:, cut:]
    if rate is None or leave == 0:
        return LayerMemory(mem, layer.cmem, mem_mask, layer.cmem_mask), None
    old, old_mask = cat[:, :cut], None if cat_mask is None else cat_mask[:, :cut]
    return compress_leaving(attention, layer, mem, mem_mask, old, old_mask, cmem_len,
                            lambda old, compressed: reconstruction_share(
                                attention, s, frozen_view(h_in), frozen_view(old), frozen_view(compressed)))


def reconstruction_share(attention, s: Shards, h, old, compressed):
    """This rank's part of the reconstruction loss (a mean over the segment's queries): its
    queries' mean · n_r / N, so the shares sum to the whole segment's loss."""
    if s.length == 0:
        return compressed.sum() * 0  # on the compression's graph: every rank's backward reaches it
    return attention.reconstruction_loss(h, old, compressed) * (s.length / s.total)


def sharded_memory_forward(model, cp: ContextParallel, s: Shards, input_ids, keep, labels, memory,
                           mem_len) -> ModelOutput:
    """`CausalLM._forward_with_memory` on a sharded segment (s: the agreed cut): every block's attention
    through `cp` (the blocks are patched by `shard_model`), the replicated memory in, the replicated
    next memory out; loss and aux_loss are this rank's shares (see `longrange.distributed.models`)."""
    b = input_ids.shape[0]
    if s.total > model.config.max_length:
        raise ValueError(f"the shards hold {s.total} tokens, more than max_length={model.config.max_length} (the "
                         "longest segment); feed longer text segment by segment with memory")
    with cp.comm.guard():
        state = model.checked_memory(b, memory)
    h = embed(model.embeddings, cp, s, input_ids)  # (B, n_r, C)
    update = functools.partial(sharded_update_layer, cp, s)
    h, logits, new_state, aux_loss = model.memory_blocks(h, keep, state, mem_len, s.total, update)
    return ModelOutput(last_hidden_state=h, logits=logits, loss=lm_loss_share(cp, s, logits, labels),
                       memory=new_state, aux_loss=aux_loss)
