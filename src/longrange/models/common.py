"""What the three models share: building the block stack from a ModelConfig, BERT's init, input checks."""

from __future__ import annotations

import torch
from torch import nn

from longrange.mechanisms import ATTENTIONS
from longrange.models.config import ModelConfig
from longrange.nn import BlockStack, CrossAttention, FeedForward, TransformerBlock


def check_config(config) -> ModelConfig:
    """Every model is built from a ModelConfig; anything else is a TypeError naming what came."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a longrange.models.ModelConfig, got {type(config).__name__}")
    return config


def layer_attention(config: ModelConfig, layer: int, *, decoder: bool = False, causal: bool = False):
    """The attention module of `layer`: its own mechanism and options (`layer_options` included)."""
    att_config = config.attention_config(layer, decoder=decoder, causal=causal)
    return ATTENTIONS.get(att_config.name)[1](att_config)


def build_stack(config: ModelConfig, *, decoder: bool = False, causal: bool = False, cross: bool = False) -> BlockStack:
    """The model's layers: layer i's attention from `config.attention_config(i)`; decoder=True uses
    the decoder settings (decoder_layers, decoder_attention) and always causal attention."""
    n = (config.decoder_layers or config.layers) if decoder else config.layers
    blocks = []
    for i in range(n):
        attention = layer_attention(config, i, decoder=decoder, causal=causal or decoder)
        ffn = FeedForward(config.dim, config.ffn_dim, config.activation, config.ffn_chunk_size)
        cross_attention = CrossAttention(config.dim, config.heads) if cross else None
        blocks.append(TransformerBlock(attention, ffn, dropout=config.dropout, eps=config.layer_norm_eps,
                                       norm=config.norm, cross=cross_attention))
    final = nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if config.norm == "pre" else None
    return BlockStack(blocks, final, reversible=config.reversible and not cross)


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """BERT's init: Linear and Embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0); the
    padding embedding row 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def check_ids(input_ids, name: str = "input_ids") -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.long, torch.int, torch.int16, torch.uint8):
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{name} must be an integer tensor [B, N], got {shape}")
    return input_ids.long()


def as_keep_mask(mask, shape, name: str = "attention_mask") -> torch.Tensor | None:
    """[B, N] bool / 0-1 ints (HF style) -> bool [B, N] (True = real token), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape [B, N] = {list(shape)}, got {got}")
    return mask if mask.dtype == torch.bool else mask != 0


def pad_right(t: torch.Tensor | None, extra: int, value) -> torch.Tensor | None:
    """[B, N] -> [B, N + extra] padded with `value` on the right."""
    if t is None or extra == 0:
        return t
    return torch.nn.functional.pad(t, (0, extra), value=value)
