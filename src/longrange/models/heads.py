"""Task heads on top of encoder states h [B, N, C]: each returns logits; `loss` takes the targets.

- classification: pool (token 0 or the mean over real tokens) -> dropout -> dense -> tanh ->
  dropout -> Linear(C, num_labels) (RoBERTa's head); num_labels == 1 is regression (MSE).
- token_classification: dropout -> Linear(C, num_labels) per token.
- masked_lm: dense -> GELU -> LayerNorm -> Linear(C, vocab) tied to the word embeddings (BERT's).
- question_answering: Linear(C, 2) -> start and end logits per token.
Targets use -100 for positions to ignore (as HF).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longrange.models.config import ModelConfig
from longrange.nn.feedforward import ACTIVATIONS


def pool(h: torch.Tensor, keep: torch.Tensor | None, how: str) -> torch.Tensor:
    """h [B, N, C] -> [B, C]: token 0 ("cls") or the mean over real tokens ("mean")."""
    if how == "cls":
        return h[:, 0]
    if keep is None:
        return h.mean(dim=1)
    w = keep.to(h.dtype)[:, :, None]  # (B, N, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class ClassificationHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        p = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.pooling, self.num_labels = config.pooling, config.num_labels
        self.dropout = nn.Dropout(p)
        self.dense = nn.Linear(config.dim, config.dim)
        self.out = nn.Linear(config.dim, config.num_labels)

    def forward(self, h, keep):
        x = self.dropout(pool(h, keep, self.pooling))  # (B, C)
        return self.out(self.dropout(torch.tanh(self.dense(x))))  # (B, num_labels)

    def loss(self, logits, labels):
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits.float(), labels)


class TokenClassificationHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        p = config.dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.out = nn.Linear(config.dim, config.num_labels)

    def forward(self, h, keep):
        return self.out(self.dropout(h))  # (B, N, num_labels)

    def loss(self, logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class MaskedLMHead(nn.Module):
    def __init__(self, config: ModelConfig, word: nn.Embedding):
        super().__init__()
        self.activation = config.activation
        self.dense = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.dim, config.vocab_size)
        if config.tie_word_embeddings:
            self.decoder.weight = word.weight

    def forward(self, h, keep):
        return self.decoder(self.norm(ACTIVATIONS[self.activation](self.dense(h))))  # (B, N, V)

    def loss(self, logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class QuestionAnsweringHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.out = nn.Linear(config.dim, 2)

    def forward(self, h, keep):
        logits = self.out(h)  # (B, N, 2)
        if keep is not None:  # never predict a span on padding
            logits = logits.masked_fill(~keep[:, :, None], torch.finfo(logits.dtype).min)
        return logits

    def loss(self, logits, start_positions, end_positions):
        start, end = logits.float().unbind(-1)
        return (F.cross_entropy(start, start_positions, ignore_index=-100)
                + F.cross_entropy(end, end_positions, ignore_index=-100)) / 2


def build_head(config: ModelConfig, word: nn.Embedding) -> nn.Module | None:
    if config.head is None:
        return None
    if config.head == "masked_lm":
        return MaskedLMHead(config, word)
    return {"classification": ClassificationHead, "token_classification": TokenClassificationHead,
            "question_answering": QuestionAnsweringHead}[config.head](config)
