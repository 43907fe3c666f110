"""The blockified sparse engine and the block layouts it runs on."""

from longrange.sparse.engine import block_sparse_attention, sparse_attention
from longrange.sparse.layout import BlockLayout, compile_layout

__all__ = ["BlockLayout", "block_sparse_attention", "compile_layout", "sparse_attention"]
