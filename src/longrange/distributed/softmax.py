"""One softmax over the keys of every rank, for queries every rank shares (global rows, landmarks,
inducing points): each rank scores its own keys, and the partial results merge by log-sum-exp: one
max over ranks, then one sum all-reduce of [..., D + 1] (the weighted values and their weights).
Rows with no allowed key on any rank give zeros."""

from __future__ import annotations

import torch

from longrange.distributed.comm import Comm
from longrange.mechanisms.feature_maps import finite_or_zero, normalise, with_ones

Tensor = torch.Tensor


def merge_over_ranks(comm: Comm, out: torch.Tensor, lse: torch.Tensor, kind: str = "merge") -> torch.Tensor:
    """One softmax over the union of every rank's keys from each rank's (out [B, H, t, D], lse [B, H, t])
    for the same t queries (`merge_softmax` across processes): a max, then one sum all-reduce of
    [B, H, t, D + 1]. Rows with no key anywhere give zeros. Every rank gets all t rows."""
    D = out.shape[-1]
    top = finite_or_zero(comm.max_all(lse))
    w = torch.exp(lse - top).unsqueeze(-1).to(out.dtype)  # (B, H, t, 1): 0 where this rank has no key for the row
    merged = comm.all_reduce(torch.cat([out * w, w], -1), kind=kind)
    total = merged[..., D:]
    return merged[..., :D] / torch.where(total > 0, total, torch.ones_like(total))


def row_max(scores: Tensor) -> Tensor:
    """Max over the last axis, -inf for an empty one (a rank holding no keys). [..., n] -> [...]"""
    if scores.shape[-1] == 0:
        return scores.new_full(scores.shape[:-1], float("-inf"))
    return scores.detach().amax(dim=-1)


def global_softmax(comm: Comm, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                   kind: str = "all_reduce:softmax") -> Tensor:
    """softmax(q kᵀ·scale) v over the keys of EVERY rank, for queries q [B, H, m, D] that are the same on
    every rank (landmarks, inducing points); k, v [B, H, n_r, D] this rank's keys; mask broadcastable to
    [B, H, m, n_r] bool (True = allowed) or None. One shared max (`max_all`, [B, H, m]) and one
    all-reduce of [Σ e·v, Σ e] [B, H, m, D+1]: exactly one softmax over all keys. Rows with no
    allowed key anywhere are zeros."""
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, m, n_r]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    top = finite_or_zero(comm.max_all(row_max(scores)))  # [B, H, m], a constant: it cancels
    weighted = torch.exp(scores - top[..., None]) @ with_ones(v)  # [B, H, m, D+1]; masked keys: exp(-inf) = 0
    return normalise(comm.all_reduce(weighted, kind))
