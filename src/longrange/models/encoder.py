"""`Encoder`: embeddings -> N blocks of any attention -> optional task head.

    enc = lr.models.Encoder(ModelConfig(attention="bigbird", attention_options={"block_size": 64},
                                        head="classification", num_labels=3))
    out = enc(input_ids, attention_mask=mask, labels=y)   # out.last_hidden_state, out.logits, out.loss

Encoder-only options: `funnel=(4, 4, 4)` pools the sequence between blocks of layers
(`longrange.models.funnel`); `moe_experts=E` makes every `moe_every`-th feed-forward a Switch mixture
of experts (`longrange.nn.moe`), whose load-balancing loss comes back as `out.aux_loss` (already
weighted by `moe_aux_weight`: train on `out.loss + out.aux_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

from longrange.models.checkpoint import Pretrained
from longrange.models.common import (
    as_keep_mask,
    build_stack,
    check_config,
    check_ids,
    init_weights,
    moe_aux_loss,
    pad_right,
)
from longrange.models.config import ModelConfig
from longrange.models.embeddings import Embeddings
from longrange.models.heads import build_head
from longrange.models.outputs import ModelOutput


class Encoder(Pretrained, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.embeddings = Embeddings(config)
        self.stack = build_stack(config, encoder=True)
        self.head = build_head(config, self.embeddings.word)
        init_weights(self, config.initializer_range)

    @property
    def supports_global_mask(self) -> bool:
        return any("global_mask" in b.attention.capabilities.inputs for b in self.stack.blocks)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, global_mask=None, labels=None,
                start_positions=None, end_positions=None) -> ModelOutput:
        """input_ids [B, N]; attention_mask [B, N] (bool or 0/1; True = real token); token_type_ids
        [B, N]; global_mask [B, N] bool (global tokens, for attentions that have them); labels:
        classification [B], token classification / masked LM [B, N] (-100 = ignore); QA:
        start_positions, end_positions [B]."""
        input_ids = check_ids(input_ids)
        b, n = input_ids.shape
        keep = as_keep_mask(attention_mask, (b, n))
        global_mask = as_keep_mask(global_mask, (b, n), "global_mask")
        if global_mask is None and self.config.head == "classification" and self.config.global_cls \
                and self.supports_global_mask:
            global_mask = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
            global_mask[:, 0] = True  # as HF's LongformerForSequenceClassification
        extra = (-n) % self.config.pad_to_multiple_of if self.config.pad_to_multiple_of else 0
        if extra:  # e.g. HF BigBird's padding to its block size: masked tokens, removed below
            keep = pad_right(torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if keep is None else keep,
                             extra, False)
            input_ids = pad_right(input_ids, extra, self.config.pad_token_id)
            token_type_ids, global_mask = pad_right(token_type_ids, extra, 0), pad_right(global_mask, extra, False)
        h = self.embeddings(input_ids, token_type_ids)  # (B, N', C)
        if self.config.funnel is not None:  # classification: h and keep are the pooled sequence's
            h, keep = self.stack.run(h, keep, global_mask, checkpointing=self.config.gradient_checkpointing)
        else:
            h = self.stack(h, attention_mask=keep, global_mask=global_mask,
                           checkpointing=self.config.gradient_checkpointing)
        h, keep = h[:, :n], None if keep is None else keep[:, :n]
        out = self._head(h, keep, labels, start_positions, end_positions)
        out.aux_loss = moe_aux_loss(self, self.config.moe_aux_weight)
        return out

    def _head(self, h, keep, labels, start_positions, end_positions) -> ModelOutput:
        if self.head is None:
            return ModelOutput(last_hidden_state=h)
        logits = self.head(h, keep)
        if self.config.head == "question_answering":
            loss = None
            if start_positions is not None and end_positions is not None:
                loss = self.head.loss(logits, start_positions, end_positions)
            start, end = logits.unbind(-1)
            return ModelOutput(last_hidden_state=h, logits=logits, loss=loss, start_logits=start, end_logits=end)
        loss = None if labels is None else self.head.loss(logits, labels)
        return ModelOutput(last_hidden_state=h, logits=logits, loss=loss)
