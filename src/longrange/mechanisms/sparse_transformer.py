"""`sparse_transformer`: Child et al.'s factorized patterns, strided and fixed, as the merged-head
union A(1) ∪ A(2) (every head sees both factors), causal by default, on the sparse engine.

strided (stride l): A(1) the previous l tokens, A(2) every l-th token before. Cost O(n·n/l) edges;
at block level its columns touch most blocks (the paper transposes the sequence for its kernel),
so the engine computes it at close to dense block cost: use it for fidelity, not speed.
fixed (stride l, c): A(1) the own l-chunk, A(2) the last c tokens of every chunk. O(n·(l + n·c/l)).
"""

from __future__ import annotations

import dataclasses

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.core.interface import CacheSpec, Capabilities
from longrange.mechanisms.base import PatternAttention
from longrange.patterns import fixed, strided

MODES = ("strided", "fixed")


@dataclasses.dataclass
class SparseTransformerConfig(AttentionConfig):
    name = "sparse_transformer"
    mode: str = "fixed"
    stride: int = 128
    c: int = 32  # fixed mode: summary tokens per chunk (LRA: 128, c=32)
    causal: bool = True
    tile: int = 64  # the engine's tile
    renamed = {"block_size": "tile"}

    def validate(self):
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_positive_int("stride", self.stride)
        check_positive_int("c", self.c)
        check_positive_int("tile", self.tile)
        if self.mode == "fixed" and self.c > self.stride:
            raise ValueError(f"c={self.c} must be at most stride={self.stride}")


class SparseTransformerAttention(PatternAttention):
    config_class = SparseTransformerConfig
    capabilities = Capabilities(causal=True)

    def build_pattern(self):
        c = self.config
        if c.mode == "strided":
            return strided(c.stride, causal=c.causal)
        return fixed(c.stride, c.c, causal=c.causal)

    def cache_spec(self) -> CacheSpec:
        """fixed: a ring of the last stride - 1 keys (the own chunk) and every chunk's last c keys kept
        forever (the summary columns: n·c / stride slots after n tokens). strided: every key (its
        columns reach back to the first token)."""
        super().cache_spec()  # causal only
        c = self.config
        if c.mode == "strided":
            return CacheSpec("kv", pattern=self.current_pattern())
        stride, summary = c.stride, c.c
        return CacheSpec("kv", window=stride - 1, keep=lambda pos: pos % stride >= stride - summary,
                         pattern=self.current_pattern())

    @classmethod
    def test_configs(cls):
        return [
            {"mode": "strided", "stride": 3, "tile": 2},
            {"mode": "fixed", "stride": 4, "c": 1, "tile": 3},
            {"mode": "fixed", "stride": 4, "c": 2, "causal": False, "tile": 2},
        ]
