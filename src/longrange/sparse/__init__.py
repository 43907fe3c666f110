"""The blockified sparse engine, the block layouts it runs on, and its additive score terms."""

from longrange.sparse.bias import ScoreBias
from longrange.sparse.engine import block_sparse_attention, sparse_attention
from longrange.sparse.layout import BlockLayout, compile_layout

__all__ = ["BlockLayout", "ScoreBias", "block_sparse_attention", "compile_layout", "sparse_attention"]
