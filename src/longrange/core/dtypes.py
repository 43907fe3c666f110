"""The accumulation-dtype rule shared by the mechanisms that sum over the sequence axis."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) is computed in float32, since sums
    over N terms overflow fp16 and lose bf16's few mantissa bits."""
    return torch.float64 if dtype == torch.float64 else torch.float32
