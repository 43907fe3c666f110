"""`xl` / `compressive` under context parallelism equal one process (float64), over 2 and 4 gloo ranks:

- the attention alone: each rank's output rows, input gradients, the replicated memory's gradient
  and the parameter gradients (both summed over ranks), with and without memory, causal or not,
  with `span` / `clamp_len` windows shorter than a shard and longer than one;
- a memory CausalLM over two sharded calls: logits, the loss (shares summed), the next memory state
  (the same on every rank), compressive's aux_loss, and the gradients;
- the refusals: memories of different lengths on different ranks raise ShardError on every rank;
  attention dropout in training is refused by name."""

from __future__ import annotations

import time

import pytest
import torch

import longrange as lr
from longrange.distributed import ContextParallel, ShardError, Shards, global_loss, shard_model, unshard_model
from longrange.models import CausalLM, ModelConfig
from sharded_checks import shard_of, uneven_offsets
from workers import assert_on_ranks

OUT = {"atol": 1e-9, "rtol": 1e-7}
LOSS = {"atol": 1e-7, "rtol": 1e-5}  # the LM's cross-entropy runs in float32, as one process's

# (mechanism, options, memory length, compressed memory length)
ATTENTION_CASES = [
    ("xl", {}, 5, 0),
    ("xl", {}, 0, 0),
    ("xl", {"span": 3, "clamp_len": 4}, 4, 0),
    ("xl", {"causal": False}, 3, 0),
    ("xl", {"causal": False, "span": 5}, 6, 0),
    ("compressive", {"compression": "max", "compression_rate": 2, "mem_len": 4}, 4, 3),
]


def cut(n: int, world: int, rank: int, how) -> Shards:
    """how: False (even), True (uneven lengths) or "empty" (rank 0 holds no token, the others an even cut)."""
    if how == "empty":
        return Shards((0, *Shards.even(n, world - 1, 0).offsets), rank)
    return Shards(uneven_offsets(n, world) if how else Shards.even(n, world, rank).offsets, rank)


def check_attention(rank: int, world: int, name: str, options: dict, m: int, mc: int, n: int, uneven) -> None:
    torch.manual_seed(0)
    attn = lr.build_attention(name, dim=16, heads=2, **options).double()
    b = 2
    x = torch.randn(b, n, 16)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, n - 3 :] = False
    inputs = {}
    if m:
        inputs["memory"] = torch.randn(b, m, 16)
        inputs["memory_mask"] = torch.ones(b, m, dtype=torch.bool)
        inputs["memory_mask"][0, 1] = False
    if mc:
        inputs["compressed_memory"] = torch.randn(b, mc, 16)
    weight = torch.randn(b, n, 16)

    x_ref = x.clone().requires_grad_()
    ref_in = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    y_ref = attn(x_ref, keep, **ref_in)
    (y_ref * weight).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in attn.named_parameters()}
    attn.zero_grad(set_to_none=True)

    s = cut(n, world, rank, uneven)
    cp = ContextParallel()  # no fallback: the strategy must be registered
    x_s = shard_of(x, s).clone().requires_grad_()
    mine = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    y = cp(attn, x_s, shard_of(keep, s), **mine)
    where = f"{name} {options} M={m} Mc={mc} n={n} uneven={uneven} rank {rank}"
    torch.testing.assert_close(y, shard_of(y_ref, s), **OUT, msg=lambda e: f"{where} output: {e}")
    (y * shard_of(weight, s)).sum().backward()
    torch.testing.assert_close(x_s.grad, shard_of(x_ref.grad, s), **OUT, msg=lambda e: f"{where} x grad: {e}")
    for k, t in mine.items():
        if t.is_floating_point():
            share = torch.zeros_like(t) if t.grad is None else t.grad  # None: this rank's window misses it
            total = cp.comm.all_reduce(share)  # each rank's share of the replicated memory's gradient
            torch.testing.assert_close(total, ref_in[k].grad, **OUT, msg=lambda e, k=k: f"{where} {k} grad: {e}")
    cp.reduce_gradients(attn)
    for k, p in attn.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], **OUT, msg=lambda e, k=k: f"{where} grad of {k}: {e}")


def memory_lm(name: str, options: dict) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=29, dim=16, heads=2, layers=2, ffn_dim=24, max_length=32, attention=name,
                      attention_options=options, position_style="none", norm="pre", dropout=0.0, type_vocab_size=0)
    return CausalLM(cfg).double().eval()


def segments(n1: int, n2: int, b: int = 2):
    g = torch.Generator().manual_seed(3)
    ids1, ids2 = torch.randint(1, 29, (b, n1), generator=g), torch.randint(1, 29, (b, n2), generator=g)
    keep1 = torch.ones(b, n1, dtype=torch.bool)
    keep1[-1, :2] = False  # left padding in the first segment: masked slots travel into the memory
    return (ids1, keep1), (ids2, None)


def run_two_segments(model, cp, s1, s2, seg1, seg2):
    """Two calls, the second with the first's memory; returns both outputs and the gradients of the
    second's loss (+ aux_loss): sharded when cp is given (then each rank's share, summed)."""
    (ids1, keep1), (ids2, _) = seg1, seg2
    model.zero_grad(set_to_none=True)
    take = (lambda t, s: t) if cp is None else (lambda t, s: shard_of(t, s))
    out1 = model(take(ids1, s1), attention_mask=take(keep1, s1), labels=take(ids1, s1))
    out2 = model(take(ids2, s2), labels=take(ids2, s2), memory=out1.memory)
    total = out2.loss if out2.aux_loss is None else out2.loss + out2.aux_loss
    (total + out1.loss).backward()
    if cp is not None:
        cp.reduce_gradients(model)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out1, out2, grads


def same_mask(mask, like):
    return torch.ones(like.shape[:2], dtype=torch.bool) if mask is None else mask


def check_memory_lm(rank: int, world: int, name: str, options: dict, n1: int, n2: int, uneven) -> None:
    model = memory_lm(name, options)
    seg1, seg2 = segments(n1, n2)
    ref1, ref2, ref_grads = run_two_segments(model, None, None, None, seg1, seg2)
    cp = ContextParallel()
    s1, s2 = cut(n1, world, rank, uneven), cut(n2, world, rank, uneven is False)
    shard_model(model, cp)
    out1, out2, grads = run_two_segments(model, cp, s1, s2, seg1, seg2)
    unshard_model(model)
    where = f"{name} {options} n={n1},{n2} uneven={uneven} rank {rank}"
    for ref, out, s in ((ref1, out1, s1), (ref2, out2, s2)):
        torch.testing.assert_close(out.logits, shard_of(ref.logits, s), **OUT, msg=lambda e: f"{where} logits: {e}")
        torch.testing.assert_close(global_loss(cp, out.loss), ref.loss.detach(), **LOSS,
                                   msg=lambda e: f"{where} loss: {e}")
        if ref.aux_loss is not None:
            torch.testing.assert_close(global_loss(cp, out.aux_loss), ref.aux_loss.detach(), **OUT,
                                       msg=lambda e: f"{where} aux_loss: {e}")
        assert out.memory.tokens == ref.memory.tokens
        for i, (a, r) in enumerate(zip(out.memory.layers, ref.memory.layers, strict=True)):
            for part in ("mem", "cmem"):
                torch.testing.assert_close(getattr(a, part), getattr(r, part), **OUT,
                                           msg=lambda e, i=i, part=part: f"{where} layer {i} {part}: {e}")
                mask, ref_mask = getattr(a, part + "_mask"), getattr(r, part + "_mask")
                assert torch.equal(same_mask(mask, getattr(a, part)), same_mask(ref_mask, getattr(r, part))), \
                    f"{where} layer {i} {part}_mask"
    if name == "compressive":
        assert ref2.aux_loss is not None and float(ref2.aux_loss) > 0, "the test must compress something"
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], **LOSS, msg=lambda e, k=k: f"{where} grad of {k}: {e}")


def check_refusals(rank: int, world: int) -> None:
    """A memory that is not replicated (another length on rank 0) is refused on every rank."""
    cp = ContextParallel()
    attn = lr.build_attention("xl", dim=16, heads=2).double()
    x = torch.randn(1, 3, 16)
    memory = torch.randn(1, 4 + (rank == 0), 16)
    with pytest.raises(ShardError, match=r"memory must be the same on every rank .*\[5, 4"):
        cp(attn, x, memory=memory)
    bad = "memory must be" if rank == 1 else "rank 1 failed"  # one rank's malformed memory: every rank raises
    with pytest.raises((ValueError, ShardError), match=bad):
        cp(attn, x, memory=torch.randn(1, 4, 8 if rank == 1 else 16))
    dropping = lr.build_attention("xl", dim=16, heads=2, dropout=0.1).double()  # training: refused by name
    with pytest.raises(ValueError, match=r"attention dropout \(dropout=0.1\) under context parallelism"):
        cp(dropping, x, memory=torch.randn(1, 4, 16))
    dropping.eval()  # eval: no dropout, runs
    assert cp(dropping, x, memory=torch.randn(1, 4, 16)).shape == x.shape


def memory_rank(rank: int, world: int, n: int) -> None:
    torch.set_default_dtype(torch.float64)
    import longrange.distributed.memory  # noqa: F401  (registers the xl / compressive strategies)

    check_refusals(rank, world)
    for i, (name, options, m, mc) in enumerate(ATTENTION_CASES):
        check_attention(rank, world, name, options, m, mc, n + 2 * (i % 2), uneven=(False, True, "empty")[i % 3])
    check_memory_lm(rank, world, "xl", {"mem_len": 6}, n, 9, uneven=True)
    check_memory_lm(rank, world, "xl", {"mem_len": 20, "span": 4}, n, 7, uneven="empty")
    check_memory_lm(rank, world, "compressive", {"mem_len": 4, "compression_rate": 2, "cmem_len": 4,
                                                 "compression": "conv"}, n, 9, uneven=False)
    check_memory_lm(rank, world, "compressive", {"mem_len": 6, "compression_rate": 3, "cmem_len": 2,
                                                 "compression": "dilated_conv"}, n, 8, uneven=True)


@pytest.mark.parametrize("world", [2, 4])
def test_memory_attention_and_lm_match_one_process(world, tmp_path):
    start = time.monotonic()
    assert_on_ranks(memory_rank, world, tmp_path, 11, timeout_s=150)
    assert time.monotonic() - start < 150
