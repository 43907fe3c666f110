"""The blockified sparse engine, the block layouts it runs on, their FlexAttention lowering and the
additive score terms both run (`ScoreTerm`, described once; `ScoreBias`, the engine's per-chunk form)."""

from longrange.sparse.backends import sparse_attention
from longrange.sparse.bias import ScoreBias
from longrange.sparse.engine import block_sparse_attention, merge_softmax
from longrange.sparse.flex import FlexUnavailable, flex_block_sparse_attention
from longrange.sparse.gather import TokenKeys
from longrange.sparse.layout import BlockLayout, compile_layout
from longrange.sparse.score import ScoreTerm

__all__ = [
    "BlockLayout", "FlexUnavailable", "ScoreBias", "ScoreTerm", "TokenKeys", "block_sparse_attention", "compile_layout",
    "flex_block_sparse_attention", "merge_softmax", "sparse_attention",
]
