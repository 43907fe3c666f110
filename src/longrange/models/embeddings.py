"""BERT / RoBERTa embeddings: word + position + token type -> LayerNorm -> dropout."""

from __future__ import annotations

import torch
from torch import nn

from longrange.models.config import ModelConfig


class Embeddings(nn.Module):
    """input_ids [B, N] (+ token_type_ids [B, N]) -> [B, N, C].

    Positions: "absolute" (BERT) numbers tokens offset .. offset+N-1; "padding_offset" (RoBERTa)
    numbers real tokens pad_token_id+1, pad_token_id+2, ... and gives padding pad_token_id, from
    input_ids exactly as HF's `create_position_ids_from_input_ids`; "none" has no position table
    (the attention brings relative positions: etc, xl, compressive), so no length limit either."""

    def __init__(self, config: ModelConfig, *, max_length: int | None = None, position_style: str | None = None,
                 type_vocab_size: int | None = None, word: nn.Embedding | None = None):
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.position_style = position_style or config.position_style
        self.max_length = max_length or config.max_length
        table = self.max_length + (self.pad_token_id + 1 if self.position_style == "padding_offset" else 0)
        types = config.type_vocab_size if type_vocab_size is None else type_vocab_size
        self.word = word if word is not None else nn.Embedding(config.vocab_size, config.dim,
                                                                padding_idx=config.pad_token_id)
        self.position = None if self.position_style == "none" else nn.Embedding(table, config.dim)
        self.token_type = nn.Embedding(types, config.dim) if types > 0 else None
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def position_ids(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """[B, N] long. offset: tokens already decoded (absolute style only)."""
        n = input_ids.shape[1]
        if offset + n > self.max_length:
            raise ValueError(f"{offset + n} tokens exceed max_length={self.max_length} (the position table); "
                             "convert or build the model with a larger max_length")
        if self.position_style == "padding_offset":
            real = input_ids.ne(self.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.pad_token_id  # (B, N)
        return torch.arange(offset, offset + n, device=input_ids.device).expand(input_ids.shape[0], n)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                offset: int = 0) -> torch.Tensor:
        check_token_ids(input_ids, self.word.num_embeddings)
        x = self.word(input_ids)  # (B, N, C)
        if self.position is not None:
            x = x + self.position(self.position_ids(input_ids, offset))
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """A ValueError naming the first id outside [0, vocab_size) (an embedding lookup would raise a bare
    IndexError on CPU and a device-side assert on GPU)."""
    if input_ids.numel() == 0:
        return
    low, high = (int(t) for t in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size}) of this model "
                         f"(vocab_size={vocab_size}); tokenize with the model's own tokenizer")
