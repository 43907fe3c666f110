"""The block-pattern mechanisms under context parallelism: `local`, `dilated`, `sparse_transformer`,
`bigbird`, `longformer` (and what is refused: `etc`).

Each runs its pattern through `blocks.sharded_layout_attention` (the layout's remote key blocks
fetched, dense rows merged by log-sum-exp). Per-example global tokens (`global_mask`: Longformer's,
BigBird's extra ones) add two small collectives: the global tokens' keys and values are all-gathered
(every row sees them), and the global rows, which see every key, are computed where the keys live and
merged by log-sum-exp, never by gathering the sequence.
"""

from __future__ import annotations

import torch

from longrange.core.masking import check_key_padding_mask
from longrange.distributed.blocks import (
    BlockPlan,
    plan_blocks,
    sharded_layout_attention,
    shared_seed,
)
from longrange.distributed.context import ContextParallel, refuse, sharded
from longrange.distributed.softmax import global_softmax
from longrange.mechanisms.bigbird import BigBirdAttention
from longrange.mechanisms.dilated import DilatedAttention
from longrange.mechanisms.etc import ETCAttention
from longrange.mechanisms.globals import global_indices, take_tokens, token_rows
from longrange.mechanisms.local import LocalAttention
from longrange.mechanisms.longformer import LongformerAttention
from longrange.mechanisms.sparse_transformer import SparseTransformerAttention
from longrange.patterns.base import Pattern

refuse(ETCAttention, "etc takes a separate global input with its own four attention pieces, relative positions and "
                     "structure masks, which have no sharded form yet")


def block_plan(cp: ContextParallel, pattern: Pattern, tile: int, device) -> BlockPlan:
    """The plan for `pattern` on this call's cut, cached on cp (a collective on a miss: every rank
    misses together, since the cut and the pattern are the same everywhere)."""
    plans = cp.__dict__.setdefault("_block_plans", {})
    key = (id(pattern), tile, cp.shards.offsets, str(device), cp.fetch)
    if key not in plans:
        plans[key] = (pattern, plan_blocks(cp.comm, cp.shards, pattern, tile, device, fetch=cp.fetch))
    return plans[key][1]


def _dropout(cp: ContextParallel, attn) -> tuple[float, int | None]:
    p = attn.attention_dropout()
    return (p, shared_seed(cp.comm, None)) if p > 0 else (0.0, None)


@sharded(LocalAttention, DilatedAttention, SparseTransformerAttention)
def pattern_strategy(cp: ContextParallel, attn, x, keep, **inputs):
    """project -> the pattern on the whole sequence, sharded -> merge. Dilated and strided patterns
    run in natural order here (their permuted single-process forms need the whole sequence)."""
    if inputs:
        raise TypeError(f"{attn.config.name} takes no inputs {sorted(inputs)}")
    q, k, v = attn.project(x)
    return _plain(cp, attn, block_plan(cp, attn.current_pattern(), attn.tile, x.device), q, k, v, keep)


def _plain(cp: ContextParallel, attn, plan: BlockPlan, q, k, v, keep):
    """The pattern alone (no per-example global tokens), attention dropout included -> [B, n_r, C]."""
    p, seed = _dropout(cp, attn)
    out = sharded_layout_attention(cp.comm, plan, q, k, v, keep, backend=attn.backend, dropout_p=p, dropout_seed=seed)
    return attn.merge(out)


@sharded(BigBirdAttention)
def bigbird_strategy(cp: ContextParallel, attn: BigBirdAttention, x, keep, global_mask=None):
    if attn._hf_eval():
        raise ValueError("bigbird with random_in_eval='hf' (HF's eval graph) has no sharded form; use 'same' or 'none'")

    def with_globals(plan, qkv, gmask):  # extra global tokens use the local projections
        q, k, v = qkv
        return _with_global_tokens(cp, attn, plan, qkv, keep, gmask, lambda idx: take_tokens(q, idx), lambda: (k, v))

    return _pattern_and_globals(cp, attn, x, keep, global_mask, with_globals)


@sharded(LongformerAttention)
def longformer_strategy(cp: ContextParallel, attn: LongformerAttention, x, keep, global_mask=None):
    c = attn.config.dim
    w, bias = attn.qkv_global.weight, attn.qkv_global.bias

    def global_queries(idx):  # the global projections' Q of this rank's global tokens
        x_g = token_rows(x, idx)  # (B, g_r, C)
        return attn.split_heads(torch.nn.functional.linear(x_g, w[:c], None if bias is None else bias[:c]))

    def global_kv():  # the global projections' K, V of every token, made once the local q, k, v are freed
        kv = torch.nn.functional.linear(x, w[c:], None if bias is None else bias[c:])
        return tuple(attn.split_heads(t) for t in kv.chunk(2, dim=-1))

    def with_globals(plan, qkv, gmask):
        return _with_global_tokens(cp, attn, plan, qkv, keep, gmask, global_queries, global_kv)

    return _pattern_and_globals(cp, attn, x, keep, global_mask, with_globals)


def _pattern_and_globals(cp: ContextParallel, attn, x, keep, global_mask, with_globals):
    """The pattern; with per-example global tokens on some rank, `with_globals(plan, [q, k, v], gmask)`."""
    q, k, v = attn.project(x)
    plan = block_plan(cp, attn.current_pattern(), attn.tile, x.device)
    gmask = _global_mask(cp, global_mask, x)
    if gmask is None:
        return _plain(cp, attn, plan, q, k, v, keep)
    _no_dropout_with_globals(attn)
    qkv = [q, k, v]
    del q, k, v  # `_with_global_tokens` drops them after the sparse rows (autograd keeps what it needs)
    return attn.merge(with_globals(plan, qkv, gmask))


def _global_mask(cp: ContextParallel, global_mask, x) -> torch.Tensor | None:
    """This rank's [B, n_r] global mask, or None when no rank has a global token."""
    gmask = check_key_padding_mask(global_mask, x.shape[0], x.shape[1], "global_mask")
    local_any = gmask is not None and bool(gmask.any())
    if not any(a for (a,) in cp.comm.gather_ints([int(local_any)])):
        return None
    return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device) if gmask is None else gmask


def _no_dropout_with_globals(attn) -> None:
    if attn.attention_dropout() > 0:
        raise ValueError(f"{attn.config.name}: attention dropout with global tokens under context parallelism is not "
                         "supported (the single-process global rows draw SDPA's dropout, which no shard can "
                         "reproduce); set dropout=0 or call eval()")


def _with_global_tokens(cp, attn, plan, qkv: list, keep, gmask, global_queries, global_kv):
    """Per-example global tokens on a sharded sequence -> [B, H, n_r, D]. qkv: [q, k, v] of the
    local projections, emptied here so they can be freed once the sparse rows are done.

    Sparse rows: the pattern's blocks with the global tokens' own copies masked, plus every rank's
    global keys as extra columns (all-gathered). Global rows: their queries (`global_queries(idx)`)
    all-gathered, scored against each rank's keys `global_kv()`, merged by log-sum-exp."""
    comm = cp.comm
    q, k, v = qkv
    qkv.clear()
    idx, valid = global_indices(gmask, keep)  # (B, g_r) this rank's global tokens, first ones first
    local_keep = ~gmask if keep is None else keep & ~gmask
    k_e, v_e = (_gather_rows(comm, take_tokens(t, idx)) for t in (k, v))  # (B, H, G, D)
    keep_e = _gather_rows(comm, valid[:, None, :, None]).squeeze(-1).squeeze(1)  # (B, G)
    out = sharded_layout_attention(comm, plan, q, k, v, local_keep, backend=attn.backend,
                                   extra_kv=(k_e, v_e, keep_e), dense_keep=keep)
    q_g = _gather_rows(comm, global_queries(idx))  # (B, H, G, D) every rank's global queries
    del q, k, v, k_e, v_e
    mask = None if keep is None else keep[:, None, None, :]
    rows = global_softmax(comm, q_g, *global_kv(), mask, q_g.shape[-1] ** -0.5, kind="globals:merge")  # (B, H, G, D)
    mine = _own_rows(comm, idx.shape[1], rows)  # (B, H, g_r, D)
    b, h, _, d = out.shape
    current = take_tokens(out, idx)
    mine = torch.where(valid[:, None, :, None], mine, current)
    return out.scatter(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d), mine)


def _gather_rows(comm, t: torch.Tensor) -> torch.Tensor:
    """[B, H, g_r, *] on every rank -> [B, H, sum g_r, *] in rank order (differentiable)."""
    moved = t.movedim(2, 0)
    return comm.all_gather(moved.contiguous(), kind="globals").movedim(0, 2)


def _own_rows(comm, g_r: int, rows: torch.Tensor) -> torch.Tensor:
    counts = [c[0] for c in comm.gather_ints([g_r])]
    start = sum(counts[: comm.rank])
    return rows[:, :, start : start + g_r]
