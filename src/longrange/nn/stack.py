"""A stack of TransformerBlocks with the memory options: gradient checkpointing or reversible layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longrange.nn.block import TransformerBlock
from longrange.nn.reversible import reversible_equations, reversible_forward


class BlockStack(nn.Module):
    """blocks, then an optional final LayerNorm (pre-norm models). x [B, N, C] -> [B, N, C]."""

    def __init__(self, blocks: list[TransformerBlock], final_norm: nn.LayerNorm | None = None,
                 reversible: bool = False):
        super().__init__()
        if reversible and any(b.norm != "pre" for b in blocks):
            raise ValueError("reversible layers need pre-norm blocks (norm='pre')")
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.reversible = reversible

    def forward(self, x, attention_mask=None, global_mask=None, memory=None, memory_mask=None, caches=None,
                checkpointing: bool = False, attention_kwargs: dict | None = None):
        """attention_kwargs: mechanism-specific inputs given to every layer's self-attention."""
        kw = {"attention_mask": attention_mask, "global_mask": global_mask, "memory": memory,
              "memory_mask": memory_mask}
        if attention_kwargs:
            kw["attention_kwargs"] = attention_kwargs
        if self.reversible:
            x = self._reversible(x, kw, caches)
        else:
            for i, block in enumerate(self.blocks):
                cache = None if caches is None else caches[i]
                if checkpointing and cache is None and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False, **kw)
                else:
                    x = block(x, cache=cache, **kw)
        return x if self.final_norm is None else self.final_norm(x)

    def _reversible(self, x, kw, caches):
        if caches is None:
            return reversible_forward(self.blocks, x, **kw)
        y1, y2 = reversible_equations(self.blocks, x, x, kw, caches)
        return (y1 + y2) / 2

    def new_caches(self) -> list[dict]:
        return [block.new_cache() for block in self.blocks]
