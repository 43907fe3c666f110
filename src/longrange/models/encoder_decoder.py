"""`EncoderDecoder` in the LED style: a long-attention encoder, a decoder with full causal
self-attention and dense cross-attention, word embeddings shared and tied to the LM head.

    s2s = lr.models.EncoderDecoder(ModelConfig(attention="longformer", attention_options={"window": 512},
                                               decoder_layers=2, decoder_max_length=256))
    out = s2s(src, attention_mask=keep, labels=tgt)     # decoder inputs = labels shifted right
    summary = s2s.generate(src, attention_mask=keep, max_new_tokens=64)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longrange.models.checkpoint import Pretrained
from longrange.models.common import as_keep_mask, build_stack, check_config, check_ids, init_weights
from longrange.models.config import ModelConfig
from longrange.models.embeddings import Embeddings
from longrange.models.generation import DecodingCache, check_generate_args, choose_next, finish
from longrange.models.outputs import ModelOutput


class EncoderDecoder(Pretrained, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = build_stack(config)
        self.add_decoder(config)

    def add_decoder(self, config: ModelConfig) -> None:
        """The decoder side, sharing `self.embeddings`' word table: decoder embeddings, a causal stack
        with cross-attention, the LM head (tied to the word table if asked); then every weight initialised."""
        self.decoder_embeddings = Embeddings(config, max_length=config.decoder_max_length, position_style="absolute",
                                             type_vocab_size=0, word=self.embeddings.word)
        self.decoder = build_stack(config, decoder=True, cross=True)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        init_weights(self, config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.word.weight

    @property
    def decoder_start_token_id(self) -> int:
        c = self.config
        return next(t for t in (c.decoder_start_token_id, c.bos_token_id, c.pad_token_id) if t is not None)

    def encode(self, input_ids, attention_mask=None, global_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids [B, S] -> (encoder states [B, S, C], keep [B, S] bool or None)."""
        input_ids = check_ids(input_ids)
        keep = as_keep_mask(attention_mask, input_ids.shape)
        global_mask = as_keep_mask(global_mask, input_ids.shape, "global_mask")
        h = self.embeddings(input_ids)
        h = self.encoder(h, attention_mask=keep, global_mask=global_mask,
                         checkpointing=self.config.gradient_checkpointing)
        return h, keep

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """labels [B, T] -> decoder inputs [B, T]: the start token, then labels[:, :-1] (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None, global_mask=None,
                decoder_attention_mask=None, encoder_output=None, cache: DecodingCache | None = None) -> ModelOutput:
        """input_ids [B, S] (+ attention_mask, global_mask [B, S]); decoder_input_ids [B, T] (or
        labels [B, T], shifted right to make them); cache: decoding (the encoder runs once, on the
        first call, and its states are kept in the cache); encoder_output: `encode(...)`'s result, to
        skip the encoder."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids [B, T] or labels [B, T]")
            decoder_input_ids = self.shift_right(labels)
        decoder_input_ids = check_ids(decoder_input_ids, "decoder_input_ids")
        if encoder_output is not None:
            memory, keep = encoder_output
        elif cache is not None and cache.memory is not None:
            memory, keep = cache.memory
        else:
            if input_ids is None:
                raise ValueError("pass input_ids [B, S] (the encoder input)")
            memory, keep = self.encode(input_ids, attention_mask, global_mask)
            if cache is not None:
                cache.memory = (memory, keep)
        dec_keep = as_keep_mask(decoder_attention_mask, decoder_input_ids.shape, "decoder_attention_mask")
        offset = 0 if cache is None else cache.length
        h = self.decoder_embeddings(decoder_input_ids, offset=offset)  # (B, T, C)
        h = self.decoder(h, attention_mask=dec_keep, memory=memory, memory_mask=keep,
                         caches=None if cache is None else cache.layers,
                         checkpointing=self.config.gradient_checkpointing)
        if cache is not None:
            cache.length += decoder_input_ids.shape[1]
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return ModelOutput(last_hidden_state=h, logits=logits, loss=loss, encoder_last_hidden_state=memory,
                           cache=cache)

    def new_cache(self) -> DecodingCache:
        return DecodingCache(self.decoder.new_caches())

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, global_mask=None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Encoder input [B, S] -> decoder tokens [B, 1 + new] (the start token first); greedy or sampled."""
        input_ids = check_ids(input_ids)
        check_generate_args(max_new_tokens, temperature, top_k)
        memory = self.encode(input_ids, attention_mask, global_mask)
        return self.decode(memory, input_ids, max_new_tokens, do_sample, temperature, top_k, eos_token_id, generator,
                           use_cache)

    def decode(self, memory, input_ids, max_new_tokens, do_sample, temperature, top_k, eos_token_id, generator,
               use_cache: bool = True) -> torch.Tensor:
        """The decoder's token loop over an encoded input `memory` [B, S, C] -> [B, 1 + new] tokens."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        cache = self.new_cache()
        cache.memory = memory
        tokens = torch.full_like(input_ids[:, :1], self.decoder_start_token_id)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(decoder_input_ids=tokens[:, -1:], cache=cache).logits[:, -1]
            else:
                logits = self(decoder_input_ids=tokens, encoder_output=memory).logits[:, -1]
            nxt, done = finish(choose_next(logits, do_sample, temperature, top_k, generator), done, eos,
                               self.config.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        return tokens
