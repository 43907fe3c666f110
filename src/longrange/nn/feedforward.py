"""BERT's position-wise feed-forward: Linear(C, F) -> GELU (exact erf) -> Linear(F, C), optionally chunked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf, as BERT's "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class FeedForward(nn.Module):
    """x [B, N, C] -> [B, N, C]. `chunk_size` runs it over that many tokens at a time: the same
    result, with the [B, N, F] intermediate never held for all N at once (Reformer's chunking)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", chunk_size: int | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation
        self.chunk_size = chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.chunk_size or x.shape[1] <= self.chunk_size:
            return self._ff(x)
        return torch.cat([self._ff(part) for part in x.split(self.chunk_size, dim=1)], dim=1)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))  # (B, n, F) -> (B, n, C)
