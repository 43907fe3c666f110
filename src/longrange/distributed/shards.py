"""Which tokens each rank holds: contiguous shards of one sequence, in rank order.

Rank r holds positions offsets[r] .. offsets[r + 1] - 1; shards may have unequal lengths (any n
over any number of ranks, a rank may even hold none). `split_bounds` is the default cut (the first
n % P ranks one token longer); `Shards.agree` learns the actual cut from the shards the ranks hold.
"""

from __future__ import annotations

import dataclasses

import torch


def split_bounds(n: int, world: int) -> list[int]:
    """[world + 1] offsets cutting n tokens into world near-equal contiguous shards."""
    if n < 0 or world < 1:
        raise ValueError(f"need n >= 0 tokens and world >= 1 ranks, got n={n}, world={world}")
    base, extra = divmod(n, world)
    out = [0]
    for r in range(world):
        out.append(out[-1] + base + (r < extra))
    return out


@dataclasses.dataclass(frozen=True)
class Shards:
    """offsets [P + 1]: rank r holds positions offsets[r] .. offsets[r + 1] - 1 of `total`."""

    offsets: tuple[int, ...]
    rank: int

    @property
    def world(self) -> int:
        return len(self.offsets) - 1

    @property
    def total(self) -> int:
        return self.offsets[-1]

    @property
    def lo(self) -> int:
        return self.offsets[self.rank]

    @property
    def hi(self) -> int:
        return self.offsets[self.rank + 1]

    @property
    def length(self) -> int:
        return self.hi - self.lo

    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, self.offsets[1:], strict=False)]

    def owner(self, positions: torch.Tensor) -> torch.Tensor:
        """The rank holding each position (positions < total)."""
        bounds = torch.tensor(self.offsets[1:-1], dtype=torch.long, device=positions.device)
        return torch.bucketize(positions, bounds, right=True)

    @classmethod
    def even(cls, n: int, world: int, rank: int) -> Shards:
        return cls(tuple(split_bounds(n, world)), rank)


def take_shard(t: torch.Tensor, shards: Shards, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-length tensor (its positions along `dim`)."""
    if t.shape[dim] != shards.total:
        raise ValueError(f"tensor has length {t.shape[dim]} along dim {dim}, but the shards cover {shards.total}")
    return t.narrow(dim, shards.lo, shards.length)
