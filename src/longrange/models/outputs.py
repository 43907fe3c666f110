"""What every model's forward returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class ModelOutput:
    last_hidden_state: torch.Tensor  # [B, N, C]
    logits: torch.Tensor | None = None  # head / LM logits; QA: [B, N, 2]
    loss: torch.Tensor | None = None  # when targets were given
    start_logits: torch.Tensor | None = None  # QA: [B, N]
    end_logits: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None  # EncoderDecoder
    cache: Any = None  # decoding: pass back in for the next tokens
    memory: Any = None  # xl / compressive CausalLM: the new MemoryState (detached), pass to the next segment
    aux_loss: torch.Tensor | None = None  # add it to the loss: compressive's attention reconstruction; the Encoder's
    # mixture-of-experts load balancing (moe_aux_weight · Σ_layers E · Σ_i f_i · P_i)
