"""Attention-probability dropout as a pure function of the pair: seeded, reproducible, regenerable.

Whether the probability of query i for key j (example b, head h) is kept is decided by an integer
hash of (seed, b, h, i, j), counter-based like the Philox streams of FlashAttention's dropout: no
random state is consumed and no mask is stored, so a backward pass regenerates exactly the mask its
forward pass used, and every implementation (the sparse engine, a dense reference, another
backend) that hashes the same coordinates drops the same pairs, whatever order it visits them in.

    keep(seed, b, h, i, j) = mix(row_key(seed, b, h, i) xor col_key(seed, j)) >= p · 2³²

`mix` is Chris Wellons' `lowbias32` integer hash, computed exactly in int64 torch ops (no
overflow: every product stays below 2⁶³), so the masks are identical on every device and dtype.
The row and column keys are hashed on their own small tensors, the combination once per pair.
Kept probabilities are scaled by 1 / (1 - p) (`dropout_scale`), so E[output] is unchanged.

The coordinates are the caller's: an attention that permutes its sequence (dilated, strided on a
transposed layout) or appends extra keys maps its rows and columns back to the pair's natural
indices with `DropoutIndex` so that it drops what a dense reference in natural order drops.
"""

from __future__ import annotations

import dataclasses

import torch

MASK32 = 0xFFFFFFFF
#: domain separation: the same integer as a row coordinate and as a column gives unrelated keys
_COL_SALT = 0x9E3779B9


def check_dropout_p(p: float, name: str = "dropout_p") -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def dropout_scale(p: float) -> float:
    """The factor applied to kept probabilities: 1 / (1 - p); 0 when every pair is dropped (p = 1)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_keep(seed: int, b, h, i, j, p: float) -> torch.Tensor:
    """bool tensor, the broadcast of b, h, i, j (int tensors or ints): True = keep pair (i, j) of head
    h in example b. P(keep) = 1 - p for every pair, independently across pairs (up to the hash)."""
    return keep_from_keys(row_keys(seed, b, h, i), col_keys(seed, j), p)


def row_keys(seed: int, b, h, i) -> torch.Tensor:
    """int64 in [0, 2³²), the broadcast of b, h, i: the per-row half of `dropout_keep`."""
    x = _mix32(_as_long(b) ^ _seed_key(seed))
    x = _mix32(x ^ _as_long(h, x))
    return _mix32(x ^ _as_long(i, x))


def col_keys(seed: int, j) -> torch.Tensor:
    """int64 in [0, 2³²), shaped like j: the per-column half of `dropout_keep`."""
    return _mix32(_as_long(j) ^ _mix32_int(_seed_key(seed) ^ _COL_SALT))


def keep_from_keys(rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """bool, the broadcast of `row_keys` and `col_keys` results: the pair's keep decision."""
    threshold = min(round(p * 2**32), 2**32)
    if threshold == 0:
        return torch.ones(torch.broadcast_shapes(rows.shape, cols.shape), dtype=torch.bool, device=rows.device)
    return _mix32(rows ^ cols) >= threshold


@dataclasses.dataclass(frozen=True)
class DropoutIndex:
    """Where the engine's rows and columns sit in the caller's natural coordinates (default: as given).

    batch [B]: the example of each batch row (e.g. subsequences folded into the batch axis);
    head [H]: the head of each head row; query [N] or [B, N]: the natural position of each query
    row; key [N] or [B, N]: of each key; extra [g] or [B, g]: of each extra key (default N + e, the
    order of `torch.cat([keys, extra keys])`). All int64."""

    batch: torch.Tensor | None = None
    head: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    extra: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class AttentionDropout:
    """What the engine needs to drop probabilities: p, the seed, and the coordinates (`DropoutIndex`)."""

    p: float
    seed: int
    index: DropoutIndex = dataclasses.field(default_factory=DropoutIndex)

    @property
    def scale(self) -> float:
        return dropout_scale(self.p)


def resolve_seed(seed: int | None, device=None) -> int:
    """The seed to hash with: the caller's, else one drawn from torch's default generator (so
    `torch.manual_seed` makes the run reproducible)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dropout_seed must be an int or None, got {type(seed).__name__}")
    return seed


# -- the hash -----------------------------------------------------------------------------------------
def _seed_key(seed: int) -> int:
    return _mix32_int((seed & MASK32) ^ _mix32_int((seed >> 32) & MASK32))


def _as_long(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long() & MASK32
    device = like.device if like is not None else None
    return torch.tensor(int(x) & MASK32, dtype=torch.int64, device=device)


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x · c mod 2³² for int64 x in [0, 2³²), exactly: c split in 16-bit halves keeps products < 2⁴⁸."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16) mod 2³²."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32  # < 2³¹ · 2³²: exact in int64
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """`_mix32` on a Python int (for the seed)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)
