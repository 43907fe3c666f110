"""Shared foundations imported by every layer: shape legend, config base, registry, masking, oracle.

Shape legend used across the package:
    B batch, H heads, N sequence length, D head dim, C model dim (= H * D),
    b block size, nb = ceil(N / b) blocks, k key blocks visited per query block, g global tokens.
"""

from longrange.core.config import AttentionConfig
from longrange.core.masking import check_key_padding_mask, pad_to_multiple
from longrange.core.reference import reference_attention

__all__ = ["AttentionConfig", "check_key_padding_mask", "pad_to_multiple", "reference_attention"]
