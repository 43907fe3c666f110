"""Global tokens: a global token sees every token and every token sees it (symmetric)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longrange.patterns.base import Pattern, TileGrid, range_counts


class Global(Pattern):
    """Tokens at `indices` are global. Negative indices count from the end (-1 = last token).

    An index outside a sequence of n tokens ([-n, n)) is a ValueError naming it, when the pattern is
    used at that length: `Global([100])` at n = 64 would otherwise silently have no global token.
    `clip=True` keeps only the indices inside the sequence instead: for graphs defined relative to
    the length, such as BigBird's global blocks ("the first and the last block_size tokens"), which
    at n < block_size are the whole sequence (`global_blocks`).

    Static per pattern; per-example global tokens (Longformer's `global_mask`) are handled by the
    mechanisms as extra keys and dense rows, see `longrange.mechanisms.globals`.
    """

    def __init__(self, indices: Sequence[int] | range, *, clip: bool = False):
        self.indices = tuple(int(i) for i in indices)
        self.clip = bool(clip)

    def flags(self, n: int) -> torch.Tensor:
        """[n] bool, True at global positions (indices outside [-n, n): an error, or dropped with clip)."""
        outside = [i for i in self.indices if not -n <= i < n]
        if outside and not self.clip:
            raise ValueError(f"Global: index {outside[0]} is outside a sequence of n={n} tokens (indices must be in "
                             f"[-{n}, {n}); -1 is the last token)")
        g = torch.zeros(n, dtype=torch.bool)
        idx = torch.tensor([i for i in self.indices if -n <= i < n], dtype=torch.long)
        if len(idx):
            g[idx % n] = True
        return g

    def mask_mod(self, n, device=None):
        g = self.flags(n).to(device)

        def global_(h, q, kv):
            return g[q.clamp(0, n - 1)] & (q < n) | g[kv.clamp(0, n - 1)] & (kv < n)

        return global_

    def tile_candidates(self, grid: TileGrid, n):
        g = self.flags(n)
        q_count = range_counts(g, grid.q_lo, grid.q_hi)  # global tokens among each tile's real tokens
        kv_count = range_counts(g, grid.kv_lo, grid.kv_hi)
        q_all = q_count == grid.q_hi - grid.q_lo + 1
        kv_all = kv_count == grid.kv_hi - grid.kv_lo + 1
        any_ = (q_count > 0)[:, None] | (kv_count > 0)[None, :]
        full = q_all[:, None] | kv_all[None, :]
        return any_[None], full[None]

    def __repr__(self):
        shown = self.indices if len(self.indices) <= 6 else (*self.indices[:3], "...", *self.indices[-2:])
        return f"Global({list(shown)}{', clip=True' if self.clip else ''})"


def global_blocks(block_size: int, first: int = 1, last: int = 1) -> Global:
    """BigBird ITC's global tokens: the first `first` and the last `last` blocks of the sequence (all
    of it when it is shorter: clipped to the length, see `Global`)."""
    lead = range(first * block_size)
    tail = range(-last * block_size, 0)
    return Global([*lead, *tail], clip=True)

