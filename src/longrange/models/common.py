"""What the three models share: building the block stack from a ModelConfig, BERT's init, input checks."""

from __future__ import annotations

import torch
from torch import nn

from longrange.mechanisms import ATTENTIONS
from longrange.models.config import ModelConfig
from longrange.nn import BlockStack, CrossAttention, FeedForward, SwitchFeedForward, TransformerBlock


def check_config(config) -> ModelConfig:
    """Every model is built from a ModelConfig; anything else is a TypeError naming what came."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a longrange.models.ModelConfig, got {type(config).__name__}")
    return config


def layer_attention(config: ModelConfig, layer: int, *, decoder: bool = False, causal: bool = False):
    """The attention module of `layer`: its own mechanism and options (`layer_options` included)."""
    att_config = config.attention_config(layer, decoder=decoder, causal=causal)
    return ATTENTIONS.get(att_config.name)[1](att_config)


def build_stack(config: ModelConfig, *, decoder: bool = False, causal: bool = False, cross: bool = False,
                encoder: bool = False) -> BlockStack:
    """The model's layers: layer i's attention from `config.attention_config(i)`; decoder=True uses
    the decoder settings (decoder_layers, decoder_attention) and always causal attention.
    encoder=True: the `Encoder`'s stack, the one where `funnel` and `moe_experts` apply (other
    models refuse them by name)."""
    if not encoder:
        for name in ("funnel", "moe_experts"):
            if getattr(config, name) is not None:
                raise ValueError(f"{name}={getattr(config, name)!r} is an option of lr.models.Encoder only; "
                                 "this model does not support it")
    n = (config.decoder_layers or config.layers) if decoder else config.layers
    blocks = []
    for i in range(n):
        attention = layer_attention(config, i, decoder=decoder, causal=causal or decoder)
        cross_attention = CrossAttention(config.dim, config.heads) if cross else None
        blocks.append(TransformerBlock(attention, layer_ffn(config, i), dropout=config.dropout,
                                       eps=config.layer_norm_eps, norm=config.norm, cross=cross_attention))
    final = nn.LayerNorm(config.dim, eps=config.layer_norm_eps) if config.norm == "pre" else None
    if config.funnel is not None:
        from longrange.models.funnel import build_funnel_stack

        return build_funnel_stack(config, blocks, final)
    return BlockStack(blocks, final, reversible=config.reversible and not cross)


def layer_ffn(config: ModelConfig, layer: int) -> FeedForward | SwitchFeedForward:
    """BERT's FFN, or the Switch mixture of experts in the layers `config.is_moe_layer` names."""
    if config.is_moe_layer(layer):
        return SwitchFeedForward(config.dim, config.ffn_dim, config.moe_experts, config.moe_capacity_factor,
                                 config.activation, config.moe_jitter)
    return FeedForward(config.dim, config.ffn_dim, config.activation, config.ffn_chunk_size)


def moe_aux_loss(model: nn.Module, weight: float) -> torch.Tensor | None:
    """weight · Σ over the model's mixture-of-experts layers of their last load-balancing loss
    (E · Σ_i f_i · P_i each), or None when it has none."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, SwitchFeedForward) and m.aux_loss is not None]
    return weight * torch.stack(losses).sum() if losses else None


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """BERT's init: Linear and Embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0); the
    padding embedding row 0."""
    for m in model.modules():
        if isinstance(m, SwitchFeedForward):
            m.reset_parameters(std)
        elif isinstance(m, nn.Linear):
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
