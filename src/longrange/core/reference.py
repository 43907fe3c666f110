"""The dense, obviously-correct oracle. Quadratic memory: for tests, pictures and small inputs only."""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v, computed in float32 (float64 stays float64).

    q, k, v: [B, H, N, D] (k, v may have another length M).
    mask: bool, broadcastable to [B, H, N, M]; True = may attend. A query row with no allowed key
    returns zeros (never NaN). Returns [B, H, N, D] in q's dtype.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [B, H, N, M]
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked entries
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
