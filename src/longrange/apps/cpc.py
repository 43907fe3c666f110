"""ETC's Contrastive Predictive Coding (CPC) objective (Ainslie et al. 2020, §3.4; van den Oord et
al. 2018): predict a masked sentence's encoding from its context, through the sentence's
global (summary) token.

In a document of sentences with one global token per sentence, a subset of sentences has every
token replaced by [MASK] (their global tokens stay). For each masked sentence i:

- the *context* c_i is the final hidden state of sentence i's global token in the masked document
  (it sees the rest of the document, never the sentence itself);
- the *target* z_i is the final hidden state of a global token that sees the unmasked sentence
  i and nothing else (the same encoder run on that sentence alone, one global token linked to it).

The loss is InfoNCE with the other masked sentences of the batch as the noise samples:

    L = -(1/M) Σ_i log [ exp(c_iᵀ W z_i) / Σ_j exp(c_iᵀ W z_j) ],   i, j = 1..M masked sentences

with W a learned [C, C] matrix (CPC's bilinear score). Gradients reach both passes. (ETC's appendix
gives its sampling details for TPU batches; this follows the text's definition, with in-batch
negatives.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CPCHead(nn.Module):
    """The bilinear score W of `cpc_loss`, initialised to the identity (a dot product at first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))

    def forward(self, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cpc_loss(context, target, self.weight)


def cpc_loss(context: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """context, target [M, C] (row i of each: masked sentence i); weight [C, C] (None: identity).
    Returns -(1/M) Σ_i log softmax_j(c_iᵀ W z_j)[i] (float32)."""
    if context.shape != target.shape or context.dim() != 2:
        raise ValueError(f"context and target must both be [M, C], got {list(context.shape)} and "
                         f"{list(target.shape)}")
    c = context.float() if weight is None else context.float() @ weight.float()  # (M, C)
    scores = c @ target.float().T  # (M, M): scores[i, j] = c_iᵀ W z_j
    return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


def choose_sentences(sentence_ids: torch.Tensor, fraction: float, generator: torch.Generator | None = None,
                     sentence_ok: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n] sentence index per token (-1 = none) -> [B, S] bool: the sentences to mask, each with
    probability `fraction`; at least one per example that has two or more sentences (two when it has
    three or more: the batch then always holds the negatives InfoNCE needs), never all of them.
    sentence_ok [B, S] (optional): sentences allowed (e.g. holding a regular token)."""
    b = sentence_ids.shape[0]
    s = int(sentence_ids.max()) + 1 if sentence_ids.numel() else 0
    present = torch.zeros(b, max(s, 1), dtype=torch.bool)
    ids = sentence_ids.cpu().long()
    rows = torch.arange(b)[:, None].expand_as(ids)
    present[rows[ids >= 0], ids[ids >= 0]] = True
    if sentence_ok is not None:
        present &= sentence_ok.cpu()[:, :present.shape[1]]
    u = torch.rand(present.shape, generator=generator)
    chosen = (u < fraction) & present
    count = present.sum(1)
    for i in range(b):
        need = min(2, int(count[i]) - 1)  # at least one, two when there are three or more sentences
        if need > int(chosen[i].sum()):
            order = torch.where(present[i])[0][torch.argsort(u[i][present[i]])]  # smallest draws first
            chosen[i, order[:need]] = True
        if count[i] >= 1 and bool((chosen[i] == present[i]).all()) and chosen[i].any():  # never all
            chosen[i, torch.where(chosen[i])[0][-1]] = False
    return chosen


def sentence_batch(input_ids: torch.Tensor, sentence_ids: torch.Tensor, chosen: torch.Tensor, pad_id: int,
                   max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """The chosen sentences alone, one per row: (ids [M, T], keep [M, T], [(example, sentence)] in
    row order). max_tokens: keep at most this many tokens of each sentence."""
    rows, which = [], []
    for b, s in zip(*torch.where(chosen), strict=True):
        toks = input_ids[b][sentence_ids[b] == s]
        rows.append(toks if max_tokens is None else toks[:max_tokens])
        which.append((int(b), int(s)))
    t = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    keep = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        keep[i, :len(r)] = True
    return ids, keep, which
