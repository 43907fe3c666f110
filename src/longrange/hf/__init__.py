"""Interop with HF transformers (optional: `pip install longrange[hf]`); transformers is imported on first use.

    ours = lr.hf.attention_from_hf(hf_longformer_layer.attention.self)  # same weights, same config
    long = lr.hf.convert_to_long(bert_model_or_folder, attention="longformer", max_length=4096)
    enc = lr.hf.encoder_from_hf(hf_longformer_or_bigbird_model)

See `longrange.hf.attention` and `longrange.hf.convert` for what maps to what and the known differences.
"""

from longrange.hf.attention import aligned_random_blocks, attention_from_hf


def __getattr__(name):  # the converters import longrange.models on first use
    if name in ("convert_to_long", "encoder_from_hf", "ConversionError", "extend_positions"):
        from longrange.hf import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'longrange.hf' has no attribute {name!r}")


__all__ = ["ConversionError", "aligned_random_blocks", "attention_from_hf", "convert_to_long", "encoder_from_hf",
           "extend_positions"]
