"""`local`: sliding-window attention, two-sided or causal, on the sparse engine."""

from __future__ import annotations

import dataclasses

from longrange.core.config import AttentionConfig, check_positive_int
from longrange.mechanisms.base import PatternAttention, auto_block_size
from longrange.patterns import Window


def check_window(window, block_size):
    """`window` is two-sided (HF's attention_window): w // 2 keys on each side. Even, positive."""
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or window % 2:
        raise ValueError(f"window must be a positive even int (two-sided: window // 2 keys per side), got {window!r}")
    if block_size is not None:
        check_positive_int("block_size", block_size)
        if (window // 2) % block_size:
            raise ValueError(
                f"block_size={block_size} must divide the one-sided window window // 2 = {window // 2}"
            )


@dataclasses.dataclass
class LocalConfig(AttentionConfig):
    name = "local"
    window: int = 512  # two-sided: 256 keys before and 256 after (causal: 256 before)
    causal: bool = False
    block_size: int | None = None  # None: the largest power of two <= 256 dividing window // 2

    def validate(self):
        super().validate()
        check_window(self.window, self.block_size)


class LocalAttention(PatternAttention):
    config_class = LocalConfig

    @property
    def block_size(self):
        return self.config.block_size or auto_block_size(self.config.window // 2)

    def build_pattern(self):
        return Window(self.config.window // 2, causal=self.config.causal)

    @classmethod
    def test_configs(cls):
        return [{"window": 4, "block_size": 2}, {"window": 6, "causal": True}, {"window": 8, "block_size": 4}]
