"""Whole models under context parallelism: `shard_model(model, cp)` makes an `Encoder` or a
`CausalLM` run on one sequence sharded over the ranks of `cp`.

    cp = ContextParallel(fallback="gather")            # or None: refuse mechanisms without a strategy
    shard_model(lm, cp)                                # in place; returns lm
    out = lm(ids_shard, attention_mask=keep_shard, labels=ids_shard)   # [B, n_r] on rank r
    out.loss.backward(); cp.reduce_gradients(lm); opt.step()           # = one process on the whole sequence
    unshard_model(lm)                                  # back to the single-process model

Rank r passes its tokens: input_ids, attention_mask, token_type_ids, global_mask, token labels
[B, n_r] (rank order = sequence order, any lengths, a rank may hold none). What changes, in place:

- every block's self-attention goes through `cp(attn, x, mask, **inputs)` (global_mask sharded like
  the tokens; xl / compressive memory replicated, see `longrange.distributed.memory`); the
  embeddings, feed-forwards, norms and per-token heads run locally, on this rank's tokens;
- positions are absolute: the shard starts at offset lo (learnt from the ranks' shard lengths);
  RoBERTa's "padding_offset" numbering counts the real tokens on the ranks before this one;
- the model's `forward` (and `generate`, refused) become instance attributes; blocks get an
  instance `_attend`. No parameter, buffer or module is replaced: the parameters stay the same
  objects, state_dict keys and checkpoints are unchanged (`save_pretrained` works as before).

Outputs: last_hidden_state and per-token logits are this rank's rows [B, n_r, ...]. The
classification head's pooled vector (token 0, owned by the rank holding position 0, or the mean
over all real tokens) is all-reduced, so EVERY rank gets the same logits [B, num_labels].

Losses (`out.loss`, and a memory model's `out.aux_loss`) are this rank's SHARE: the shares summed
over the ranks equal one process's loss, so `backward` on every rank then `cp.reduce_gradients`
(a sum) gives one process's gradients. Causal LM: share = (summed cross-entropy of this rank's
next-token targets) / (targets in the whole batch); the label shift crosses shards: the last token
of rank r is scored against the first label of the next rank holding tokens (exchanged as ints).
Token classification / masked LM: the same without a shift. Sequence classification and question
answering (a softmax over all positions, by all-reduced log-sum-exp): the loss is replicated,
each rank's share is 1 / P of it. `global_loss(cp, out.loss)` is the whole loss, for logging.

Refused (`ContextParallelUnsupported`, naming the option): `funnel` (pools tokens across shard
boundaries), `moe_experts` (the expert capacity and the balancing loss are per call),
decoding caches and `generate`, and other model classes. `pad_to_multiple_of` is exact: the last
rank appends the padding one process would append.
"""

from __future__ import annotations

import types

import torch

from longrange.distributed.comm import ShardError
from longrange.distributed.context import ContextParallel, ContextParallelUnsupported
from longrange.distributed.memory import sharded_memory_forward
from longrange.distributed.shards import Shards
from longrange.distributed.tokens import embed, lm_loss_share, token_loss_share
from longrange.models.causal_lm import CausalLM
from longrange.models.common import as_keep_mask, check_ids, pad_right
from longrange.models.embeddings import check_token_ids
from longrange.models.encoder import Encoder
from longrange.models.outputs import ModelOutput

#: the attribute naming the ContextParallel a sharded model (and each of its blocks) runs under
ATTRIBUTE = "_context_parallel"


# -- sharding a model ------------------------------------------------------------------------------------
def shard_model(model, cp: ContextParallel):
    """Make `model` (an lr.models Encoder or CausalLM) run sharded under `cp`, in place; returns it.
    Sharding an already sharded model replaces its cp. Undo with `unshard_model`."""
    if not isinstance(cp, ContextParallel):
        raise TypeError(f"cp must be a longrange.distributed.ContextParallel, got {type(cp).__name__}")
    forward = sharded_forward_of(model)
    why = unsupported_model_reason(model)
    if why is not None:
        raise ContextParallelUnsupported(why)
    unshard_model(model)
    for block in model.stack.blocks:
        vars(block)[ATTRIBUTE] = cp
        vars(block)["_attend"] = types.MethodType(sharded_attend, block)
    vars(model)[ATTRIBUTE] = cp
    vars(model)["forward"] = types.MethodType(forward, model)
    if isinstance(model, CausalLM):
        vars(model)["generate"] = types.MethodType(refuse_generate, model)
    return model


def unshard_model(model):
    """Undo `shard_model` (a no-op on a model that is not sharded); returns the model."""
    if not is_sharded(model):
        return model
    for block in model.stack.blocks:
        for name in (ATTRIBUTE, "_attend"):
            vars(block).pop(name, None)
    for name in (ATTRIBUTE, "forward", "generate"):
        vars(model).pop(name, None)
    return model


def is_sharded(model) -> bool:
    return ATTRIBUTE in vars(model)


def sharded_forward_of(model):
    if isinstance(model, Encoder):
        return encoder_forward
    if isinstance(model, CausalLM):
        return causal_lm_forward
    raise TypeError(f"shard_model supports lr.models.Encoder and CausalLM, got {type(model).__name__}")


def unsupported_model_reason(model) -> str | None:
    """Why this model's options cannot run sharded (None: they can)."""
    config = model.config
    if getattr(config, "funnel", None) is not None and isinstance(model, Encoder):
        return (f"funnel={list(config.funnel)} pools neighbouring tokens between blocks: pools would straddle "
                "shard boundaries and the pooled lengths change per rank; use funnel=None under context parallelism")
    if config.moe_experts is not None:
        return (f"moe_experts={config.moe_experts}: a Switch layer's expert capacity (⌈factor · tokens / experts⌉) "
                "and its balancing loss are computed over the tokens of one call, so each shard would route with its "
                "own capacity; use moe_experts=None under context parallelism")
    return None


def sharded_attend(self, x, attention_mask, global_mask, cache, attention_kwargs=None):
    """`TransformerBlock._attend` of a sharded block: the self-attention through the block's cp."""
    if cache is not None:
        raise ContextParallelUnsupported("decoding caches are not sharded (each rank would decode its own shard); "
                                         "decode with the unsharded model (unshard_model)")
    kw = dict(attention_kwargs or {})
    if global_mask is not None and "global_mask" in self.attention.capabilities.inputs:
        kw["global_mask"] = global_mask
    return vars(self)[ATTRIBUTE](self.attention, x, attention_mask, **kw)


def refuse_generate(self, *args, **kwargs):
    raise ContextParallelUnsupported("generate is not sharded under context parallelism (decoding appends tokens "
                                     "one at a time); call unshard_model(model) and generate on one process")


# -- agreeing on the call ----------------------------------------------------------------------------------
def agree_inputs(cp: ContextParallel, n: int, b: int, *optional) -> tuple[Shards, list[bool]]:
    """The cut of the sequence from every rank's shard length (one gather of ints), and per optional
    input whether ANY rank passed it (a rank without it then materialises the default, so every
    rank takes the same collective path)."""
    got = cp.comm.gather_ints([n, b, *(int(t is not None) for t in optional)])
    if len({g[1] for g in got}) > 1:
        raise ShardError(f"ranks hold shards of different batch sizes: [B per rank] = {[g[1] for g in got]}")
    offsets = [0]
    for g in got:
        offsets.append(offsets[-1] + g[0])
    return Shards(tuple(offsets), cp.rank), [any(g[2 + i] for g in got) for i in range(len(optional))]


def check_labels(labels, shape, name: str = "labels") -> None:
    if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(shape)):
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be this rank's [B, n_r] = {list(shape)} (sharded like input_ids), got {got}")


# -- embeddings ------------------------------------------------------------------------------------------
def sequence_ce(cp: ContextParallel, s: Shards, logits, targets) -> torch.Tensor:
    """Cross-entropy of a softmax over ALL positions (QA's start / end): logits [B, n_r], targets [B]
    global positions (-100 = ignore) -> the mean over examples, the same on every rank. Communicates
    a max, the sums of exponentials and the target logits ([B] each)."""
    logits = logits.float()
    b, n = logits.shape
    local_max = logits.amax(dim=1) if n else logits.new_full((b,), float("-inf"))
    shift = cp.comm.max_all(local_max)  # (B,), constant
    lse = shift + cp.comm.all_reduce((logits - shift[:, None]).exp().sum(dim=1), "qa:sumexp").log()
    hit = torch.arange(s.lo, s.hi, device=logits.device)[None, :] == targets[:, None]  # (B, n_r)
    picked = cp.comm.all_reduce(torch.where(hit, logits, 0.0).sum(dim=1), "qa:target")  # (B,); masked: -inf
    valid = targets != -100
    return (lse - picked)[valid].mean()


# -- heads -----------------------------------------------------------------------------------------------
def sharded_pool(cp: ContextParallel, s: Shards, h, keep, how: str) -> torch.Tensor:
    """`heads.pool` over the whole sequence: h [B, n_r, C] -> [B, C] on every rank (all-reduced)."""
    if how == "cls":  # position 0 lives on the first rank holding tokens (lo == 0, n_r > 0)
        owner = float(s.lo == 0 and s.length > 0)
        return cp.comm.all_reduce(h[:, :1].sum(dim=1) * owner, "pool:cls")
    w = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device) if keep is None else keep.to(h.dtype)
    total = cp.comm.all_reduce((h * w[:, :, None]).sum(dim=1), "pool:mean")  # (B, C)
    count = cp.comm.all_reduce(w.sum(dim=1, keepdim=True), "pool:count")  # (B, 1)
    return total / count.clamp(min=1.0)


def encoder_head(model, cp: ContextParallel, s: Shards, h, keep, labels, start_positions,
                 end_positions) -> ModelOutput:
    """`Encoder._head` on a shard; see the module docstring for what each rank gets."""
    head, kind = model.head, model.config.head
    if head is None:
        return ModelOutput(last_hidden_state=h)
    if kind == "classification":
        pooled = sharded_pool(cp, s, h, keep, head.pooling)  # (B, C), the same on every rank
        logits = head(pooled[:, None], None)  # the head's own pool of one token is that token
        loss = None if labels is None else head.loss(logits, labels) / s.world
        return ModelOutput(last_hidden_state=h, logits=logits, loss=loss)
    logits = head(h, keep)  # per token: (B, n_r, num_labels / V / 2)
    if kind == "question_answering":
        start, end = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (sequence_ce(cp, s, start, start_positions) + sequence_ce(cp, s, end, end_positions)) / 2 / s.world
        return ModelOutput(last_hidden_state=h, logits=logits, loss=loss, start_logits=start, end_logits=end)
    return ModelOutput(last_hidden_state=h, logits=logits, loss=token_loss_share(cp, logits, labels))


# -- the sharded forwards ----------------------------------------------------------------------------------
def encoder_forward(self, input_ids, attention_mask=None, token_type_ids=None, global_mask=None, labels=None,
                    start_positions=None, end_positions=None) -> ModelOutput:
    """`Encoder.forward` on this rank's shard: input_ids, attention_mask, token_type_ids, global_mask
    and token-level labels [B, n_r]; sequence labels [B] and QA positions [B] (global) the same on
    every rank."""
    cp, cfg = vars(self)[ATTRIBUTE], self.config
    with cp.comm.guard():
        input_ids = check_ids(input_ids)
        b, n = input_ids.shape
        keep = as_keep_mask(attention_mask, (b, n))
        global_mask = as_keep_mask(global_mask, (b, n), "global_mask")
        check_token_ids(input_ids, self.embeddings.word.num_embeddings)
        check_labels(token_type_ids, (b, n), "token_type_ids")
        if cfg.head in ("token_classification", "masked_lm"):
            check_labels(labels, (b, n))
    s, (any_keep, any_global) = agree_inputs(cp, n, b, keep, global_mask)
    if global_mask is None and not any_global and cfg.head == "classification" and cfg.global_cls \
            and self.supports_global_mask:
        any_global = True  # token 0 global, as one process (HF's LongformerForSequenceClassification)
        global_mask = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
        global_mask[:, : int(s.lo == 0)] = True
    extra = (-s.total) % cfg.pad_to_multiple_of if cfg.pad_to_multiple_of else 0
    if extra or any_keep:
        keep = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if keep is None else keep
    if any_global and global_mask is None:
        global_mask = torch.zeros(b, n, dtype=torch.bool, device=input_ids.device)
    if extra:  # one process pads the whole sequence at its end: the last rank appends the same
        s = pad_last_shard(s, extra)
        if s.rank == s.world - 1:
            keep, input_ids = pad_right(keep, extra, False), pad_right(input_ids, extra, cfg.pad_token_id)
            token_type_ids, global_mask = pad_right(token_type_ids, extra, 0), pad_right(global_mask, extra, False)
    h = embed(self.embeddings, cp, s, input_ids, token_type_ids)  # (B, n_r', C)
    h = self.stack(h, attention_mask=keep, global_mask=global_mask, checkpointing=cfg.gradient_checkpointing)
    h, keep = h[:, :n], None if keep is None else keep[:, :n]
    if extra:
        s = Shards(s.offsets[:-1] + (s.offsets[-1] - extra,), s.rank)
    return encoder_head(self, cp, s, h, keep, labels, start_positions, end_positions)


def pad_last_shard(s: Shards, extra: int) -> Shards:
    return Shards(s.offsets[:-1] + (s.offsets[-1] + extra,), s.rank)


def causal_lm_forward(self, input_ids, attention_mask=None, labels=None, cache=None, *, memory=None,
                      mem_len=None) -> ModelOutput:
    """`CausalLM.forward` on this rank's shard: input_ids, attention_mask, labels [B, n_r] (labels
    unshifted, as one process's: the shift crosses shards). Memory models: memory is the state the
    previous sharded call returned (the same on every rank), and so is out.memory."""
    cp = vars(self)[ATTRIBUTE]
    if cache is not None:
        raise ContextParallelUnsupported("decoding caches are not sharded under context parallelism; decode with "
                                         "the unsharded model (unshard_model)")
    with cp.comm.guard():
        input_ids = check_ids(input_ids)
        b, n = input_ids.shape
        keep = as_keep_mask(attention_mask, (b, n))
        check_token_ids(input_ids, self.embeddings.word.num_embeddings)
        check_labels(labels, (b, n))
        if not self.uses_memory and (memory is not None or mem_len is not None):
            raise ValueError(self._no_memory_message())
    s, (any_keep,) = agree_inputs(cp, n, b, keep)
    if any_keep and keep is None:
        keep = torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
    if self.uses_memory:
        return sharded_memory_forward(self, cp, s, input_ids, keep, labels, memory, mem_len)
    h = embed(self.embeddings, cp, s, input_ids)  # (B, n_r, C)
    h = self.stack(h, attention_mask=keep, checkpointing=self.config.gradient_checkpointing)
    logits = self.lm_head(h)  # (B, n_r, V)
    return ModelOutput(last_hidden_state=h, logits=logits, loss=lm_loss_share(cp, s, logits, labels))
