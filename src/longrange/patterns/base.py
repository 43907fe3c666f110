"""The pattern abstraction: attention as a graph. A pattern answers "may query i see key j?".

Each pattern gives two views of the same graph:
- `mask_mod(n)` -> fn(h, q, kv) -> bool, the token-level predicate on broadcastable index tensors
  (the FlexAttention `mask_mod` idea, minus the batch axis). Used by the dense reference, pictures,
  and by the sparse engine for the few block pairs that need a token-level mask.
- `block_candidates(n, b)` -> (any, full), each [Hp, nb, nb] bool (Hp = 1 or num_heads): block
  pairs that may hold an edge, and pairs whose every real token pair is an edge. `any` may
  over-approximate (the layout compiler refines it exactly); `full` must never over-approximate.
  Cost O(nb²), never O(n²), for the built-in patterns.

Patterns compose: `a | b` (union), `a & b` (intersection), `~a` (complement).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Pattern:
    """Base class. Subclasses implement `mask_mod` and, for speed, `block_candidates`."""

    #: None when every head sees the same graph, else the number of heads the pattern is defined for.
    num_heads: int | None = None

    # -- the two views -------------------------------------------------------------------------
    def mask_mod(self, n: int, device=None) -> MaskMod:
        raise NotImplementedError

    def block_candidates(self, n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact but O(n²)-time fallback for patterns that define only `mask_mod`."""
        return exhaustive_block_candidates(self, n, b)

    # -- derived views ---------------------------------------------------------------------------
    def to_dense(self, n: int) -> torch.Tensor:
        """[n, n] bool (or [H, n, n] when heads differ). O(n²): for tests and pictures only."""
        fn = self.mask_mod(n)
        idx = torch.arange(n)
        heads = torch.arange(self.num_heads or 1)[:, None, None]
        dense = fn(heads, idx[None, :, None], idx[None, None, :]).expand(self.num_heads or 1, n, n)
        return dense[0].clone() if self.num_heads is None else dense.clone()

    # -- algebra ---------------------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other)

    def __invert__(self) -> Pattern:
        return Complement(self)


def combined_heads(*patterns: Pattern) -> int | None:
    heads = {p.num_heads for p in patterns if p.num_heads is not None}
    if len(heads) > 1:
        raise ValueError(f"cannot combine patterns defined for different head counts: {sorted(heads)}")
    return heads.pop() if heads else None


class Union(Pattern):
    def __init__(self, *parts: Pattern):
        self.parts = parts
        self.num_heads = combined_heads(*parts)

    def mask_mod(self, n, device=None):
        fns = [p.mask_mod(n, device) for p in self.parts]

        def union(h, q, kv):
            out = fns[0](h, q, kv)
            for fn in fns[1:]:
                out = out | fn(h, q, kv)
            return out

        return union

    def block_candidates(self, n, b):
        cands = [p.block_candidates(n, b) for p in self.parts]
        any_, full = cands[0]
        for a, f in cands[1:]:
            any_, full = any_ | a, full | f
        return any_, full

    def __repr__(self):
        return " | ".join(map(repr, self.parts))


class Intersection(Pattern):
    def __init__(self, *parts: Pattern):
        self.parts = parts
        self.num_heads = combined_heads(*parts)

    def mask_mod(self, n, device=None):
        fns = [p.mask_mod(n, device) for p in self.parts]

        def intersection(h, q, kv):
            out = fns[0](h, q, kv)
            for fn in fns[1:]:
                out = out & fn(h, q, kv)
            return out

        return intersection

    def block_candidates(self, n, b):
        cands = [p.block_candidates(n, b) for p in self.parts]
        any_, full = cands[0]
        for a, f in cands[1:]:
            any_, full = any_ & a, full & f  # `any` over-approximates; the compiler refines it
        return any_, full

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.parts)) + ")"


class Complement(Pattern):
    def __init__(self, inner: Pattern):
        self.inner = inner
        self.num_heads = inner.num_heads

    def mask_mod(self, n, device=None):
        fn = self.inner.mask_mod(n, device)
        return lambda h, q, kv: ~fn(h, q, kv)

    def block_candidates(self, n, b):
        any_, full = self.inner.block_candidates(n, b)
        return ~full, ~any_

    def __repr__(self):
        return f"~{self.inner!r}"


def exhaustive_block_candidates(pattern: Pattern, n: int, b: int, rows_per_step: int = 16):
    """Exact (any, full) by evaluating every token pair, a few query blocks at a time.

    O(n²) time and O(rows_per_step * b * n) memory: only for patterns without an analytic rule.
    """
    fn = pattern.mask_mod(n)
    nb = -(-n // b)
    hp = pattern.num_heads or 1
    heads = torch.arange(hp)[:, None, None]
    kv = torch.arange(nb * b)
    kv_real = kv < n
    any_rows, full_rows = [], []
    for start in range(0, nb, rows_per_step):
        q = torch.arange(start * b, min(start + rows_per_step, nb) * b)
        m = fn(heads, q[None, :, None], kv[None, None, :]).expand(hp, len(q), nb * b)
        real = (q[:, None] < n) & kv_real[None, :]
        m = m & real
        tiles = m.reshape(hp, -1, b, nb, b)
        real_tiles = real.reshape(-1, b, nb, b)
        any_rows.append(tiles.any(dim=(2, 4)))
        full_rows.append((tiles | ~real_tiles).all(dim=(2, 4)) & real_tiles.any(dim=(1, 3)))
    return torch.cat(any_rows, 1), torch.cat(full_rows, 1)


def block_token_ranges(n: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last real token of each block: two [nb] long tensors."""
    nb = -(-n // b)
    lo = torch.arange(nb) * b
    hi = torch.clamp(lo + b - 1, max=n - 1)
    return lo, hi
