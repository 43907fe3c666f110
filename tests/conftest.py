"""Shared helpers for the core suite: the dense oracle built from a pattern, inputs, and tolerances.

Tests import the plain helpers with `from conftest import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from longrange.patterns import Pattern

#: per-dtype tolerances for "fast path vs oracle" comparisons. float64 is the golden dtype: both
#: sides differ only by summation order. Low precision compares against a float64 golden instead
#: (see `assert_error_within_factor`), where these are the absolute floors.
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=(lambda m: f"{msg}\n{m}") if msg else None)


def assert_error_within_factor(fast, ref, golden, factor: float = 4.0, floor: float | None = None):
    """Golden (float64) vs reference (test dtype) vs fast path: the fast path's max error may be
    at most `factor` times the reference's own error in the same dtype (plus a small floor)."""
    floor = TOL[ref.dtype]["atol"] if floor is None else floor
    err_fast = (fast.double() - golden).abs().max().item()
    err_ref = (ref.double() - golden).abs().max().item()
    assert err_fast <= factor * err_ref + floor, f"fast error {err_fast:.3e} vs reference error {err_ref:.3e}"


def dense_mask(pattern: Pattern, n: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B or 1, Hp, n, n] bool: the pattern's dense graph with padding keys removed."""
    m = pattern.to_dense(n)
    m = (m if m.dim() == 3 else m[None])[None]  # [1, Hp, n, n]
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :].to(m.device)
    return m


def dense_reference(q, k, v, pattern: Pattern, key_padding_mask=None, scale=None) -> torch.Tensor:
    """The oracle: `lr.reference_attention` on `pattern.to_dense(n) & key padding`."""
    mask = dense_mask(pattern, q.shape[2], key_padding_mask).to(q.device)
    return lr.reference_attention(q, k, v, mask, scale=scale)


def random_qkv(b, h, n, d, dtype=torch.float64, seed=0, requires_grad=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        out.append(t.requires_grad_(requires_grad))
    return tuple(out)


def lengths_mask(lengths, n: int) -> torch.Tensor:
    """[B, n] bool key-padding mask from per-example real lengths (right padding)."""
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def pool_dense(dense: torch.Tensor, n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool a [Hp, n, n] mask to blocks: (any [Hp, nb, nb], full [Hp, nb, nb]); `full` means
    every real token pair of the tile is True. The straightforward O(n²) definition."""
    nb = -(-n // b)
    hp = dense.shape[0]
    padded = torch.zeros(hp, nb * b, nb * b, dtype=torch.bool)
    padded[:, :n, :n] = dense
    real = torch.zeros(nb * b, nb * b, dtype=torch.bool)
    real[:n, :n] = True
    tiles = padded.view(hp, nb, b, nb, b)
    real_tiles = real.view(nb, b, nb, b)
    any_ = tiles.any(dim=(2, 4))
    full = (tiles | ~real_tiles).all(dim=(2, 4))
    return any_, full


def grads(outputs: torch.Tensor, inputs, upstream: torch.Tensor) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(outputs, inputs, upstream, allow_unused=True))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same global RNG state (the library never uses it; tests do)."""
    torch.manual_seed(0)
    yield
