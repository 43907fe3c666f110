"""`shard_model`: a tiny Encoder / CausalLM run sharded over 2 and 4 gloo ranks equals one process
(float64): hidden states and logits of each rank's rows, the loss (the ranks' shares summed) and the
parameter gradients (summed over ranks), with padding, uneven shards and an odd length.

Mechanisms without a strategy yet run with fallback="gather"; `local` uses its strategy as soon as
one is registered (`local_fallback`)."""

from __future__ import annotations

import time

import pytest
import torch

import longrange as lr
from longrange.distributed import (
    ContextParallel,
    ContextParallelUnsupported,
    Shards,
    global_loss,
    is_sharded,
    shard_model,
    unshard_model,
)
from longrange.distributed.context import strategy_for
from longrange.models import CausalLM, Encoder, ModelConfig
from sharded_checks import shard_of, uneven_offsets
from workers import assert_on_ranks

VOCAB = 37
TINY = {"vocab_size": VOCAB, "dim": 16, "heads": 2, "layers": 2, "ffn_dim": 24, "max_length": 40, "dropout": 0.0}
OUT = {"atol": 1e-9, "rtol": 1e-7}  # float64 activations: summation order only
LOSS = {"atol": 1e-7, "rtol": 1e-5}  # the models' cross-entropy runs in float32 (logits.float()), as one process's


def local_fallback() -> str | None:
    """"gather" until a `local` strategy is registered, then None (the real strategy, no fallback)."""
    import longrange.distributed  # noqa: F401  (registers the strategies that exist)

    attn = lr.build_attention("local", dim=16, heads=2, window=4)
    return None if strategy_for(attn) is not None else "gather"


# (name, model class, config changes, fallback, how each world size cuts the sequence: False even, True
# uneven, "empty" rank 0 holds nothing). longformer's global CLS never meets an empty rank 0 here: its
# strategy's backward hangs then (reported), which is no part of what shard_model does.
CASES = [
    ("longformer-cls-roberta", Encoder, {"attention": "longformer", "attention_options": {"window": 4},
                                         "head": "classification", "position_style": "padding_offset"}, "gather",
     (True, False)),
    ("local-tokens", Encoder, {"attention": "local", "attention_options": {"window": 4},
                               "head": "token_classification", "num_labels": 3}, "local", (False, "empty")),
    ("full-qa-padded", Encoder, {"attention": "full", "head": "question_answering", "pad_to_multiple_of": 4},
     "gather", ("empty", True)),
    ("linear-mean-reversible", Encoder, {"attention": "linear", "head": "classification", "pooling": "mean",
                                         "norm": "pre", "reversible": True, "type_vocab_size": 0}, "gather",
     (True, False)),
    ("memory-compressed-masked-lm", Encoder, {"attention": "memory_compressed", "head": "masked_lm", "norm": "pre",
                                              "gradient_checkpointing": True}, "gather", (False, True)),
    ("local-causal-lm", CausalLM, {"attention": "local", "attention_options": {"window": 4}}, "local",
     (True, "empty")),
    ("full-causal-lm-pre", CausalLM, {"attention": "full", "norm": "pre", "tie_word_embeddings": False}, "gather",
     (False, True)),
]


def cut(n: int, world: int, rank: int, how) -> Shards:
    """how: False (even), True (uneven lengths) or "empty" (rank 0 holds no token, the others an even cut)."""
    if how == "empty":
        return Shards((0, *Shards.even(n, world - 1, 0).offsets), rank)
    return Shards(uneven_offsets(n, world) if how else Shards.even(n, world, rank).offsets, rank)


def make_inputs(model, n: int, batch: int = 2, seed: int = 1) -> dict:
    """Whole-sequence inputs for the model's forward: padding in the last example, labels with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, n), generator=g)
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[-1, n - 3 :] = False
    ids[-1, n - 3 :] = model.config.pad_token_id
    inputs = {"input_ids": ids, "attention_mask": keep}
    cfg = model.config
    if isinstance(model, CausalLM):
        labels = ids.clone()
        labels[0, 2] = -100
        labels[-1, n - 3 :] = -100
        inputs["labels"] = labels
    elif cfg.head == "classification":
        inputs["labels"] = torch.randint(0, cfg.num_labels, (batch,), generator=g)
    elif cfg.head in ("token_classification", "masked_lm"):
        labels = torch.randint(0, cfg.num_labels if cfg.head != "masked_lm" else VOCAB, (batch, n), generator=g)
        labels[:, ::3] = -100
        inputs["labels"] = labels
    elif cfg.head == "question_answering":
        inputs["start_positions"] = torch.tensor([n - 5, 1][:batch])
        inputs["end_positions"] = torch.tensor([n - 4, -100][:batch])
    if cfg.type_vocab_size > 1 and isinstance(model, Encoder):
        inputs["token_type_ids"] = (torch.arange(n) >= n // 2).long().expand(batch, n).clone()
    return inputs


def shard_inputs(inputs: dict, shards: Shards) -> dict:
    """Per-token inputs [B, N] -> this rank's [B, n_r]; sequence-level ones ([B]) as they are."""
    return {k: shard_of(v, shards) if v.dim() == 2 else v for k, v in inputs.items()}


def build(cls, changes: dict, seed: int = 0):
    torch.manual_seed(seed)
    return cls(ModelConfig(**{**TINY, **changes})).double().eval()


def reference(model, inputs: dict):
    """One process on the whole sequence: (output, parameter gradients of the loss)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def check_model(rank: int, world: int, name: str, cls, changes: dict, fallback, n: int, uneven) -> None:
    model = build(cls, changes)
    inputs = make_inputs(model, n)
    ref, ref_grads = reference(model, inputs)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())

    shards = cut(n, world, rank, uneven)
    cp = ContextParallel(fallback=fallback)
    assert shard_model(model, cp) is model and is_sharded(model)
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys  # same objects, keys
    out = model(**shard_inputs(inputs, shards))
    where = f"{name} (n={n}, uneven={uneven}) rank {rank}"
    torch.testing.assert_close(out.last_hidden_state, shard_of(ref.last_hidden_state, shards), **OUT,
                               msg=lambda m: f"{where} hidden states: {m}")
    sequence_logits = cls is Encoder and model.config.head == "classification"
    want = ref.logits if sequence_logits else shard_of(ref.logits, shards)
    torch.testing.assert_close(out.logits, want, **OUT, msg=lambda m: f"{where} logits: {m}")
    torch.testing.assert_close(global_loss(cp, out.loss), ref.loss.detach(), **LOSS,
                               msg=lambda m: f"{where} loss (shares summed): {m}")
    out.loss.backward()
    cp.reduce_gradients(model)
    for k, p in model.named_parameters():
        if k in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[k], **LOSS, msg=lambda m, k=k: f"{where} grad of {k}: {m}")
    model.zero_grad(set_to_none=True)
    unshard_model(model)
    assert not is_sharded(model)
    torch.testing.assert_close(model(**inputs).logits, ref.logits, **OUT, msg=lambda m: f"{where} after unshard: {m}")


def check_refusals(rank: int, world: int) -> None:
    """Options with no sharded form raise ContextParallelUnsupported naming them, on every rank."""
    cp = ContextParallel(fallback="gather")
    moe = build(Encoder, {"attention": "full", "moe_experts": 2})
    with pytest.raises(ContextParallelUnsupported, match="moe_experts=2"):
        shard_model(moe, cp)
    funnel = build(Encoder, {"attention": "full", "funnel": (1, 1), "head": "classification"})
    with pytest.raises(ContextParallelUnsupported, match="funnel="):
        shard_model(funnel, cp)
    lm = shard_model(build(CausalLM, {"attention": "full"}), cp)
    with pytest.raises(ContextParallelUnsupported, match="generate"):
        lm.generate(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ContextParallelUnsupported, match="decoding caches"):
        lm(torch.ones(1, 2, dtype=torch.long), cache=lm.new_cache())
    with pytest.raises(TypeError, match="Encoder and CausalLM"):
        shard_model(torch.nn.Linear(2, 2), cp)
    bad = "labels must be" if rank == 0 else "rank 0 failed"  # one rank's bad input: every rank raises
    with pytest.raises((ValueError, lr.distributed.ShardError), match=bad):
        lm(torch.ones(1, 2, dtype=torch.long), labels=torch.ones(1, 2 + (rank == 0), dtype=torch.long))


def models_rank(rank: int, world: int, runs: list) -> None:
    torch.set_default_dtype(torch.float64)
    check_refusals(rank, world)
    local = local_fallback()
    for name, cls, changes, fallback, n, uneven in runs:
        check_model(rank, world, name, cls, changes, local if fallback == "local" else fallback, n, uneven)


def runs_for(world: int) -> list:
    """Every case once per world size, at odd lengths."""
    return [(name, cls, changes, fallback, 13 if world == 2 else 15 + 2 * (i % 2), cuts[world == 4])
            for i, (name, cls, changes, fallback, cuts) in enumerate(CASES)]


@pytest.mark.parametrize("world", [2, 4])
def test_shard_model_matches_one_process(world, tmp_path):
    start = time.monotonic()
    assert_on_ranks(models_rank, world, tmp_path, runs_for(world), timeout_s=150)
    assert time.monotonic() - start < 150
