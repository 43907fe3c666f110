"""Block patterns on a sharded sequence: each rank fetches only the key blocks its queries visit.

Rank r holds positions lo .. hi - 1 (`Shards`). Its queries' layout is the pattern compiled for
those queries among all N keys (a rectangular `BlockLayout`, q_offset = lo). From it, before any
tensor moves, the plan (`BlockPlan`) knows:

- which global key blocks the sparse rows visit: the union of their slots (a window's halo, the
  global blocks, BigBird's random blocks), cut by owner: what to ask each rank for;
- what every other rank asks of this one (the requests are exchanged once, as block ids);
- the compact key buffer: those blocks in position order, local tokens and fetched ones side by
  side, and the layout remapped onto it (its predicate still sees absolute positions);
- the dense (global) query rows, which see (almost) every key: they are not fed by fetching the
  sequence but computed where the keys live: every rank attends the gathered global queries over
  its own keys, and the partial results merge by log-sum-exp (an all-reduce of [g, D + 1] rows).

Then an all-to-all moves the keys, one the values (and one their padding mask) and the engine runs the
remapped layout, forward and backward (the all-to-all's adjoint returns the key gradients to their
owners). Bytes per rank: the fetched tokens' keys and values, 2·H·D·itemsize each (+ B bytes of
mask), plus the global rows' merge; `planned_bytes` gives it before running, `Comm.sent` counts it.
"""

from __future__ import annotations

import dataclasses

import torch

from longrange.core.dropout import DropoutIndex, resolve_seed
from longrange.distributed.comm import Comm
from longrange.distributed.shards import Shards
from longrange.distributed.softmax import merge_over_ranks
from longrange.mechanisms.feature_maps import finite_or_zero
from longrange.patterns.base import Pattern
from longrange.sparse.backends import run_layout
from longrange.sparse.engine import merge_softmax
from longrange.sparse.layout import BlockLayout, compile_layout

#: one fetch of every visited remote block when the compact buffer stays within this many times the
#: shard (windows: halos only); beyond (BigBird's random blocks reach most of the sequence), the
#: blocks come one source rank at a time and the partial results merge by log-sum-exp
FETCH_ONCE_FACTOR = 2.0
FETCH_MODES = ("auto", "once", "by_source")


@dataclasses.dataclass
class FetchStep:
    """One fetch and the attention over what it brings.

    layout   this rank's sparse rows restricted to the slots whose keys this step holds, on the
             compact keys (rectangular: n_r queries among S·b keys), or None (nothing to compute)
    blocks   [S] the global key blocks of the compact buffer, ascending
    source   [S·b] where each compact key comes from in cat(local tokens, fetched tokens, one zero
             pad): local i -> i, fetched j -> n_r + j, not held by this step (or beyond N) -> the pad
    send     local token indices sent, grouped by destination rank (rank order)
    send_counts, recv_counts  tokens sent to / fetched from each rank
    """

    layout: BlockLayout | None
    blocks: torch.Tensor
    source: torch.Tensor
    send: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    exchange: bool = True  # False: every rank's step holds only local tokens (no collective)
    #: `source` as runs (kind, start, length) of consecutive local / fetched / padding keys, made once
    #: with the plan (the compact buffers are one concatenation of their views, every call)
    runs: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)

    def sent_tokens(self, rank: int) -> int:
        return sum(self.send_counts) - self.send_counts[rank]


@dataclasses.dataclass
class BlockPlan:
    """What rank `shards.rank` computes and moves for one (pattern, N, tile, cut).

    steps       one `FetchStep` ("once": every visited block in one all-to-all) or one per source
                rank ("by_source": step t brings the blocks held by rank r - t, so a rank never
                holds more than about one shard of remote keys; the steps' results merge by
                log-sum-exp)
    dense_local [t_r] local indices of this rank's dense-row queries (real tokens only)
    dense_counts every rank's t_r; dense_positions [sum t_r] their absolute positions, rank order
    dense_full  [sum t_r] bool: that query sees every key (no token mask needed)
    """

    shards: Shards
    tile: int
    steps: list[FetchStep]
    dense_local: torch.Tensor
    dense_counts: list[int]
    dense_positions: torch.Tensor
    dense_full: torch.Tensor
    pattern: Pattern
    mode: str = "once"

    def bytes(self, batch: int, heads: int, head_dim: int, itemsize: int, masked: bool) -> dict[str, int]:
        """Bytes this rank sends in the forward pass, by kind (what `Comm.sent` will count)."""
        r, world = self.shards.rank, self.shards.world
        tokens = sum(step.sent_tokens(r) for step in self.steps)
        out = {kind: tokens * batch * heads * head_dim * itemsize for kind in ("blocks:k", "blocks:v")}
        if masked:
            out["blocks:mask"] = tokens * batch
        t = sum(self.dense_counts)
        if t and world > 1:
            q_rows = self.dense_counts[r] * batch * heads * head_dim * itemsize
            out["dense:q"] = q_rows * (world - 1)  # the all-gather of the global queries
            merge = batch * heads * t * (head_dim + 1) * itemsize
            out["dense:merge"] = 2 * (world - 1) * merge // world
            out["max"] = 2 * (world - 1) * batch * heads * t * 4 // world  # lse shift, float32
        return out


def plan_blocks(comm: Comm, shards: Shards, pattern: Pattern, tile: int, device=None, fetch: str = "auto") -> BlockPlan:
    """The plan of `pattern` at shards.total tokens on tiles of `tile` (a collective: every rank
    calls it). fetch: "once", "by_source" or "auto" (once unless some rank's compact buffer would
    exceed `FETCH_ONCE_FACTOR` times its shard)."""
    if fetch not in FETCH_MODES:
        raise ValueError(f"fetch must be one of {FETCH_MODES}, got {fetch!r}")
    n, lo, hi, N, b, r, world = shards.length, shards.lo, shards.hi, shards.total, tile, shards.rank, shards.world
    local = compile_layout(pattern, n, b, n_kv=N, q_offset=lo) if n else None
    blocks, dense_local, dense_full = _visited_blocks(local, n, b)
    # requests: for each owner, the blocks we need from it (a block may straddle two owners)
    need = _block_tokens(blocks, b, N)  # [T] absolute positions, ascending
    owner = shards.owner(need)
    need_from = [torch.unique(need[owner == s] // b) for s in range(world)]
    counts = comm.gather_ints([len(x) for x in need_from] + [int(len(blocks) * b > FETCH_ONCE_FACTOR * max(n, 1))])
    asked = _exchange_requests(comm, need_from, [c[:world] for c in counts])  # per rank: blocks it asks of us
    send = [_tokens_in(blocks_s, b, N, lo, hi) - lo for blocks_s in asked]
    send[r] = send[r][:0]  # our own tokens are read in place
    recv = [int((owner == s).sum()) if s != r else 0 for s in range(world)]
    mode = fetch if fetch != "auto" else ("by_source" if any(c[world] for c in counts) and world > 1 else "once")
    if mode == "once":
        steps = [_step(local, blocks, pattern, b, N, lo, hi, (0, N), need[owner != r], send, recv)]
    else:
        steps = []
        for t in range(world):
            src, dst = (r - t) % world, (r + t) % world
            s_lo, s_hi = shards.offsets[src], shards.offsets[src + 1]
            held = blocks[(blocks * b < s_hi) & (blocks * b + b > s_lo)]  # blocks with tokens on rank src
            step_send = [send[d] if d == dst else send[d][:0] for d in range(world)]
            step_recv = [recv[s_] if s_ == src else 0 for s_ in range(world)]
            step = _step(local, held, pattern, b, N, lo, hi, (s_lo, s_hi), need[owner == src] if t else need[:0],
                         step_send, step_recv, always=t == 0)
            steps.append(dataclasses.replace(step, exchange=t > 0))
    rows = comm.gather_objects(((dense_local + lo).tolist(), dense_full.tolist()))
    dense_counts = [len(p) for p, _ in rows]
    dense_positions = torch.tensor([p for ps, _ in rows for p in ps], dtype=torch.long)
    dense_full_all = torch.tensor([f for _, fs in rows for f in fs], dtype=torch.bool)
    plan = BlockPlan(shards, b, steps, dense_local, dense_counts, dense_positions, dense_full_all, pattern, mode)
    return plan if device is None else _plan_to(plan, device)


def _step(local, blocks, pattern, b, N, lo, hi, held, fetched, send, recv, always: bool = True) -> FetchStep:
    """A `FetchStep` over the key blocks `blocks`, whose tokens in [held[0], held[1]) it holds
    (the local ones in place, `fetched` [F] ascending positions from the all-to-all)."""
    source = _compact_source(blocks, b, N, lo, hi, fetched, held)
    layout = None
    if local is not None:
        slots = _touching(local.kv_index, b, held)  # [Hp, nb, k] slot's block has tokens this step holds
        layout = _compact_layout(local, blocks, slots, pattern, N, lo, always)
    return FetchStep(layout, blocks, source, torch.cat(send), [len(x) for x in send], recv,
                     runs=_runs(source, hi - lo, len(fetched)))


def _touching(kv_index: torch.Tensor, b: int, held: tuple[int, int]) -> torch.Tensor:
    return (kv_index * b < held[1]) & (kv_index * b + b > held[0])


def _visited_blocks(local: BlockLayout | None, n: int, b: int):
    """-> (key blocks the sparse rows visit [S] ascending, dense-row query indices [t], full [t])."""
    empty = torch.zeros(0, dtype=torch.long)
    if local is None:
        return empty, empty, torch.zeros(0, dtype=torch.bool)
    blocks = torch.unique(local.kv_index[local.valid])
    offs = torch.arange(b)
    rows = local.dense_rows
    toks = (rows[:, None] * b + offs).flatten()
    full = local.dense_full[:, None].expand(len(rows), b).flatten()
    real = toks < n
    return blocks, toks[real], full[real]


def _block_tokens(blocks: torch.Tensor, b: int, N: int) -> torch.Tensor:
    toks = (blocks[:, None] * b + torch.arange(b)).flatten()
    return toks[toks < N]


def _tokens_in(blocks: torch.Tensor, b: int, N: int, lo: int, hi: int) -> torch.Tensor:
    toks = _block_tokens(blocks, b, N)
    return toks[(toks >= lo) & (toks < hi)]


def _exchange_requests(comm: Comm, need_from: list[torch.Tensor], counts: list[list[int]]) -> list[torch.Tensor]:
    """Send each owner the block ids we need from it; -> the block ids each rank needs from us."""
    r = comm.rank
    send = torch.cat(need_from) if need_from else torch.zeros(0, dtype=torch.long)
    recv = [counts[s][r] for s in range(comm.world)]
    got = comm.all_to_all(send.view(-1, 1).to(comm.device), [len(x) for x in need_from], recv, kind="plan").view(-1)
    got = got.cpu()  # plans are built on the CPU, then moved (`_plan_to`)
    return list(torch.split(got, recv))


def _compact_source(blocks, b, N, lo, hi, fetched, held) -> torch.Tensor:
    """[S·b] index of each compact key in cat(local [n_r], fetched [F], pad [1]); keys outside
    `held` (positions this step does not hold) or beyond N point at the pad."""
    pos = (blocks[:, None] * b + torch.arange(b)).flatten()  # [S·b] absolute (>= N: padding)
    n, F = hi - lo, len(fetched)
    src = torch.full_like(pos, n + F)
    ok = (pos >= held[0]) & (pos < min(held[1], N))
    mine = ok & (pos >= lo) & (pos < hi)
    src[mine] = pos[mine] - lo
    theirs = ok & ~mine
    src[theirs] = n + torch.searchsorted(fetched, pos[theirs])
    return src


def _compact_layout(local: BlockLayout, blocks: torch.Tensor, slots: torch.Tensor, pattern: Pattern, N: int, lo: int,
                    always: bool = True) -> BlockLayout | None:
    """`local` (n_r queries among N keys) restricted to `slots` [Hp, nb, k] and moved onto the
    compact keys `blocks`: used slots first, renumbered; no dense rows (the dense path computes
    them); the predicate on absolute positions. None when no slot is used (unless `always`)."""
    b = local.tile
    valid = local.valid & slots
    if len(local.dense_rows):
        valid[:, local.dense_rows] = False
    k = int(valid.sum(-1).max()) if valid.numel() else 0
    if k == 0 and not always:
        return None
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[..., : max(k, 1)]
    kv, valid = torch.gather(local.kv_index, 2, order), torch.gather(valid, 2, order)
    partial = torch.gather(local.partial, 2, order) & valid
    slot = torch.searchsorted(blocks, kv).clamp(max=max(len(blocks) - 1, 0))
    kv_index = torch.where(valid, slot, torch.zeros_like(slot))
    S = max(len(blocks), 1)
    kv_abs = (blocks[:, None] * b + torch.arange(b)).flatten().clamp(max=N - 1)  # padding keys: masked anyway
    if len(blocks) == 0:
        kv_abs = torch.zeros(b, dtype=torch.long)
    fn = pattern.mask_mod(N)
    last = N - 1

    def mask_mod(h, q, kv):
        return fn(h, (q + lo).clamp(max=last), kv_abs.to(kv.device)[kv])

    return BlockLayout(n=local.n, tile=b, kv_index=kv_index, valid=valid, partial=partial,
                       dense_rows=torch.zeros(0, dtype=torch.long), dense_full=torch.zeros(0, dtype=torch.bool),
                       mask_mod=mask_mod, num_heads=local.num_heads, pattern=None, n_kv=S * b, q_offset=0)


def _plan_to(plan: BlockPlan, device) -> BlockPlan:
    steps = [dataclasses.replace(st, layout=None if st.layout is None else st.layout.to(device),
                                 **{f: getattr(st, f).to(device) for f in ("blocks", "source", "send")})
             for st in plan.steps]
    moved = {f: getattr(plan, f).to(device) for f in ("dense_local", "dense_positions", "dense_full")}
    return dataclasses.replace(plan, steps=steps, **moved)


# -- running a plan -------------------------------------------------------------------------------------------
def fetch_keys(comm: Comm, plan: FetchStep, k, v, keep):
    """k, v [B, H, n_r, D] (+ keep [B, n_r]) -> the compact keys and values [B, H, S·b, D] and their
    keep mask [B, S·b] (False beyond N; None when nothing is masked). Only the requested tokens are
    copied to be sent; the compact buffers are one concatenation of views (local runs, fetched runs,
    padding), so the local keys are copied once."""
    B, H, n, D = k.shape
    runs = plan.runs
    pieces = []
    for t, kind in ((k, "blocks:k"), (v, "blocks:v")):  # one at a time: one shard-sized buffer in flight
        if plan.exchange:
            sent = t.permute(2, 0, 1, 3).index_select(0, plan.send)  # (T, B, H, D), tokens lead
            got = comm.all_to_all(sent, plan.send_counts, plan.recv_counts, kind=kind).permute(1, 2, 0, 3)
            del sent
        else:
            got = t.new_zeros(B, H, 0, D)
        pieces.append(_assemble(runs, t, got, 2))  # (B, H, S·b, D)
        fetched = got.shape[2]
        del got
    k_c, v_c = pieces
    pad_keys = any(kind == "pad" for kind, _, _ in runs)
    if keep is None and not pad_keys:
        return k_c, v_c, None
    if keep is not None:  # (every rank has a mask when one has: `ContextParallel` makes sure)
        sent_keep = keep.index_select(1, plan.send).t().to(torch.uint8)  # (T, B)
        got_keep = (comm.all_to_all(sent_keep, plan.send_counts, plan.recv_counts, kind="blocks:mask").bool().t()
                    if plan.exchange else keep[:, :0])
        local_keep = keep
    else:  # every fetched token is real: nothing to send
        got_keep = torch.ones(B, fetched, dtype=torch.bool, device=k.device)
        local_keep = torch.ones(B, n, dtype=torch.bool, device=k.device)
    return k_c, v_c, _assemble(runs, local_keep, got_keep, 1)


def _runs(source: torch.Tensor, n: int, fetched: int) -> list[tuple[str, int, int]]:
    """`source` (compact key -> index in [local n_r ; fetched ; pad]) as runs (kind, start, length) of
    consecutive tokens from one place: "local", "fetched" or "pad" (a new run wherever the place
    changes or the index does not follow on)."""
    if len(source) == 0:
        return []
    kind = (source >= n).long() + (source >= n + fetched).long()  # 0 local, 1 fetched, 2 pad
    at = torch.where(kind == 0, source, torch.where(kind == 1, source - n, torch.zeros_like(source)))
    breaks = (kind[1:] != kind[:-1]) | ((at[1:] != at[:-1] + 1) & (kind[1:] != 2))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks.nonzero().flatten() + 1]).tolist()
    ends = starts[1:] + [len(source)]
    names = ("local", "fetched", "pad")
    return [(names[int(kind[a])], int(at[a]), b - a) for a, b in zip(starts, ends, strict=True)]


def _assemble(runs, local: torch.Tensor, fetched: torch.Tensor, dim: int) -> torch.Tensor:
    """One cat of the runs' views along `dim` (padding as zeros / False)."""
    pieces = []
    for kind, start, length in runs:
        if kind == "local":
            pieces.append(local.narrow(dim, start, length))
        elif kind == "fetched":
            pieces.append(fetched.narrow(dim, start, length))
        else:
            shape = list(local.shape)
            shape[dim] = length
            pieces.append(local.new_zeros(shape))
    # the fetched tensor always takes part (an empty slice if unused), so its all-to-all's adjoint
    # runs in backward on every rank, as the collective needs
    pieces.append(fetched.narrow(dim, 0, 0))
    return torch.cat(pieces, dim=dim)


def dense_rows(comm: Comm, plan: BlockPlan, q, k, v, keep, backend: str = "auto", dropout_p: float = 0.0,
               dropout_seed: int | None = None):
    """Every rank's dense-row queries against this rank's keys, merged over ranks by log-sum-exp:
    -> this rank's dense rows [B, H, t_r, D] (exact softmax over all N keys)."""
    B, H, n, D = q.shape
    t_all = sum(plan.dense_counts)
    q_d = q.index_select(2, plan.dense_local).permute(2, 0, 1, 3)  # (t_r, B, H, D)
    q_all = comm.all_gather(q_d, kind="dense:q").permute(1, 2, 0, 3)  # (B, H, t, D)
    if n:
        layout = _dense_layout(plan, plan.dense_full, n)
        index = None
        if dropout_p > 0:  # the pairs a single process drops: hashed on absolute positions
            lo = plan.shards.lo
            index = DropoutIndex(query=plan.dense_positions, key=torch.arange(lo, lo + n, device=q.device))
        out, lse = run_layout(q_all, k, v, layout, keep, backend=backend, return_lse=True, who="dense rows",
                              dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_index=index)
    else:  # no keys here: nothing to add
        out = q_all.new_zeros(B, H, t_all, D)
        lse = torch.full((B, H, t_all), float("-inf"), dtype=_lse_dtype(q), device=q.device)
    rows = merge_over_ranks(comm, out, lse, kind="dense:merge")
    r = plan.shards.rank
    start = sum(plan.dense_counts[:r])
    return rows[:, :, start : start + plan.dense_counts[r]]


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dense_layout(plan: BlockPlan, full: torch.Tensor, n: int) -> BlockLayout:
    """The t gathered dense queries (one row block each... of `tile` of them) against this rank's n_r
    keys: every row a dense row of a rectangular layout, its predicate on absolute positions."""
    b, lo = plan.tile, plan.shards.lo
    t = len(plan.dense_positions)
    nb = -(-t // b)
    device = plan.dense_positions.device
    hp = plan.pattern.num_heads or 1
    pos = torch.cat([plan.dense_positions, plan.dense_positions.new_zeros(nb * b - t)])  # padding rows: dropped
    fn = plan.pattern.mask_mod(plan.shards.total, device)
    last = plan.shards.total - 1

    def mask_mod(h, q, kv):
        return fn(h, pos[q], (kv + lo).clamp(max=last))

    rows_full = torch.cat([full, full.new_ones(nb * b - t)]).view(nb, b).all(1)
    zeros = torch.zeros(hp, nb, 1, dtype=torch.long, device=device)
    return BlockLayout(n=t, tile=b, kv_index=zeros, valid=zeros.bool(), partial=zeros.bool(),
                       dense_rows=torch.arange(nb, device=device), dense_full=rows_full, mask_mod=mask_mod,
                       num_heads=plan.pattern.num_heads, pattern=None, n_kv=n, q_offset=0)


def sharded_layout_attention(comm: Comm, plan: BlockPlan, q, k, v, keep, *, backend: str = "auto",
                             extra_kv=None, dense_keep=None, dropout_p: float = 0.0, dropout_seed: int | None = None):
    """q, k, v [B, H, n_r, D] of this rank's tokens; keep [B, n_r] or None -> [B, H, n_r, D], the
    rows of the pattern's attention over the whole sequence. extra_kv: keys every sparse row sees
    besides its blocks, already gathered ([B, H, g, D] twice and keep [B, g]); dense_keep: the keys
    the dense rows see instead of `keep` (with extra keys: every real key, each counted once)."""
    B, H, n, D = q.shape
    merged = len(plan.steps) > 1
    acc, touch = None, []  # the running (out, lse) of the steps so far
    for i, step in enumerate(plan.steps):
        k_c, v_c, keep_c = fetch_keys(comm, step, k, v, keep)
        if n == 0 or step.layout is None:  # nothing to compute, but every adjoint must still run here
            touch += [k_c, v_c]
            continue
        index = None
        if dropout_p > 0:
            kv_abs = (step.blocks[:, None] * plan.tile + torch.arange(plan.tile, device=q.device)).flatten()
            index = DropoutIndex(query=torch.arange(plan.shards.lo, plan.shards.lo + n, device=q.device), key=kv_abs)
        got = run_layout(q, k_c, v_c, step.layout, keep_c, backend=backend, extra_kv=extra_kv if i == 0 else None,
                         dropout_p=dropout_p, dropout_seed=dropout_seed, return_lse=merged, who="sharded",
                         dropout_index=index)
        del k_c, v_c, keep_c
        acc = got if acc is None or not merged else _merge_two(acc, got)  # two outputs alive at most
    if n == 0:
        out = q.new_zeros(B, H, 0, D)
        touch += list(extra_kv[:2]) if extra_kv is not None else []
    else:
        out = acc[0] if merged else acc
    if touch:
        out = out + _touch(*touch)
    if sum(plan.dense_counts):
        rows = dense_rows(comm, plan, q, k, v, keep if dense_keep is None else dense_keep, backend, dropout_p,
                          dropout_seed)
        out = out.index_copy(2, plan.dense_local, rows.to(out.dtype)) if n else out + _touch(rows)
    return out


def _merge_two(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """(out, lse) of two disjoint key sets -> (out, lse) of their union (`merge_softmax`); outside
    autograd in place in a's output (no shard-sized temporaries)."""
    lse = torch.logaddexp(a[1], b[1])
    if torch.is_grad_enabled() and (a[0].requires_grad or b[0].requires_grad):
        return merge_softmax(a, b), lse
    safe = finite_or_zero(lse)  # rows with no key anywhere: zeros
    (oa, la), (ob, lb) = a, b
    oa.mul_(torch.exp(la - safe).unsqueeze(-1).to(oa.dtype))
    oa.add_(ob.mul_(torch.exp(lb - safe).unsqueeze(-1).to(ob.dtype)))
    return oa, lse


def _touch(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that depends on `tensors` (keeps them on the autograd graph at no real cost)."""
    return sum(t.sum() * 0 for t in tensors)


def shared_seed(comm: Comm, seed: int | None) -> int:
    """One dropout seed for every rank: rank 0's draw (or the caller's)."""
    import torch.distributed as dist

    t = torch.tensor([resolve_seed(seed)], dtype=torch.int64, device=comm.device)
    dist.broadcast(t, src=0, group=comm.group)
    return int(t)
