"""Masked-LM inputs: BERT's 80/10/10 rule over single tokens, whole words, or spans.

    inputs, labels = mask_tokens(ids, maskable=maskable, word_ids=words, mask_id=tok.mask_id,
                                 replacement_ids=regular_ids(tok), config=MaskingConfig(unit="word"),
                                 generator=torch.Generator().manual_seed(0))

A *unit* is chosen for prediction, then 80% of the chosen units become [MASK], 10% random tokens
and 10% stay as they are (`mask_rate`, `random_rate`); labels hold the original ids of every
chosen token and -100 elsewhere.

- token (BERT): each maskable token is chosen with probability `probability`.
- word (whole-word masking): each word is chosen with probability `probability`, all its tokens
  together; the 80/10/10 decision is taken once per word.
- span (SpanBERT): spans of whole words, lengths ~ Geometric(`span_p`) clipped at `max_span`
  words, at uniformly drawn starting words, until `probability` of the maskable tokens are
  chosen (the last span may overshoot); one 80/10/10 decision per span.

`maskable` [B, N] is False on padding and special tokens: they are never chosen, never replaced.
Random replacements are drawn from `replacement_ids` (the regular vocabulary, no specials).
Everything is a function of the `generator` state: a run that seeds one generator per step
masks identically when it is resumed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from longrange.core.config import ConfigError

UNITS = ("token", "word", "span")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    probability: float = 0.15  # BERT's share of tokens to predict
    unit: str = "token"  # token | word | span
    mask_rate: float = 0.8  # of the chosen units: [MASK]
    random_rate: float = 0.1  # random regular token; the rest (0.1) stay as they are
    span_p: float = 0.2  # SpanBERT's geometric parameter (mean span 1 / 0.2 = 5 words before clipping)
    max_span: int = 10  # SpanBERT's clip, in words

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ConfigError(f"masking unit must be one of {list(UNITS)}, got {self.unit!r}", "masking")
        if not 0.0 < self.probability < 1.0:
            raise ConfigError(f"mlm probability must be in (0, 1), got {self.probability}", "mlm_probability")
        if self.mask_rate < 0 or self.random_rate < 0 or self.mask_rate + self.random_rate > 1.0:
            raise ConfigError(f"mask_rate + random_rate must lie in [0, 1], got {self.mask_rate} + "
                              f"{self.random_rate}", "mask_rate")
        if not 0.0 < self.span_p <= 1.0 or self.max_span < 1:
            raise ConfigError(f"span_p must be in (0, 1] and max_span >= 1, got {self.span_p}, {self.max_span}",
                              "span_p")


def maskable_positions(input_ids: torch.Tensor, special_ids, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, N] bool: real tokens that are not special tokens."""
    special = torch.isin(input_ids, torch.tensor(sorted(special_ids), dtype=input_ids.dtype, device=input_ids.device))
    keep = torch.ones_like(special) if attention_mask is None else attention_mask.bool()
    return keep & ~special


def regular_ids(vocab_size: int, special_ids) -> torch.Tensor:
    """The ids random replacements are drawn from: the vocabulary without its special tokens."""
    ids = torch.arange(vocab_size)
    return ids[~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=torch.long))]


def mask_tokens(input_ids: torch.Tensor, *, maskable: torch.Tensor, mask_id: int, replacement_ids: torch.Tensor,
                config: MaskingConfig = MaskingConfig(), word_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, N] -> (masked inputs [B, N], labels [B, N] with -100 where nothing is predicted).
    word_ids [B, N] (word index of each token, >= 0 on maskable tokens) is needed for word and span."""
    ids = input_ids.long()
    maskable = maskable.bool()
    if config.unit != "token" and word_ids is None:
        raise ConfigError(f"masking unit {config.unit!r} needs word_ids [B, N]", "masking")
    if config.unit == "token":
        chosen = _rand(ids.shape, generator) < config.probability  # (B, N)
        decision = _rand(ids.shape, generator)  # one 80/10/10 draw per token
    elif config.unit == "word":
        words = word_ids.long().clamp(min=0)
        w = int(words.max()) + 1 if words.numel() else 1
        chosen = (_rand((ids.shape[0], w), generator) < config.probability).gather(1, words)
        decision = _rand((ids.shape[0], w), generator).gather(1, words)  # one draw per word
    else:
        chosen, decision = _spans(maskable, word_ids.long(), config, generator)
    chosen &= maskable
    labels = ids.masked_fill(~chosen, -100)
    to_mask = chosen & (decision < config.mask_rate)
    to_random = chosen & (decision >= config.mask_rate) & (decision < config.mask_rate + config.random_rate)
    pick = torch.randint(len(replacement_ids), ids.shape, generator=generator)
    out = ids.masked_fill(to_mask, mask_id)
    out = torch.where(to_random, replacement_ids.to(ids.device)[pick.to(ids.device)], out)
    return out, labels


def _rand(shape, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def _spans(maskable: torch.Tensor, word_ids: torch.Tensor, config: MaskingConfig, generator):
    """SpanBERT's span choice per example: (chosen [B, N] bool, decision [B, N] in [0, 1))."""
    b, n = maskable.shape
    chosen = torch.zeros(b, n, dtype=torch.bool)
    decision = torch.zeros(b, n)
    log_q = math.log(1.0 - config.span_p) if config.span_p < 1.0 else -math.inf
    for i in range(b):
        m = maskable[i].cpu()
        words = torch.unique(word_ids[i].cpu()[m])  # the maskable words, in order
        if words.numel() == 0:
            continue
        budget = max(1, round(config.probability * int(m.sum())))
        token_word = torch.searchsorted(words, word_ids[i].cpu().clamp(min=0))  # (N,) index into `words`
        token_word = token_word.clamp(max=len(words) - 1)
        on_word = m & (words[token_word] == word_ids[i].cpu())
        taken = 0
        for _ in range(4 * budget + 10):  # each span takes >= 1 token; bounded even if spans overlap
            if taken >= budget:
                break
            u = float(torch.rand((), generator=generator))
            length = 1 if log_q == -math.inf else 1 + int(math.log(max(u, 1e-12)) / log_q)
            length = min(length, config.max_span)
            start = int(torch.randint(len(words), (), generator=generator))
            span = on_word & (token_word >= start) & (token_word < start + length)
            d = float(torch.rand((), generator=generator))
            taken += int((span & ~chosen[i]).sum())
            chosen[i] |= span
            decision[i][span] = d
    return chosen.to(maskable.device), decision.to(maskable.device)
