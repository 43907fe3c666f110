"""`CausalLM`: a decoder-only language model on any causal attention, with bounded decoding caches.

    lm = lr.models.CausalLM(ModelConfig(attention="local", attention_options={"window": 256}))
    out = lm(ids, labels=ids)                          # next-token loss (labels shifted inside)
    new = lm.generate(prompt, max_new_tokens=50)       # greedy; do_sample=True, temperature, top_k

Decoding keeps per layer what the mechanism's pattern can still reach (`longrange.nn.decoding`):
`full` all past keys, causal `local` the last window // 2 and its sink_tokens first ones (constant
memory), `sparse_transformer` fixed its chunk and summary columns, linear/Performer their O(1) state.

Segment-level recurrence (Transformer-XL, Compressive Transformer): with `xl` / `compressive`
attention and position_style="none" the model carries an explicit memory (`longrange.models.memory`):

    lm = lr.models.CausalLM(ModelConfig(attention="xl", attention_options={"mem_len": 256},
                                        position_style="none", max_length=128))
    out = lm(segment, memory=state)        # state None: empty; out.memory: the next state (detached)
    loss = out.loss + out.aux_loss         # compressive: the attention-reconstruction loss
    lm.generate(prompt, max_new_tokens=50) # the memory is the cache: each new token sees mem_len past

max_length is then the longest segment; streams of any length go segment by segment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longrange.models.checkpoint import Pretrained
from longrange.models.common import as_keep_mask, build_stack, check_config, check_ids, init_weights
from longrange.models.config import ModelConfig
from longrange.models.embeddings import Embeddings
from longrange.models.generation import DecodingCache, check_generate_args, check_prompt, choose_next, finish
from longrange.models.memory import MemoryState, attention_inputs, memory_lengths, update_layer
from longrange.models.outputs import ModelOutput

POSITION_STYLES = ("absolute", "none")


class CausalLM(Pretrained, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_config(config)
        if config.position_style not in POSITION_STYLES:
            raise ValueError(f"CausalLM needs position_style 'absolute' (learned positions counting decoded tokens) "
                             f"or 'none' (no position embeddings: xl / compressive bring relative positions), got "
                             f"{config.position_style!r}")
        self.config = config
        absolute = config.position_style == "absolute"
        self.embeddings = Embeddings(config, type_vocab_size=0)
        self.stack = build_stack(config, causal=True)
        recurrent = ["memory" in b.attention.capabilities.inputs for b in self.stack.blocks]
        if not absolute and any(recurrent) and not all(recurrent):
            raise ValueError("a memory CausalLM needs xl / compressive attention in every layer (layer_options "
                             "mix them with other attentions)")
        if not absolute and all(recurrent) and config.reversible:
            raise ValueError("reversible=True is not supported with segment memory (xl / compressive)")
        #: segment-level recurrence: forward takes and returns `memory`
        self.uses_memory = not absolute and all(recurrent)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        init_weights(self, config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.word.weight

    def new_cache(self) -> DecodingCache:
        return DecodingCache(self.stack.new_caches())

    def new_memory(self, batch_size: int = 1, *, mem_len: int | None = None,
                   cmem_len: int | None = None) -> MemoryState:
        """An empty memory (xl / compressive models); mem_len / cmem_len override the configured lengths."""
        if not self.uses_memory:
            raise ValueError(self._no_memory_message())
        p = self.lm_head.weight
        return MemoryState.empty(len(self.stack.blocks), batch_size, self.config.dim, device=p.device, dtype=p.dtype,
                                 mem_len=mem_len, cmem_len=cmem_len)

    def _no_memory_message(self) -> str:
        return (f"memory needs xl / compressive attention and position_style='none'; this model has "
                f"attention={self.config.attention!r}, position_style={self.config.position_style!r}")

    def forward(self, input_ids, attention_mask=None, labels=None, cache: DecodingCache | None = None, *,
                memory: MemoryState | None = None, mem_len: int | None = None) -> ModelOutput:
        """input_ids [B, N]; attention_mask [B, N] (True = real; not with a cache); labels [B, N]
        (usually input_ids; shifted inside, -100 = ignore); cache: from `new_cache()`, then input_ids
        are the next tokens after those already in it.

        Memory models (`uses_memory`): memory = the state a previous call returned (None: empty),
        mem_len overrides the memory length kept for the next state; the output carries `.memory`
        and, for compressive attention, `.aux_loss`."""
        input_ids = check_ids(input_ids)
        keep = as_keep_mask(attention_mask, input_ids.shape)
        if self.uses_memory:
            if cache is not None:
                raise ValueError("a memory model decodes with memory=, not cache= (its memory is the cache)")
            return self._forward_with_memory(input_ids, keep, labels, memory, mem_len)
        if memory is not None or mem_len is not None:
            raise ValueError(self._no_memory_message())
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
        return ModelOutput(last_hidden_state=h, logits=logits, loss=self._loss(logits, labels), cache=cache)

    @staticmethod
    def _loss(logits, labels):
        if labels is None:
            return None
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    def _forward_with_memory(self, input_ids, keep, labels, memory, mem_len) -> ModelOutput:
        """Iterate the blocks: each attends over [its memory ; the segment]; its new memory comes from
        its INPUT hidden states (see `longrange.models.memory.update_layer`)."""
        b, n = input_ids.shape
        if n > self.config.max_length:
            raise ValueError(f"input_ids has {n} tokens, more than max_length={self.config.max_length} (the longest "
                             "segment); feed longer text segment by segment with memory (lr.models.stream_perplexity)")
        state = self.checked_memory(b, memory)
        h, logits, new_state, aux_loss = self.memory_blocks(self.embeddings(input_ids), keep, state, mem_len, n)
        return ModelOutput(last_hidden_state=h, logits=logits, loss=self._loss(logits, labels), memory=new_state,
                           aux_loss=aux_loss)

    def checked_memory(self, batch: int, memory) -> MemoryState:
        """`memory`, or a new empty one, checked against this model and the batch."""
        state = self.new_memory(batch) if memory is None else memory
        if not isinstance(state, MemoryState):
            raise TypeError(f"memory must be a MemoryState (out.memory or lm.new_memory()), got {type(state).__name__}")
        state.check(len(self.stack.blocks), batch, self.config.dim)
        return state

    def memory_blocks(self, h, keep, state: MemoryState, mem_len, tokens: int, update=update_layer):
        """The blocks over embedded tokens h [B, n, C] with `state`'s memory -> (h, logits, the next
        MemoryState after `tokens` more tokens, aux_loss). `update(attention, layer, h_in, keep, mem_len,
        cmem_len, frozen)` makes each layer's next memory (a sharded model passes its own)."""
        layers, aux = [], []
        for block, layer in zip(self.stack.blocks, state.layers, strict=True):
            live, frozen = _attention_views(block)
            kw = attention_inputs(layer, live, hasattr(block.attention, "compress"))
            h_in = h
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False, attention_mask=keep, attention_kwargs=kw)
            else:
                h = block(h, attention_mask=keep, attention_kwargs=kw)
            lengths = memory_lengths(block.attention, state, mem_len)
            new, loss = update(block.attention, layer, h_in, keep, *lengths, frozen)
            layers.append(new)
            if loss is not None:
                aux.append(loss)
        if self.stack.final_norm is not None:
            h = self.stack.final_norm(h)
        logits = self.lm_head(h)  # (B, n, V)
        new_state = MemoryState(layers, mem_len=state.mem_len, cmem_len=state.cmem_len, tokens=state.tokens + tokens)
        aux_loss = torch.stack(aux).sum() if aux else None
        if aux_loss is None and any(hasattr(blk.attention, "compress") for blk in self.stack.blocks):
            aux_loss = logits.new_zeros(())  # compressive, nothing compressed yet
        return h, logits, new_state, aux_loss

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, *, cache: DecodingCache | None = None,
                 streamer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Prompt [B, N] (no padding) -> [B, N + max_new_tokens]: greedy, or sampled with
        do_sample=True. After `eos_token_id` an example emits pad_token_id.

        cache: an empty `new_cache()` to decode into (inspect it afterwards: `cache.nbytes()`); the
        cache follows the pattern (a window with sinks: constant memory, see `longrange.nn.decoding`).
        streamer(tokens [B]) is called with each step's new tokens."""
        input_ids = check_ids(input_ids)
        check_prompt(input_ids)
        check_generate_args(max_new_tokens, temperature, top_k)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        if self.uses_memory:
            return self._generate_with_memory(input_ids, max_new_tokens, do_sample, temperature, top_k, eos,
                                              generator, use_cache)
        if cache is not None and (not use_cache or cache.length):
            raise ValueError("cache= must be an empty new_cache() and needs use_cache=True")
        cache = (cache or self.new_cache()) if use_cache else None
        tokens, step_in = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_in if use_cache else tokens, cache=cache).logits[:, -1]  # (B, V)
            nxt, done = finish(choose_next(logits, do_sample, temperature, top_k, generator), done, eos,
                               self.config.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            step_in = nxt[:, None]
            if streamer is not None:
                streamer(nxt)
            if bool(done.all()):
                break
        return tokens

    def _generate_with_memory(self, input_ids, max_new_tokens, do_sample, temperature, top_k, eos, generator,
                              use_cache):
        """Memory models. use_cache=True: the memory is the cache, the prompt goes in segments of
        max_length, then one token per step (each sees its layer's last mem_len positions: XL's
        evaluation regime, O(mem_len) per token). use_cache=False: every step re-runs all tokens as
        one segment without memory (they must fit max_length)."""
        out, tokens = None, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        step = self.config.max_length
        if use_cache:
            for start in range(0, input_ids.shape[1], step):
                out = self(input_ids[:, start : start + step], memory=None if out is None else out.memory)
        for i in range(max_new_tokens):
            if not use_cache:
                out = self(tokens)
            elif i > 0:
                out = self(tokens[:, -1:], memory=out.memory)
            nxt, done = finish(choose_next(out.logits[:, -1], do_sample, temperature, top_k, generator), done, eos,
                               self.config.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        return tokens


def _attention_views(block):
    """What the block's attention applies to its input, twice: live (pre-norm: the block's LayerNorm)
    for the memory it attends to, and with detached parameters for the reconstruction loss."""
    if block.norm != "pre":
        return (lambda t: t), (lambda t: t)
    ln = block.attention_norm

    def frozen(t):
        return F.layer_norm(t, ln.normalized_shape, ln.weight.detach(), ln.bias.detach(), ln.eps)

    return ln, frozen
