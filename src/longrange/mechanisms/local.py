"""`local`: sliding-window attention, two-sided or causal, on the sparse engine, optionally with
attention sinks; and the options and tile rule every sliding-window mechanism shares (`WindowConfig`,
`WindowAttention`).

Attention sinks (StreamingLLM, Xiao et al. 2023): `sink_tokens=s` makes the first s tokens global,
`Global(range(s))`; causal: `Global(range(s)) & Causal()`, so every token sees the first s tokens and
its window, and the first s tokens see what precedes them. A decoding cache keeps the s sinks forever
and the window in a ring buffer: constant memory however long the generation.
"""

from __future__ import annotations

import dataclasses

from longrange.core.config import AttentionConfig, check_nonnegative_int, check_positive_int
from longrange.core.interface import CacheSpec, Capabilities
from longrange.mechanisms.base import PatternAttention, auto_tile
from longrange.patterns import Causal, Global, Window
from longrange.sparse.backends import check_backend


def check_window(window, tile):
    """`window` is two-sided (HF's attention_window): w // 2 keys on each side. Even, positive."""
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or window % 2:
        raise ValueError(f"window must be a positive even int (two-sided: window // 2 keys per side), got {window!r}")
    if tile is not None:
        check_positive_int("tile", tile)
        if (window // 2) % tile:
            raise ValueError(f"tile={tile} must divide the one-sided window window // 2 = {window // 2}")


@dataclasses.dataclass
class WindowConfig(AttentionConfig):
    """What every sliding-window mechanism (local, dilated, longformer) is set by."""

    renamed = {"block_size": "tile"}
    window: int = 512  # two-sided: 256 keys before and 256 after (causal: 256 before)
    tile: int | None = None  # the engine's tile; None: the largest power of two <= 256 dividing window // 2
    backend: str = "auto"  # "auto" | "engine" | "flex": what runs the layout (longrange.sparse.backends)

    def validate(self):
        super().validate()
        check_window(self.window, self.tile)
        check_backend(self.backend)


class WindowAttention(PatternAttention):
    """Tiles aligned with the one-sided window, as large as divides it (see `auto_tile`)."""

    def default_tile(self) -> int:
        return auto_tile(self.config.window // 2)


@dataclasses.dataclass
class LocalConfig(WindowConfig):
    name = "local"
    causal: bool = False
    sink_tokens: int = 0  # the first s tokens are global (attention sinks); 0: a plain window

    def validate(self):
        super().validate()
        check_nonnegative_int("sink_tokens", self.sink_tokens)


class LocalAttention(WindowAttention):
    config_class = LocalConfig
    capabilities = Capabilities(causal=True)

    def build_pattern(self):
        c = self.config
        window = Window(c.window // 2, causal=c.causal)
        if not c.sink_tokens:
            return window
        sinks = Global(range(c.sink_tokens), clip=True)  # fewer tokens than sinks: all of them
        return window | (sinks & Causal() if c.causal else sinks)

    def cache_spec(self) -> CacheSpec:
        """A ring buffer of the last window // 2 keys and the sink_tokens first ones, kept forever."""
        super().cache_spec()  # causal only
        return CacheSpec("kv", window=self.config.window // 2, sinks=self.config.sink_tokens,
                         pattern=self.current_pattern())

    @classmethod
    def test_configs(cls):
        return [{"window": 4, "tile": 2}, {"window": 6, "causal": True}, {"window": 8, "tile": 4},
                {"window": 4, "tile": 2, "sink_tokens": 3}, {"window": 6, "causal": True, "sink_tokens": 2}]
