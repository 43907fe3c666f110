"""BigBird's random blocks: each query block sees r key blocks drawn per head, seeded."""

from __future__ import annotations

import torch

from longrange.core.config import check_nonnegative_int, check_positive_int
from longrange.patterns.base import Pattern, exhaustive_block_candidates


class RandomBlocks(Pattern):
    """Per head h and query block I, `num_blocks` key blocks drawn without replacement from the
    blocks outside I's window (|I - J| > window) and outside the first `global_first` and last
    `global_last` blocks, as in BigBird ITC. Global query blocks draw none (they see everything).

    The draw is a function of (seed, n, block_size, heads) only: reproducible, never from the
    global RNG. `redraw(seed)` picks new blocks explicitly. If fewer blocks are available than
    asked (short inputs), all available ones are taken.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_heads: int = 1,
        seed: int = 0,
        window: int = 1,
        global_first: int = 1,
        global_last: int = 1,
    ):
        check_nonnegative_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        check_positive_int("num_heads", num_heads)
        check_nonnegative_int("window", window)
        self.num_random, self.block_size, self.seed = num_blocks, block_size, seed
        self.window, self.global_first, self.global_last = window, global_first, global_last
        self.num_heads = num_heads
        self._tables: dict[int, torch.Tensor] = {}

    def redraw(self, seed: int) -> None:
        self.seed = seed
        self._tables.clear()

    def table(self, n: int) -> torch.Tensor:
        """[H, nb, r] long: the random key blocks of each query block (-1 = none)."""
        if n not in self._tables:
            self._tables[n] = self._draw(n)
        return self._tables[n]

    def _draw(self, n: int) -> torch.Tensor:
        nb = -(-n // self.block_size)
        gen = torch.Generator().manual_seed(self.seed)
        blocks = torch.arange(nb)
        is_global = (blocks < self.global_first) | (blocks >= nb - self.global_last)
        near = (blocks[:, None] - blocks[None, :]).abs() <= self.window
        allowed = ~near & ~is_global[None, :] & ~is_global[:, None]  # [nb(query), nb(key)]
        r = min(self.num_random, int(allowed.sum(1).max()) if nb else 0)
        if r == 0:
            return torch.full((self.num_heads, nb, 0), -1, dtype=torch.long)
        keys = torch.rand(self.num_heads, nb, nb, generator=gen)
        keys = keys.masked_fill(~allowed, -1.0)
        score, pick = keys.topk(r, dim=-1)
        return torch.where(score >= 0, pick, torch.full_like(pick, -1))

    def mask_mod(self, n, device=None):
        table = self.table(n).to(device)
        bs = self.block_size

        last = table.shape[1] - 1

        def random_blocks(h, q, kv):
            # tokens past n (block padding) are clamped to the last block; the engine masks them anyway
            chosen = table[h, (q // bs).clamp(0, last)]  # [..., r]
            return (chosen == (kv // bs)[..., None]).any(-1) & (q < n)

        return random_blocks

    def block_candidates(self, n, b):
        if b != self.block_size:
            return exhaustive_block_candidates(self, n, b)
        table = self.table(n)  # [H, nb, r]
        nb = table.shape[1]
        hit = torch.zeros(self.num_heads, nb, nb + 1, dtype=torch.bool)
        hit.scatter_(2, torch.where(table < 0, nb, table), True)
        hit = hit[..., :nb]
        return hit, hit.clone()

    def __repr__(self):
        return (
            f"RandomBlocks({self.num_random}, block_size={self.block_size}, heads={self.num_heads}, seed={self.seed})"
        )
