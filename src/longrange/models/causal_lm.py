"""`CausalLM`: a decoder-only language model on any causal attention, with bounded decoding caches.

    lm = lr.models.CausalLM(ModelConfig(attention="local", attention_options={"window": 256}))
    out = lm(ids, labels=ids)                          # next-token loss (labels shifted inside)
    new = lm.generate(prompt, max_new_tokens=50)       # greedy; do_sample=True, temperature, top_k

Decoding keeps per layer what the mechanism needs (`longrange.nn.decoding`): `full` all past
keys, causal `local` the last window // 2, linear/Performer their O(1) state.
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


class CausalLM(Pretrained, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        if config.position_style != "absolute":
            raise ValueError("CausalLM needs position_style='absolute' (positions count decoded tokens)")
        self.config = config
        self.embeddings = Embeddings(config, type_vocab_size=0)
        self.stack = build_stack(config, causal=True)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        init_weights(self, config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.word.weight

    def new_cache(self) -> DecodingCache:
        return DecodingCache(self.stack.new_caches())

    def forward(self, input_ids, attention_mask=None, labels=None, cache: DecodingCache | None = None) -> ModelOutput:
        """input_ids [B, N]; attention_mask [B, N] (True = real; not with a cache); labels [B, N]
        (usually input_ids; shifted inside, -100 = ignore); cache: from `new_cache()`, then input_ids
        are the next tokens after those already in it."""
        input_ids = check_ids(input_ids)
        keep = as_keep_mask(attention_mask, input_ids.shape)
        if cache is not None and keep is not None and not bool(keep.all()):
            raise ValueError("attention_mask with padding cannot be used with a decoding cache")
        offset = 0 if cache is None else cache.length
        h = self.embeddings(input_ids, offset=offset)  # (B, N, C)
        h = self.stack(h, attention_mask=None if cache is not None else keep,
                       caches=None if cache is None else cache.layers,
                       checkpointing=self.config.gradient_checkpointing)
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = self.lm_head(h)  # (B, N, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return ModelOutput(last_hidden_state=h, logits=logits, loss=loss, cache=cache)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Prompt [B, N] (no padding) -> [B, N + max_new_tokens]: greedy, or sampled with
        do_sample=True. After `eos_token_id` an example emits pad_token_id."""
        input_ids = check_ids(input_ids)
        check_generate_args(max_new_tokens, temperature, top_k)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        cache = self.new_cache() if use_cache else None
        tokens, step_in = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else tokens, cache=cache).logits[:, -1]  # (B, V)
            nxt, done = finish(choose_next(logits, do_sample, temperature, top_k, generator), done, eos,
                               self.config.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            step_in = nxt[:, None]
            if bool(done.all()):
                break
        return tokens
