"""Decoding helpers shared by CausalLM and EncoderDecoder: the cache object and token choice."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class DecodingCache:
    """Per-layer caches (see `longrange.nn.decoding`) and the number of tokens decoded so far."""

    layers: list[dict]
    length: int = 0
    memory: Any = None  # EncoderDecoder: (encoder states [B, S, C], mask [B, S] or None)

    def memory_tokens(self) -> int:
        """Largest number of past tokens any layer's self-attention keeps (bounded for windows)."""
        return max((layer["self"].memory_tokens() for layer in self.layers), default=0)

    def nbytes(self) -> int:
        """Bytes the self-attention caches of every layer hold (allocated slots included)."""
        return sum(layer["self"].nbytes() for layer in self.layers)


def check_prompt(input_ids: torch.Tensor) -> None:
    """generate continues a prompt: at least one token per example."""
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: generate needs a prompt of at least one token, got shape {list(input_ids.shape)} "
                         "(start from the bos token, or any token, e.g. torch.tensor([[bos_token_id]]))")


def check_generate_args(max_new_tokens, temperature, top_k) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")


def choose_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax (greedy) or a sample at `temperature`, from the top_k."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def finish(tokens: torch.Tensor, done: torch.Tensor, eos_token_id: int | None, pad_token_id: int):
    """After eos, an example emits padding. tokens [B], done [B] bool -> (tokens, done)."""
    if eos_token_id is None:
        return tokens, done
    tokens = torch.where(done, torch.full_like(tokens, pad_token_id), tokens)
    return tokens, done | (tokens == eos_token_id)
