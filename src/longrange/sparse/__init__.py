"""The blockified sparse engine, the block layouts it runs on, and their FlexAttention lowering."""

from longrange.sparse.engine import block_sparse_attention, sparse_attention
from longrange.sparse.flex import FlexUnavailable, flex_block_sparse_attention
from longrange.sparse.layout import BlockLayout, compile_layout
from longrange.sparse.score import ScoreTerm

__all__ = [
    "BlockLayout", "FlexUnavailable", "ScoreTerm", "block_sparse_attention", "compile_layout",
    "flex_block_sparse_attention", "sparse_attention",
]
