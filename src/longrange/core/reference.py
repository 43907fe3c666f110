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
    (or no key at all, M = 0) returns zeros (never NaN). Returns [B, H, N, D] in q's dtype.
    """
    _check_shapes(q, k, v, mask)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [B, H, N, M]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if scores.shape[-1] == 0:  # no keys: every row has none allowed
        return torch.zeros_like(q)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked entries
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


def _check_shapes(q, k, v, mask) -> None:
    """Errors naming the argument: q, k, v [B, H, N|M, D] (k and v alike); mask bool, broadcastable to [B, H, N, M]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"reference_attention: {name} must be a [B, H, N, D] tensor, got {got}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"reference_attention: k and v must be [B, H, M, D] with q's B, H and D; got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"reference_attention: mask must be a bool tensor (True = attend), got {got}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"reference_attention: mask must broadcast to [B, H, N, M] = {list(target)}, got "
                         f"{list(mask.shape)}")
