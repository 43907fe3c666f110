"""`bigbird`: BigBird ITC (Zaheer et al.): global blocks + a block window + r random blocks per
query block, random choices per head, seeded and reproducible; plus what HF's version cannot do:
user-chosen global tokens per example (`global_mask`) and zero random blocks.

Every length runs through the same engine: short inputs are exact, never switched to another
algorithm. The eval-mode policy for random blocks is explicit (`RANDOM_IN_EVAL`):
- "same" (default, the paper's): the seeded training draw stays in eval; random attention is part
  of the model's graph in the paper and in google-research/bigbird, at training and inference alike;
- "none": no random blocks in eval;
- "hf": what HF transformers does in eval, where every random slot points at block 0: the non-global
  query blocks see the first block 1 + r times (r extra copies of its keys in the softmax). Use it to
  match a HF BigBird checkpoint's eval outputs (`lr.hf.encoder_from_hf(m, random_in_eval="hf")`).

The global blocks are the first and last `block_size` tokens of the input as given, padding
included (as in HF): with right-padding the trailing global block lands on padding and sees
nothing. Pass `global_mask` to make any real token global per example instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from longrange.core.config import AttentionConfig, check_nonnegative_int, check_positive_int
from longrange.core.interface import Capabilities
from longrange.core.reference import reference_attention
from longrange.mechanisms.base import PatternAttention
from longrange.mechanisms.globals import check_global_mask, global_rows, long_rows, oracle_mask, put_tokens, take_tokens
from longrange.patterns import BlockWindow, RandomBlocks, global_blocks
from longrange.sparse.backends import check_backend

RANDOM_IN_EVAL = ("same", "none", "hf")


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
    #: draw random blocks only within the query's span of this many tokens (a multiple of block_size);
    #: None: over the whole sequence (the paper's). With the shard length under context parallelism,
    #: every random block is local (`longrange.patterns.RandomBlocks`, span): a different graph
    random_span: int | None = None
    backend: str = "auto"  # "auto" | "engine" | "flex": what runs the layout (longrange.sparse.backends)

    def validate(self):
        super().validate()
        check_positive_int("block_size", self.block_size)
        check_backend(self.backend)
        check_nonnegative_int("num_random_blocks", self.num_random_blocks)
        check_positive_int("window_blocks", self.window_blocks)
        if self.window_blocks % 2 == 0:
            raise ValueError(f"window_blocks must be odd (centred on the query block), got {self.window_blocks}")
        check_nonnegative_int("global_blocks_first", self.global_blocks_first)
        check_nonnegative_int("global_blocks_last", self.global_blocks_last)
        if self.tile is not None:
            check_positive_int("tile", self.tile)
        if self.random_span is not None:
            check_positive_int("random_span", self.random_span)
            if self.random_span % self.block_size:
                raise ValueError(f"random_span must be a multiple of block_size={self.block_size}, got "
                                 f"{self.random_span}")
        if self.random_in_eval not in RANDOM_IN_EVAL:
            raise ValueError(f"random_in_eval must be one of {RANDOM_IN_EVAL}, got {self.random_in_eval!r}")
        if self.random_in_eval == "hf" and self.global_blocks_first < 1:
            raise ValueError("random_in_eval='hf' (random slots on block 0, as HF) needs global_blocks_first >= 1")


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
                global_first=c.global_blocks_first, global_last=c.global_blocks_last, span=c.random_span,
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
        if self._hf_eval():
            if global_mask is not None and bool(global_mask.any()):
                raise ValueError("random_in_eval='hf' reproduces HF's eval graph, which has no global_mask; use "
                                 "'same' or 'none' with global tokens")
            return self.merge(self.run_layout(q, k, v, layout, keep, extra_kv=self._block0_copies(k, v, keep)))
        if global_mask is None or not bool(global_mask.any()):
            return self.merge(self.run_layout(q, k, v, layout, keep))
        out, idx, valid = long_rows(q, k, v, layout, keep, global_mask, self.run_layout)
        rows = global_rows(take_tokens(q, idx), k, v, keep, dropout_p=self.attention_dropout())
        return put_tokens(self.merge(out), idx, valid, self.merge(rows))

    # -- random_in_eval="hf": r copies of block 0 for the non-global query blocks -------------------------------
    def _hf_eval(self) -> bool:
        c = self.config
        return not self.training and c.random_in_eval == "hf" and c.num_random_blocks > 0

    def _global_queries(self, n: int, device) -> torch.Tensor:
        """[n] bool: queries in a global block (they see every key once)."""
        c, pos = self.config, torch.arange(n, device=device)
        return (pos < c.global_blocks_first * c.block_size) | (pos >= n - c.global_blocks_last * c.block_size)

    def _block0_copies(self, k, v, keep):
        """extra_kv: block 0's keys and values repeated r times [B, H, r·b, D], seen by non-global queries."""
        c = self.config
        b, h, n, d = k.shape
        first = min(c.block_size, n)
        k0 = k[:, :, :first].repeat(1, 1, c.num_random_blocks, 1)  # (B, H, r·b, D)
        v0 = v[:, :, :first].repeat(1, 1, c.num_random_blocks, 1)
        real = torch.ones(b, first, dtype=torch.bool, device=k.device) if keep is None else keep[:, :first]
        seen = ~self._global_queries(n, k.device)  # (N,)
        keep_e = seen[None, :, None] & real.repeat(1, c.num_random_blocks)[:, None, :]  # (B, N, r·b)
        return k0, v0, keep_e

    def reference_forward(self, x, attention_mask=None, global_mask=None):
        keep = self.check_input(x, attention_mask)
        q, k, v = self.project(x)
        mask, _ = oracle_mask(self.dense_mask(x.shape[1]), keep, global_mask, x.shape[0], x.device)
        if self._hf_eval():  # block 0 counted 1 + r times by the non-global queries: + log(1 + r) on its scores
            n, c = x.shape[1], self.config
            rows = ~self._global_queries(n, x.device)
            bias = torch.zeros(n, n, dtype=torch.float64, device=x.device)
            bias[rows, : c.block_size] = math.log(1 + c.num_random_blocks)
            return self.merge(_biased_reference(q, k, v, mask, bias))
        return self.merge(reference_attention(q, k, v, mask))

    @classmethod
    def test_configs(cls):
        return [
            {"block_size": 2, "num_random_blocks": 2, "seed": 3},
            {"block_size": 3, "num_random_blocks": 0},
            {"block_size": 2, "num_random_blocks": 1, "window_blocks": 1, "global_blocks_last": 0},
            {"block_size": 2, "num_random_blocks": 1, "tile": 4},  # the graph of 2-token blocks on 4-token tiles
        ]


def _biased_reference(q, k, v, mask, bias):
    """Dense softmax(q kᵀ / √D + bias, masked) v in float64 (the oracle of random_in_eval="hf")."""
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.double()).to(q.dtype)
