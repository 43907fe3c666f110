"""`bigbird`: BigBird ITC (Zaheer et al.): global blocks + a block window + r random blocks per
query block, random choices per head, seeded and reproducible; plus what HF's version cannot do:
user-chosen global tokens per example (`global_mask`) and zero random blocks.

Every length runs through the same engine: short inputs are exact, never switched to another
algorithm. The eval-mode policy for random blocks is explicit: `random_in_eval="same"` keeps the
training draw (default), `"none"` drops random blocks in eval (HF transformers 5.23 instead
points every random slot at block 0 in eval, which over-weights the first block; we do not copy that).

The global blocks are the first and last `block_size` tokens of the input as given, padding
included (as in HF): with right-padding the trailing global block lands on padding and sees
nothing. Pass `global_mask` to make any real token global per example instead.
"""

from __future__ import annotations

import dataclasses

from longrange.core.config import AttentionConfig, check_nonnegative_int, check_positive_int
from longrange.core.interface import Capabilities
from longrange.core.reference import reference_attention
from longrange.mechanisms.base import PatternAttention
from longrange.mechanisms.globals import check_global_mask, global_rows, long_rows, oracle_mask, put_rows, take_tokens
from longrange.patterns import BlockWindow, RandomBlocks, global_blocks
from longrange.sparse.engine import block_sparse_attention

RANDOM_IN_EVAL = ("same", "none")


@dataclasses.dataclass
class BigBirdConfig(AttentionConfig):
    name = "bigbird"
    block_size: int = 64
    num_random_blocks: int = 3
    window_blocks: int = 3  # odd: the query's block and (window_blocks - 1) / 2 on each side
    global_blocks_first: int = 1  # ITC: the first and the last block are global
    global_blocks_last: int = 1
    seed: int = 0
    random_in_eval: str = "same"
    tile: int | None = None  # the engine's tile; None: block_size (the graph's blocks are set by block_size alone)

    def validate(self):
        super().validate()
        check_positive_int("block_size", self.block_size)
        check_nonnegative_int("num_random_blocks", self.num_random_blocks)
        check_positive_int("window_blocks", self.window_blocks)
        if self.window_blocks % 2 == 0:
            raise ValueError(f"window_blocks must be odd (centred on the query block), got {self.window_blocks}")
        check_nonnegative_int("global_blocks_first", self.global_blocks_first)
        check_nonnegative_int("global_blocks_last", self.global_blocks_last)
        if self.tile is not None:
            check_positive_int("tile", self.tile)
        if self.random_in_eval not in RANDOM_IN_EVAL:
            raise ValueError(f"random_in_eval must be one of {RANDOM_IN_EVAL}, got {self.random_in_eval!r}")


class BigBirdAttention(PatternAttention):
    config_class = BigBirdConfig
    capabilities = Capabilities(inputs=("global_mask",))  # extra global tokens on top of ITC's global blocks

    def default_tile(self) -> int:
        return self.config.block_size

    def _uses_random(self) -> bool:
        return self.config.num_random_blocks > 0 and (self.training or self.config.random_in_eval == "same")

    def build_pattern(self):
        c = self.config
        radius = c.window_blocks // 2
        pattern = BlockWindow(radius, c.block_size) | global_blocks(c.block_size, c.global_blocks_first,
                                                                    c.global_blocks_last)
        if c.num_random_blocks:
            self.random_blocks = RandomBlocks(
                c.num_random_blocks, c.block_size, num_heads=c.heads, seed=c.seed, window=radius,
                global_first=c.global_blocks_first, global_last=c.global_blocks_last,
            )
            self._pattern_with_random = pattern | self.random_blocks
        return pattern

    def current_pattern(self):
        base = super().current_pattern()
        return self._pattern_with_random if self._uses_random() else base

    def layout(self, n, device="cpu"):
        tag = "random" if self._uses_random() else "plain"
        return self.cached_layout(self.current_pattern(), n, device, tag)

    def redraw_random(self, seed: int) -> None:
        """Draw new random blocks (explicitly; nothing is redrawn behind your back)."""
        self.config.seed = seed
        self.forget_layouts()

    def forward(self, x, attention_mask=None, global_mask=None):
        """x [B, N, C]; attention_mask [B, N] bool (True = real); global_mask [B, N] bool: extra
        global tokens per example, on top of the ITC global blocks."""
        keep = self.check_input(x, attention_mask)
        global_mask = check_global_mask(global_mask, x.shape[0], x.shape[1])
        q, k, v = self.project(x)
        layout = self.layout(x.shape[1], x.device)
        if global_mask is None or not bool(global_mask.any()):
            return self.merge(block_sparse_attention(q, k, v, layout, keep))
        out, idx, valid = long_rows(q, k, v, layout, keep, global_mask)
        rows = global_rows(take_tokens(q, idx), k, v, keep)
        return self.merge(put_rows(out, idx, valid, rows))

    def reference_forward(self, x, attention_mask=None, global_mask=None):
        keep = self.check_input(x, attention_mask)
        q, k, v = self.project(x)
        mask, _ = oracle_mask(self.dense_mask(x.shape[1]), keep, global_mask, x.shape[0], x.device)
        return self.merge(reference_attention(q, k, v, mask))

    @classmethod
    def test_configs(cls):
        return [
            {"block_size": 2, "num_random_blocks": 2, "seed": 3},
            {"block_size": 3, "num_random_blocks": 0},
            {"block_size": 2, "num_random_blocks": 1, "window_blocks": 1, "global_blocks_last": 0},
            {"block_size": 2, "num_random_blocks": 1, "tile": 4},  # the graph of 2-token blocks on 4-token tiles
        ]
