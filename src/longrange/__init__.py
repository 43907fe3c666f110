"""longrange: attention that scales to long sequences, behind one interface.

    import longrange as lr
    attn = lr.build_attention("bigbird", dim=768, heads=12, block_size=64, num_random_blocks=3, seed=0)
    y = attn(x, attention_mask=keep)          # x [B, N, C] -> [B, N, C]
"""

from longrange import functional, patterns
from longrange.core.interface import Attention
from longrange.core.reference import reference_attention
from longrange.core.version import __version__  # noqa: F401 (re-exported: longrange.__version__)
from longrange.mechanisms import build_attention, list_attentions
from longrange.sparse import BlockLayout, compile_layout, sparse_attention


def __getattr__(name):  # optional-dependency subpackages load on first use
    if name in ("hf", "bench", "analysis", "models", "nn", "lra", "apps", "distributed"):
        import importlib

        return importlib.import_module(f"longrange.{name}")
    raise AttributeError(f"module 'longrange' has no attribute {name!r}")


__all__ = [
    "Attention", "BlockLayout", "build_attention", "compile_layout", "functional", "list_attentions", "patterns",
    "reference_attention", "sparse_attention",
]
