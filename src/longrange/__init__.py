"""longrange: attention that scales to long sequences, behind one interface."""

from longrange import patterns
from longrange.core.reference import reference_attention
from longrange.sparse import BlockLayout, compile_layout, sparse_attention

__version__ = "0.1.0"

__all__ = ["BlockLayout", "compile_layout", "patterns", "reference_attention", "sparse_attention"]
