"""Interop with HF transformers (optional: `pip install longrange[hf]`); transformers is imported on first use.

    ours = lr.hf.attention_from_hf(hf_longformer_layer.attention.self)  # same weights, same config

See `longrange.hf.attention` for what maps to what and the known differences.
"""

from longrange.hf.attention import aligned_random_blocks, attention_from_hf

__all__ = ["aligned_random_blocks", "attention_from_hf"]
