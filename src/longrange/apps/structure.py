"""ETC inputs for a batch: one global token per sentence (or per fixed block, for DNA), plus
optional globals every token sees — a [CLS] summary for classification, the question's tokens
for QA (ETC puts the question in the global input for its QA tasks).

    kw = etc_inputs(ids, keep, tokenizer, question_len=q_len)     # ETCEncoder keywords
    out = ETCEncoder(cfg)(ids, attention_mask=keep, **kw)

Global layout: [question tokens (Q, the longest question of the batch) ; cls (optional) ;
sentence globals]. Question and cls globals see, and are seen by, every real long token; sentence
globals are linked to their own sentence (`longrange.models.etc_structure`). Global→global is
full. Masks are O(g·n).
"""

from __future__ import annotations

import torch

from longrange.apps.tokenizers import Tokenizer
from longrange.models import etc_structure


def batch_sentence_ids(input_ids: torch.Tensor, keep: torch.Tensor, tokenizer: Tokenizer, block: int = 64):
    """[B, n] sentence index of each token (-1 on padding): ends at the tokenizer's sentence-end ids
    (and [SEP]), or fixed blocks of `block` tokens when it has none (DNA)."""
    ends = sorted(tokenizer.sentence_end_ids)
    if ends:
        end = torch.isin(input_ids, torch.tensor(ends + [tokenizer.sep_id], device=input_ids.device)) & keep
        sent = torch.cumsum(end.long(), dim=1) - end.long()
    else:
        sent = (torch.arange(input_ids.shape[1], device=input_ids.device) // block).expand_as(input_ids)
    return sent.masked_fill(~keep, -1)


def etc_inputs(input_ids: torch.Tensor, keep: torch.Tensor, tokenizer: Tokenizer, *, sentence_ids=None,
               question_len: torch.Tensor | None = None, cls: bool = False, block: int = 64) -> dict:
    """ETCEncoder keywords for a batch. sentence_ids [B, n] (None: `batch_sentence_ids`);
    question_len [B] (the first question_len tokens are copied into the global input)."""
    keep = keep.bool()
    sent = batch_sentence_ids(input_ids, keep, tokenizer, block) if sentence_ids is None else sentence_ids.long()
    st = etc_structure(sentence_ids=sent.masked_fill(~keep, -1), attention_mask=keep,
                       cls_token_id=tokenizer.cls_id if cls else None, sentence_token_id=tokenizer.sentence_id,
                       pad_token_id=tokenizer.pad_id)
    kw = st.model_inputs()
    if question_len is None:
        return kw
    q = int(question_len.max())
    pos = torch.arange(q, device=input_ids.device)
    q_keep = pos[None, :] < question_len.to(input_ids.device)[:, None]  # (B, Q)
    q_ids = input_ids[:, :q].masked_fill(~q_keep, tokenizer.pad_id)
    q_l2g = keep[:, :, None] & q_keep[:, None, :]  # (B, n, Q)
    out = {"global_ids": torch.cat([q_ids, kw["global_ids"]], 1),
           "global_type_ids": torch.cat([torch.zeros_like(q_ids), kw["global_type_ids"]], 1),
           "global_attention_mask": torch.cat([q_keep, kw["global_attention_mask"]], 1),
           "long_to_global": torch.cat([q_l2g, kw["long_to_global"]], 2)}
    out["global_to_long"] = out["long_to_global"].transpose(1, 2).contiguous()
    g2g = kw["global_to_global"]
    if g2g is not None:
        g = out["global_ids"].shape[1]
        full = torch.ones(g2g.shape[0], g, g, dtype=torch.bool, device=g2g.device)
        full[:, q:, q:] = g2g
        g2g = full
    out["global_to_global"] = g2g
    return out
