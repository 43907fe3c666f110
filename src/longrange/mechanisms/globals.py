"""Per-example global tokens (Longformer, user-chosen BigBird globals): the dense side path.

A global token sees every token and every token sees it. Long rows see the g global keys as
extra columns appended to their blocks (the window copy of a global key is masked, so each key
counts once); global rows are a dense [g, N] attention. Cost O(g·N).
"""

from __future__ import annotations

import torch

from longrange.core.masking import check_key_padding_mask, sdpa_zero_empty_rows
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
    """t [B, H, N, D], idx [B, g] -> [B, H, g, D]."""
    b, h, _, d = t.shape
    return torch.gather(t, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def global_rows(q_g, k, v, keep, scale=None, dropout_p: float = 0.0) -> torch.Tensor:
    """q_g [B, H, g, D] against all keys [B, H, N, D]; keep [B, N] or None -> [B, H, g, D]."""
    mask = None if keep is None else keep[:, None, None, :]
    return sdpa_zero_empty_rows(q_g, k, v, mask, scale, dropout_p=dropout_p)


def put_rows(out: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write rows [B, H, g, D] into out [B, H, N, D] at idx [B, g] where valid (out of place)."""
    b, h, _, d = out.shape
    current = take_tokens(out, idx)
    rows = torch.where(valid[:, None, :, None], rows, current)
    return out.scatter(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d), rows)


def dense_global_mask(base: torch.Tensor, global_mask: torch.Tensor) -> torch.Tensor:
    """Oracle view: base [Hp, n, n] or [n, n] OR'd with global rows/columns -> [B, Hp, n, n]."""
    base = base if base.dim() == 3 else base[None]
    g = global_mask
    return base[None] | g[:, None, :, None] | g[:, None, None, :]


def long_rows(q, k, v, layout: BlockLayout, keep, global_mask, run):
    """Every row through `run` (the mechanism's `run_layout`: its backend), the example's global keys
    appended as extra columns (their window copies masked so each key counts once).
    -> out [B, H, N, D], idx [B, g], valid [B, g]."""
    idx, valid = global_indices(global_mask, keep)
    local_keep = ~global_mask if keep is None else keep & ~global_mask
    extra = (take_tokens(k, idx), take_tokens(v, idx), valid)
    return run(q, k, v, layout, local_keep, extra_kv=extra), idx, valid


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
