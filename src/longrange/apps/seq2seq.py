"""`ETCEncoderDecoder`: summarization with an ETC encoder (global tokens + document structure) and the
LED-style decoder of `longrange.models.EncoderDecoder` (full causal self-attention, dense
cross-attention, tied word embeddings).

The decoder cross-attends to every encoder state, global summary tokens and long tokens alike
([global ; long], padding masked). Everything decoder-side (shift_right, the decoding cache,
the loss) is EncoderDecoder's; only the encoder differs.

    model = ETCEncoderDecoder(ModelConfig(attention="etc", attention_options={"radius": 32}, decoder_layers=1, ...))
    st = etc_structure(ids, attention_mask=keep, sentence_end_ids=[dot_id])
    out = model(ids, attention_mask=keep, labels=target, **st.model_inputs())
    summary = model.generate(ids, attention_mask=keep, max_new_tokens=16, **st.model_inputs())
"""

from __future__ import annotations

import torch
from torch import nn

from longrange.models import EncoderDecoder, ETCEncoder, ModelConfig
from longrange.models.common import check_config, check_ids
from longrange.models.generation import check_generate_args
from longrange.models.outputs import ModelOutput


class ETCEncoderDecoder(EncoderDecoder):
    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)  # EncoderDecoder's own encoder is replaced by an ETCEncoder
        check_config(config)
        self.config = config
        self.etc = ETCEncoder(config.replace(head=None))
        self.embeddings = self.etc.embeddings  # the word table the decoder and the LM head share
        self.add_decoder(config)

    def encode(self, input_ids, attention_mask=None, global_mask=None, **etc_inputs):
        """input_ids [B, n] + ETCEncoder's global inputs -> (states [B, g + n, C], keep [B, g + n] or None)."""
        if global_mask is not None:
            raise ValueError("ETCEncoderDecoder takes global tokens as global_ids (etc_structure), not global_mask")
        out = self.etc(input_ids, attention_mask=attention_mask, **etc_inputs)
        h = torch.cat([out.global_last_hidden_state, out.last_hidden_state], dim=1)  # (B, g + n, C)
        b, g, n = input_ids.shape[0], out.global_last_hidden_state.shape[1], input_ids.shape[1]
        keep_g = etc_inputs.get("global_attention_mask")
        if attention_mask is None and keep_g is None:
            return h, None
        ones = torch.ones(b, g + n, dtype=torch.bool, device=h.device)
        keep = torch.cat([ones[:, :g] if keep_g is None else keep_g.bool(),
                          ones[:, g:] if attention_mask is None else attention_mask.bool()], dim=1)
        return h, keep

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None,
                decoder_attention_mask=None, encoder_output=None, cache=None, **etc_inputs) -> ModelOutput:
        """As EncoderDecoder.forward, the encoder taking ETCEncoder's global inputs (global_ids, ...)."""
        if encoder_output is None and (cache is None or cache.memory is None):
            if input_ids is None:
                raise ValueError("pass input_ids [B, n] (the encoder input)")
            encoder_output = self.encode(input_ids, attention_mask, **etc_inputs)
            if cache is not None:
                cache.memory = encoder_output
        return super().forward(decoder_input_ids=decoder_input_ids, labels=labels,
                               decoder_attention_mask=decoder_attention_mask, encoder_output=encoder_output,
                               cache=cache)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, **etc_inputs) -> torch.Tensor:
        """Encoder input [B, n] (+ global inputs) -> decoder tokens [B, 1 + new], the start token first."""
        input_ids = check_ids(input_ids)
        check_generate_args(max_new_tokens, temperature, top_k)
        memory = self.encode(input_ids, attention_mask, **etc_inputs)
        return self.decode(memory, input_ids, max_new_tokens, do_sample, temperature, top_k, eos_token_id, generator)
