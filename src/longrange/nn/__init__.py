"""Building blocks of the longrange models: the transformer block (any attention), BERT's
feed-forward (dense, or a Switch mixture of experts), dense cross-attention, decoding caches, and reversible
residual stacks."""

from longrange.nn.block import TransformerBlock
from longrange.nn.cross_attention import CrossAttention
from longrange.nn.decoding import KVCache, RecomputeCache, StateCache, self_attention_cache
from longrange.nn.feedforward import FeedForward
from longrange.nn.moe import SwitchFeedForward
from longrange.nn.reversible import reversible_equations, reversible_forward
from longrange.nn.stack import BlockStack

__all__ = [
    "BlockStack", "CrossAttention", "FeedForward", "KVCache", "RecomputeCache", "StateCache", "TransformerBlock",
    "reversible_equations", "reversible_forward", "self_attention_cache",
    "SwitchFeedForward",
]
