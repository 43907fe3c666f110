"""Reversible residual layers: the same gradients as storing every activation, under DDP too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longrange.models import Encoder, ModelConfig
from longrange.nn import reversible_equations, reversible_forward
from workers import finish_worker, rendezvous, start_worker

VOCAB = 40


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=3, ffn_dim=32, max_length=64, dropout=0.0, norm="pre",
                reversible=True, attention="local", attention_options={"window": 4})
    return ModelConfig(**{**base, **changes})


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, 18), generator=gen)
    keep = torch.ones(4, 18, dtype=torch.bool)
    keep[1, 12:] = False
    return ids, keep


ATTENTIONS = {
    "local": {"attention": "local", "attention_options": {"window": 4}},
    "reformer": {"attention": "reformer", "attention_options": {"bucket_size": 4, "n_hashes": 2},
                 "ffn_chunk_size": 5},
}


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_gradients_equal_storing_activations(dropout, attention):
    """float64, train mode: the reversible blocks (recomputing each block's input from its output,
    dropout replayed; reformer with its recomputing LSH backward and a chunked FFN) against plain
    autograd over the same equations."""
    blocks = Encoder(tiny(dropout=dropout, **ATTENTIONS[attention])).double().train().stack.blocks
    x = torch.randn(2, 18, 16, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 18, dtype=torch.bool)
    keep[1, 10:] = False
    upstream = torch.randn(2, 18, 16, dtype=torch.float64)
    params = list(blocks.parameters())

    torch.manual_seed(3)
    y1, y2 = reversible_equations(blocks, x, x, {"attention_mask": keep})
    expected = (y1 + y2) / 2
    grads_expected = torch.autograd.grad(expected, [x, *params], upstream)
    torch.manual_seed(3)
    actual = reversible_forward(blocks, x, attention_mask=keep)
    grads_actual = torch.autograd.grad(actual, [x, *params], upstream)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
    for a, e in zip(grads_actual, grads_expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


def test_reversible_encoder_trains_and_keeps_no_block_activations():
    model = Encoder(tiny(head="masked_lm"))
    ids, keep = batch()
    out = model(ids, attention_mask=keep, labels=ids.masked_fill(~keep, -100))
    names, seen, stack = set(), set(), [out.loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "_ReversibleBlockBackward" in names  # one node per block, nothing of the blocks' insides
    assert "ScaledDotProductFlashAttentionForCpuBackward0" not in names and "SoftmaxBackward0" not in names


def test_reversible_eval_and_autocast():
    model = Encoder(tiny()).eval()
    ids, keep = batch()
    ref = model(ids, attention_mask=keep).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(ids, attention_mask=keep).last_hidden_state
        out.float().pow(2).mean().backward()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


# -- DDP: two CPU processes (gloo) ----------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_method: str, log_dir: str) -> None:
    torch.set_num_threads(1)
    start_worker(rank, world, init_method, log_dir)
    try:
        torch.manual_seed(0)
        model = Encoder(tiny())
        ids, keep = batch()
        reference = copy.deepcopy(model)  # one process, the whole batch
        reference(ids, attention_mask=keep).last_hidden_state.pow(2).mean().backward()
        shard = slice(rank * 2, rank * 2 + 2)
        for find_unused in (False, True):
            ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), find_unused_parameters=find_unused)
            for _ in range(2):  # a second iteration catches "marked ready twice" / reduction errors
                ddp.zero_grad()
                ddp(ids[shard], attention_mask=keep[shard]).last_hidden_state.pow(2).mean().backward()
            for (name, p), q in zip(ddp.module.named_parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()


@pytest.mark.slow
def test_reversible_under_ddp_gloo(tmp_path):
    """The assertions run in the workers; a failed one (or any error) re-raises here from `join`."""
    mp.spawn(_ddp_worker, args=(2, rendezvous(), str(tmp_path)), nprocs=2, join=True)


def test_reversible_stack_is_differentiated_once():
    """Each block hands its inputs to the block before it: a second backward through the same graph
    is a clear error, not silently wrong gradients."""
    blocks = Encoder(tiny()).train().stack.blocks
    y = reversible_forward(blocks, torch.randn(2, 18, 16, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reversible backward ran out of order"):
        y.sum().backward()
