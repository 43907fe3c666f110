"""`ETCEncoder`: ETC (Ainslie et al., EMNLP 2020): a global input beside the long input, relative
positions only, any number of `etc` attention layers, and the Encoder's task heads.

    cfg = ModelConfig(vocab_size=30522, attention="etc", attention_options={"radius": 84, "max_distance": 12},
                      head="classification", num_labels=3)
    st = etc_structure(input_ids, attention_mask=keep, sentence_end_ids=[sep_id])  # one global per sentence
    out = ETCEncoder(cfg)(input_ids, attention_mask=keep, labels=y, **st.model_inputs())
    out.last_hidden_state      # [B, n, C] long tokens;   out.global_last_hidden_state  [B, g, C]

Every layer sees x = [global ; long] with `num_global=g` and the structure masks (see
`longrange.mechanisms.etc`). Long and global tokens share the word and token-type tables (global
ids are ordinary vocabulary ids, e.g. BERT's unused ones); there is no position table, so
`max_length` does not bound the input. Heads: classification pools the global tokens when
`global_cls` is set and the input has any (`pooling="cls"`: the first global token, "mean": the
mean over real ones), else the long tokens; token classification, masked LM and QA run on the
long tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from longrange.models.checkpoint import Pretrained
from longrange.models.common import as_keep_mask, build_stack, check_config, check_ids, init_weights
from longrange.models.config import ModelConfig
from longrange.models.embeddings import Embeddings
from longrange.models.heads import build_head
from longrange.models.outputs import ModelOutput


@dataclasses.dataclass
class ETCOutput(ModelOutput):
    global_last_hidden_state: torch.Tensor | None = None  # [B, g, C]


class ETCEncoder(Pretrained, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        not_etc = [i for i in range(config.layers) if config.attention_spec(i)[0] != "etc"]
        if not_etc:
            raise ValueError(f"ETCEncoder needs attention='etc' in every layer; layers {not_etc} use "
                             f"{sorted({config.attention_spec(i)[0] for i in not_etc})}")
        if config.pad_to_multiple_of is not None:
            raise ValueError("ETCEncoder does not take pad_to_multiple_of (the engine pads its blocks itself); "
                             "set it to None")
        self.config = config
        self.embeddings = Embeddings(config, position_style="none")  # positions are relative, in the attention
        self.stack = build_stack(config)
        self.head = build_head(config, self.embeddings.word)
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, global_ids=None, global_attention_mask=None,
                global_type_ids=None, long_to_global=None, global_to_long=None, global_to_global=None, labels=None,
                start_positions=None, end_positions=None) -> ETCOutput:
        """input_ids [B, n]; attention_mask [B, n] (bool or 0/1; True = real); token_type_ids [B, n];
        global_ids [B, g] (None: no global tokens); global_attention_mask [B, g]; global_type_ids
        [B, g]; structure masks (bool, True = may attend, None = full): long_to_global [B, n, g],
        global_to_long [B, g, n], global_to_global [B, g, g] (`etc_structure` builds all of these);
        labels / start_positions / end_positions as `Encoder`."""
        input_ids = check_ids(input_ids)
        b, n = input_ids.shape
        keep_l = as_keep_mask(attention_mask, (b, n))
        if global_ids is None:
            if any(t is not None for t in (global_attention_mask, global_type_ids, long_to_global, global_to_long,
                                          global_to_global)):
                raise ValueError("global inputs were given without global_ids [B, g]")
            global_ids = input_ids.new_zeros(b, 0)
        global_ids = check_ids(global_ids, "global_ids")
        if global_ids.shape[0] != b:
            raise ValueError(f"global_ids must be [B, g] with B = {b} (input_ids' batch), got {list(global_ids.shape)}")
        g = global_ids.shape[1]
        keep_g = as_keep_mask(global_attention_mask, (b, g), "global_attention_mask")
        for name, t, shape, what in (("token_type_ids", token_type_ids, (b, n), "[B, n]"),
                                     ("global_type_ids", global_type_ids, (b, g), "[B, g]")):
            if t is not None and tuple(check_ids(t, name).shape) != shape:
                raise ValueError(f"{name} must be {what} = {list(shape)}, got {list(t.shape)}")
        h = torch.cat([self.embeddings(global_ids, global_type_ids), self.embeddings(input_ids, token_type_ids)],
                      dim=1)  # (B, g + n, C)
        keep = _joint_keep(keep_g, keep_l, b, g, n, input_ids.device)  # (B, g + n) or None
        kw = {"num_global": g, "long_to_global": long_to_global, "global_to_long": global_to_long,
              "global_to_global": global_to_global}
        h = self.stack(h, attention_mask=keep, attention_kwargs=kw, checkpointing=self.config.gradient_checkpointing)
        return self._head(h[:, g:], h[:, :g], keep_l, keep_g, labels, start_positions, end_positions)

    def _head(self, h, h_g, keep, keep_g, labels, start_positions, end_positions) -> ETCOutput:
        out = ETCOutput(last_hidden_state=h, global_last_hidden_state=h_g)
        if self.head is None:
            return out
        if self.config.head == "classification" and self.config.global_cls and h_g.shape[1]:
            out.logits = self.head(h_g, keep_g)  # the first (cls) or the mean global token
        else:
            out.logits = self.head(h, keep)
        if self.config.head == "question_answering":
            out.start_logits, out.end_logits = out.logits.unbind(-1)
            if start_positions is not None and end_positions is not None:
                out.loss = self.head.loss(out.logits, start_positions, end_positions)
        elif labels is not None:
            out.loss = self.head.loss(out.logits, labels)
        return out


def _joint_keep(keep_g, keep_l, b, g, n, device):
    """[B, g] and [B, n] keep masks (either may be None) -> [B, g + n] or None."""
    if keep_g is None and keep_l is None:
        return None
    ones = torch.ones(b, g + n, dtype=torch.bool, device=device)
    return torch.cat([ones[:, :g] if keep_g is None else keep_g, ones[:, g:] if keep_l is None else keep_l], dim=1)
