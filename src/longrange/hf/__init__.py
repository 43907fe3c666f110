"""Interop with HF transformers (optional: `pip install longrange[hf]`); transformers is imported on first use.

    lr.hf.register()                    # HF models on longrange attention: attn_implementation="longrange-local"
    cache = lr.hf.LongrangeCache()      # past_key_values keeping only what the pattern can still reach
    ours = lr.hf.attention_from_hf(hf_longformer_layer.attention.self)  # same weights, same config
    long = lr.hf.convert_to_long(bert_model_or_folder, attention="longformer", max_length=4096)
    enc = lr.hf.encoder_from_hf(hf_longformer_or_bigbird_model)

See `longrange.hf.backend`, `longrange.hf.cache`, `longrange.hf.attention` and `longrange.hf.convert`
for what maps to what and the known differences.
"""

from longrange.hf.attention import aligned_random_blocks, attention_from_hf
from longrange.hf.backend import LongrangeMask, layer_setup, pattern_mechanisms, register

_LAZY = {
    "convert_to_long": "convert", "encoder_from_hf": "convert", "ConversionError": "convert",
    "extend_positions": "convert", "LongrangeCache": "cache", "LongrangeCacheLayer": "cache",
}


def __getattr__(name):  # the converters import longrange.models, the cache imports transformers: on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"longrange.hf.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'longrange.hf' has no attribute {name!r}")


__all__ = ["ConversionError", "LongrangeCache", "LongrangeCacheLayer", "LongrangeMask", "aligned_random_blocks",
           "attention_from_hf", "convert_to_long", "encoder_from_hf", "extend_positions", "layer_setup",
           "pattern_mechanisms", "register"]
