"""Funnel-Transformer downsampling for `Encoder` (Dai et al. 2020, "Funnel-Transformer", §2.2-2.3):
`ModelConfig(funnel=(4, 4, 4))` pools the sequence between blocks of layers.

    block 1 at length N -> pool -> block 2 at N / s -> pool -> block 3 at N / s² [-> decoder]

- Pooling: mean over windows of s = `funnel_stride` tokens, over their real tokens only (a window of
  padding only: the mean of its tokens); with `funnel_separate_cls` token 0 (CLS) is a window of its
  own and is never mixed. The padding mask pools with it: a window is real when it holds a real
  token (global tokens likewise).
- The first layer of each later block is the pooling step ("pool-query-only"): its queries are the
  pooled tokens, its keys and values the full-resolution ones, and its residual the pooled input.
  It runs the layer's own mechanism (any registered attention, through `project` / `attend`) at
  full length with each token's query replaced by its window's pooled query, then averages each
  window's outputs: for `full` attention every window's rows are equal, so this is exactly
  softmax(pool(Q) Kᵀ) V; for a pattern mechanism a pooled query sees its members' graphs (the mean
  of their attention); for low-rank / kernel ones it is exactly their formula for pooled queries.
  Mechanisms whose `attend` needs queries equal to keys (reformer's shared QK), extra inputs (etc)
  or the layer input itself (synthesizer) cannot be a pooling layer: a ValueError says so; give that
  layer another attention with `layer_options`. User global
  tokens (`global_mask`) are not used by the pooling step itself; the other layers get them pooled.
- Upsampling (token-level heads and head=None): the last block's output is repeated back to N
  tokens, the first block's output added (the paper's residual), then `funnel_decoder_layers`
  full-length layers of the model's attention. A classification head reads the pooled sequence
  directly (the paper drops the decoder for sequence-level tasks): `last_hidden_state` is then the
  shortest sequence, [B, N_K, C].

Costs shrink with the length: a block at N / s^k costs what a plain block costs at that length.
With stride 1 (or one block) nothing is pooled and the stack is the plain one (tested).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longrange.mechanisms import ATTENTIONS
from longrange.models.config import ModelConfig
from longrange.nn import BlockStack, FeedForward, TransformerBlock


class Pooling:
    """Mean pooling of windows of `stride` tokens (token 0 alone with separate_cls), over real tokens.

    index [N]: each token's window; size: number of windows; keep [B, size] (or None): real windows."""

    def __init__(self, n: int, stride: int, separate_cls: bool, keep: torch.Tensor | None, device):
        pos = torch.arange(n, device=device)
        self.index = torch.where(pos == 0, 0, 1 + (pos - 1) // stride) if separate_cls else pos // stride
        self.size = int(self.index[-1]) + 1 if n else 0
        self.real = keep  # [B, N] bool or None
        self.keep = None if keep is None else self.any(keep)

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, N] bool -> [B, size]: the window holds a True."""
        out = mask.new_zeros(mask.shape[0], self.size, dtype=torch.float32)
        return out.index_add(1, self.index, mask.float()) > 0

    def mean(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Window means of t along `dim` (t's batch is dim 0) over the window's real tokens; a window
        with none (padding only) takes the mean of all its tokens, so stride 1 is the identity."""
        plain = self._sum(t, dim) / self._counts(t, dim)
        if self.real is None:
            return plain
        shape = [1] * t.dim()
        shape[0], shape[dim] = t.shape[0], t.shape[dim]
        weights = self.real.to(t.dtype).view(shape)
        counts = self._sum(weights, dim)
        return torch.where(counts > 0, self._sum(t * weights, dim) / counts.clamp(min=1), plain)

    def _sum(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = self.size
        return t.new_zeros(shape).index_add(dim, self.index, t)

    def _counts(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Tokens per window, shaped to broadcast against a pooled t."""
        shape = [1] * t.dim()
        shape[dim] = self.size
        ones = torch.ones(self.index.shape[0], dtype=t.dtype, device=t.device)
        return torch.zeros(self.size, dtype=t.dtype, device=t.device).index_add(0, self.index, ones).view(shape)

    def expand(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Each token gets its window's value: [.., size, ..] -> [.., N, ..] along `dim`."""
        return t.index_select(dim, self.index)


def pooled_query_attention(attention, x: torch.Tensor, keep: torch.Tensor | None, pool: Pooling) -> torch.Tensor:
    """The pooling step's attention: queries of the pooled tokens, keys and values of all of x.
    x [B, N, C] -> [B, size, C]. Runs the mechanism at full length with each token's query replaced
    by its window's mean query (the query of the pooled token), then averages each window's outputs."""
    keep = attention.check_input(x, keep)
    q, k, v = attention.project(x)  # (B, H, N, D)
    if q is None:
        raise _not_a_pooling_layer(attention, "it has no queries")
    q = pool.expand(pool.mean(q, dim=2), dim=2)  # (B, H, N, D): pooled queries, at their members
    try:
        o = attention.attend(q, k, v, keep)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise _not_a_pooling_layer(attention, str(err) or type(err).__name__) from err
    return attention.merge(pool.mean(o, dim=2))  # (B, size, C)


def _not_a_pooling_layer(attention, why: str) -> ValueError:
    return ValueError(f"funnel: attention {attention.config.name!r} cannot be a pooling layer (queries pooled, keys "
                      f"full): {why}; give the first layer of each later block another attention with layer_options")


def pooling_block(block: TransformerBlock, x, keep, pool: Pooling) -> torch.Tensor:
    """One block whose attention is the pooling step: [B, N, C] -> [B, size, C]; the residual is the
    pooled input, the feed-forward runs on the pooled tokens (with the pooled mask)."""
    pooled = pool.mean(x, dim=1)
    if block.norm == "pre":
        x = pooled + block.dropout(pooled_query_attention(block.attention, block.attention_norm(x), keep, pool))
        return x + block.g(x, pool.keep)
    x = block.attention_norm(pooled + block.dropout(pooled_query_attention(block.attention, x, keep, pool)))
    return block.ffn_norm(x + block.dropout(block.feed_forward(x, pool.keep)))


class FunnelStack(BlockStack):
    """The Encoder's layers in `config.funnel` blocks with pooling between them, and the upsampling
    decoder (`decoder`, None for classification). `run` returns the hidden states and their mask."""

    def __init__(self, blocks: list[TransformerBlock], final_norm: nn.LayerNorm | None, config: ModelConfig,
                 decoder: list[TransformerBlock] | None = None):
        super().__init__(blocks, final_norm)
        self.sizes, self.stride, self.separate_cls = tuple(config.funnel), config.funnel_stride, \
            config.funnel_separate_cls
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.pooling_layers = frozenset(starts[1:])  # the first layer of every block but the first
        self.decoder = None if decoder is None else nn.ModuleList(decoder)

    def forward(self, x, attention_mask=None, global_mask=None, checkpointing: bool = False, **unused):
        return self.run(x, attention_mask, global_mask, checkpointing)[0]

    def run(self, x, keep=None, global_mask=None, checkpointing: bool = False):
        """x [B, N, C] -> (h, keep): h [B, N, C] with a decoder, else [B, N_K, C] (the last block's
        length); keep the mask of h's tokens (None: all real)."""
        first, pools, global_full = x, [], global_mask
        for i, block in enumerate(self.blocks):
            if i in self.pooling_layers:
                if i == min(self.pooling_layers):
                    first = x  # the first block's output: the decoder's residual
                pool = Pooling(x.shape[1], self.stride, self.separate_cls, keep, x.device)
                x = self._call(checkpointing, pooling_block, block, x, keep, pool)
                keep, pools = pool.keep, pools + [pool]
                global_mask = None if global_mask is None else pool.any(global_mask)
            else:
                x = self._call(checkpointing, block, x, attention_mask=keep, global_mask=global_mask)
        if self.decoder is not None:
            for pool in reversed(pools):
                x = pool.expand(x, dim=1)  # (B, N, C) after the last one
            x, keep = x + first, pools[0].real if pools else keep
            for block in self.decoder:
                x = self._call(checkpointing, block, x, attention_mask=keep, global_mask=global_full)
        return (x if self.final_norm is None else self.final_norm(x)), keep

    def _call(self, checkpointing: bool, fn, *args, **kwargs):
        if checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)


def build_funnel_stack(config: ModelConfig, blocks: list[TransformerBlock], final_norm) -> FunnelStack:
    """The FunnelStack over `blocks`; the decoder when the sequence is shortened (stride > 1, more
    than one block) and the head reads tokens (not classification)."""
    decoder = None
    if config.funnel_stride > 1 and len(config.funnel) > 1 and config.head != "classification":
        decoder = [decoder_block(config) for _ in range(config.funnel_decoder_layers)]
    return FunnelStack(blocks, final_norm, config, decoder)


def decoder_block(config: ModelConfig) -> TransformerBlock:
    """A full-length layer of the model's attention (`attention`, `attention_options`) and a dense FFN."""
    options = dict(config.attention_options)
    name = options.pop("attention", config.attention)
    config_cls, module_cls = ATTENTIONS.get(name)
    attention = module_cls(config_cls.from_dict({"attention": name, "dim": config.dim, "heads": config.heads,
                                                 "bias": True, **options}))
    ffn = FeedForward(config.dim, config.ffn_dim, config.activation, config.ffn_chunk_size)
    return TransformerBlock(attention, ffn, dropout=config.dropout, eps=config.layer_norm_eps, norm=config.norm)
