"""Masking helpers shared by the engine and every mechanism: one convention, bool masks, True = keep."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """Pad `x` along `dim` (at the end) so its size is a multiple of `multiple`."""
    size = x.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return x
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad, value=value)


def check_key_padding_mask(mask: torch.Tensor | None, batch: int, length: int, name: str = "attention_mask"):
    """Validate a [B, N] bool mask (True = real token); returns it on the right device or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N] = [{batch}, {length}], got {type(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, N] = [{batch}, {length}], got {list(mask.shape)}")
    return mask


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v must be [B, H, N, D] with the same shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{name} must be a 4-d tensor [B, H, N, D], got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.shape != k.shape or q.shape != v.shape:
        shapes = ", ".join(str(list(t.shape)) for t in (q, k, v))
        raise ValueError(f"q, k, v must share shape [B, H, N, D], got {shapes}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def sdpa_zero_empty_rows(q, k, v, mask, scale, bias=None, dropout_p: float = 0.0):
    """SDPA where a query row with no allowed key returns zeros (and passes no NaN to gradients):
    such a row gets one dummy key so the softmax stays finite, then its output is zeroed.
    bias: optional float scores added before the softmax, broadcastable like the mask. dropout_p:
    SDPA's attention-probability dropout (the caller passes 0 in eval)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout_p)
    has_key = mask.any(dim=-1, keepdim=True)  # [.., b, 1]
    if bool(has_key.all()):
        attn = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale, dropout_p=dropout_p)
    first = torch.zeros(mask.shape[-1], dtype=torch.bool, device=mask.device)
    first[0] = True
    allowed = mask | (first & ~has_key)
    attn = allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale, dropout_p=dropout_p)
    return out.masked_fill(~has_key, 0.0)
