"""Per-example global tokens (Longformer, user-chosen BigBird globals): the dense side path.

A global token sees every token and every token sees it. Long rows see the g global keys as
extra columns appended to their blocks (the window copy of a global key is masked, so each key
counts once); global rows are a dense [g, N] attention. Cost O(g·N).
"""

from __future__ import annotations

import torch

from longrange.core.masking import check_key_padding_mask, sdpa_zero_empty_rows
from longrange.sparse.gather import TokenKeys
from longrange.sparse.layout import BlockLayout


def check_global_mask(global_mask, batch: int, length: int):
    return check_key_padding_mask(global_mask, batch, length, "global_mask")


def global_indices(global_mask: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N] bool -> (idx [B, g], valid [B, g]); g = most global tokens in one example.
    Padding tokens are never global."""
    if keep is not None:
        global_mask = global_mask & keep
    counts = global_mask.sum(1)
    g = int(counts.max()) if global_mask.numel() else 0
    order = torch.argsort((~global_mask).to(torch.int8), dim=1, stable=True)[:, :g]  # globals first
    valid = torch.arange(g, device=global_mask.device)[None, :] < counts[:, None]
    return order, valid


def take_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, H, N, D], idx [B, g] -> [B, H, g, D]. Indexing, not `torch.gather`: its backward keeps
    only the indices, where gather's keeps all of t alive until backward."""
    b, h = t.shape[:2]
    batch = torch.arange(b, device=t.device)[:, None, None]
    heads = torch.arange(h, device=t.device)[None, :, None]
    return t[batch, heads, idx[:, None, :]]


def token_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], idx [B, g] -> [B, g, C] (indexing: its backward keeps only the indices)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def global_rows(q_g, k, v, keep, scale=None, dropout_p: float = 0.0) -> torch.Tensor:
    """q_g [B, H, g, D] against all keys [B, H, N, D]; keep [B, N] or None -> [B, H, g, D]."""
    mask = None if keep is None else keep[:, None, None, :]
    return sdpa_zero_empty_rows(q_g, k, v, mask, scale, dropout_p=dropout_p)


def put_tokens(y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write token rows [B, g, C] into y [B, N, C] at idx [B, g] where valid (out of place).

    Mechanisms call it on the projected output: `merge(sparse)`, then the global tokens' projected
    rows. The head merge of the engine's token-major output is a view, so the output projection
    saves the buffer the engine saved anyway, and the copy this makes is the layer's output, which
    nothing saves (writing the rows before the merge would copy twice and keep one copy for
    backward). Its backward keeps only the indices."""
    batch = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(idx)
    return y.index_put((batch[valid], idx[valid]), rows[valid])


def fold_key_projection(n: int, g: int, dim: int, heads: int) -> bool:
    """Whether g global queries per head are cheaper against x itself (`rows_over_inputs`) than against
    keys and values projected for all n tokens: MACs H·g·N·C·2 + 2·g·C² against 2·N·C² + 2·H·g·N·D.
    At BERT-base (768 / 12) it holds up to g = 69 global tokens, at any n."""
    d = dim // heads
    return 2 * heads * g * n * dim + 2 * g * dim * dim < 2 * n * dim * dim + 2 * heads * g * n * d


def rows_over_inputs(q_g, x, w_k, w_v, b_v, keep, scale=None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of q_g [B, H, g, D] over keys x W_kᵀ + b_k and values x W_vᵀ + b_v (x [B, N, C],
    w_k, w_v [C, C] = [H·D, C], b_v [C] or None), without projecting a key or value:

        q·k_j = (q W_k,h)·x_j + q·b_k,h      the last term is the same for every j: softmax drops it
        Σ_j p_j v_j = (Σ_j p_j x_j) W_v,hᵀ + b_v,h · Σ_j p_j

    so the scores are one [g·H, C] x [C, N] product and the values one [g·H, N] x [N, C]. Nothing of
    size N·C is made or saved (x is saved by the projections anyway): Longformer's global rows cost
    O(H·g·N·C) and O(H·g·N) memory instead of O(N·C²) and O(N·C). keep [B, N] or None; a row with no
    key gives zeros. Dropout (`dropout_p`) drops probabilities as SDPA's does (unseeded RNG)."""
    B, H, g, D = q_g.shape
    C = x.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    a = torch.einsum("bhgd,hdc->bhgc", q_g, w_k.view(H, D, C)).reshape(B, H * g, C)  # q W_k per head
    s = torch.bmm(a, x.transpose(1, 2)).mul_(scale)  # (B, H·g, N)
    has_key = None
    if keep is not None:
        has_key = keep.any(dim=1)  # (B,): a row with no key sees every key here, then is zeroed
        s = s.masked_fill(~(keep | ~has_key[:, None])[:, None, :], float("-inf"))
    half = x.dtype in (torch.float16, torch.bfloat16)
    p = torch.softmax(s, dim=-1, dtype=torch.float32 if half else x.dtype).to(x.dtype)
    if has_key is not None and not bool(has_key.all()):
        p = p * has_key[:, None, None].to(p.dtype)
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    ctx = torch.bmm(p, x).view(B, H, g, C)  # Σ_j p_j x_j
    out = torch.einsum("bhgc,hdc->bhgd", ctx, w_v.view(H, D, C))
    if b_v is not None:
        out = out + b_v.view(1, H, 1, D) * p.sum(dim=-1).view(B, H, g, 1)
    return out


def dense_global_mask(base: torch.Tensor, global_mask: torch.Tensor) -> torch.Tensor:
    """Oracle view: base [Hp, n, n] or [n, n] OR'd with global rows/columns -> [B, Hp, n, n]."""
    base = base if base.dim() == 3 else base[None]
    g = global_mask
    return base[None] | g[:, None, :, None] | g[:, None, None, :]


def long_rows(q, k, v, layout: BlockLayout, keep, global_mask, run, idx=None, valid=None):
    """Every row through `run` (the mechanism's `run_layout`: its backend), the example's global keys
    as extra columns read in place (`TokenKeys`; their window copies masked so each key counts
    once). idx, valid: `global_indices(global_mask, keep)` when the caller has them already.
    -> out [B, H, N, D], idx [B, g], valid [B, g]."""
    if idx is None:
        idx, valid = global_indices(global_mask, keep)
    local_keep = ~global_mask if keep is None else keep & ~global_mask
    return run(q, k, v, layout, local_keep, extra_kv=TokenKeys(idx, valid)), idx, valid


def oracle_mask(base: torch.Tensor, keep, global_mask, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense oracle view with per-example globals: (mask [B, Hp, N, N], globals [B, N]) on `device`."""
    n = base.shape[-1]
    g = torch.zeros(batch, n, dtype=torch.bool, device=device) if global_mask is None else global_mask.to(device)
    if keep is not None:
        g = g & keep
    mask = dense_global_mask(base.to(device), g)
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    return mask, g
