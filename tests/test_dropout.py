"""Attention-probability dropout (core/dropout.py and the engine's `dropout_p`): the engine drops
exactly the pairs `dropout_keep` drops (outputs and gradients against a dense reference given the
same mask, float64), E[output] is unchanged, seeds reproduce and differ, p = 0 is no dropout."""

from __future__ import annotations

import math

import pytest
import torch

import longrange as lr
from conftest import assert_close, lengths_mask
from longrange.core.dropout import DropoutIndex, dropout_keep, dropout_scale
from longrange.patterns import BlockWindow, Global, RandomBlocks, Window, global_blocks
from longrange.sparse import block_sparse_attention


def pair_mask(seed, b, h, n, m, p, extra_index=None):
    """[b, h, n, m] keep mask from the public function; keys n.. are the extra keys (position n + e)."""
    j = torch.arange(m) if extra_index is None else extra_index
    return dropout_keep(seed, torch.arange(b).view(-1, 1, 1, 1), torch.arange(h).view(1, -1, 1, 1),
                        torch.arange(n).view(1, 1, -1, 1), j.view(1, 1, 1, -1), p)


def dense_dropout_reference(q, k, v, mask, keep, p):
    """softmax(q kᵀ/√D, masked) ∘ keep / (1 - p) @ v; rows with no key give zeros."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)
    return (probs * keep * dropout_scale(p)) @ v


def inputs(b, h, n, d, g=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, m, d, generator=gen, dtype=torch.float64).requires_grad_()
            for m in (n, n, n, g, g)][: 5 if g else 3]


# -- the hash ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_and_neighbours_are_uncorrelated(p):
    keep = pair_mask(11, 2, 3, 128, 128, p).double()
    count = keep.numel()
    sd = math.sqrt(p * (1 - p) / count)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    for a, c in ((keep[..., 1:], keep[..., :-1]), (keep[:, :, 1:], keep[:, :, :-1]), (keep[:, 1:], keep[:, :-1]),
                 (keep[1:], keep[:-1]), (keep[..., 1:, 1:], keep[..., :-1, :-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel()), corr  # neighbours in j, i, h, b and the diagonal


def test_keep_is_a_pure_function_of_the_coordinates():
    full = pair_mask(5, 2, 2, 20, 20, 0.3)
    sub = dropout_keep(5, torch.tensor(1), torch.tensor(0), torch.arange(7, 12)[:, None], torch.arange(3, 9), 0.3)
    assert torch.equal(sub, full[1, 0, 7:12, 3:9])
    assert torch.equal(pair_mask(5, 2, 2, 20, 20, 0.3), full)
    assert not torch.equal(pair_mask(6, 2, 2, 20, 20, 0.3), full)
    assert pair_mask(5, 1, 1, 4, 4, 0.0).all() and not pair_mask(5, 1, 1, 4, 4, 1.0).any()


# -- the engine against the dense reference with the same mask ---------------------------------------------
@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize(
    ("pattern", "n", "tile", "heads"),
    [(Window(2), 13, 4, 2), (Window(1, causal=True) | Global([0, 7]), 17, 3, 1),
     (BlockWindow(1, 4) | global_blocks(4) | RandomBlocks(1, 4, num_heads=2, seed=1), 24, 4, 2)],
    ids=["window", "causal_global_dense_rows", "bigbird_like"],
)
def test_engine_drops_what_the_dense_reference_drops(pattern, n, tile, heads, extra):
    b, d, g, p, seed = 2, 4, 3 if extra else 0, 0.3, 1234
    ts = inputs(b, heads, n, d, g, seed=n)
    keep = lengths_mask([n, n - 5], n)
    layout = lr.compile_layout(pattern, n, tile)
    mask = pattern.to_dense(n)
    mask = (mask if mask.dim() == 3 else mask[None])[None] & keep[:, None, None, :]
    kw = {}
    kk, vv = ts[1], ts[2]
    if extra:
        keep_e = torch.rand(b, n, g, generator=torch.Generator().manual_seed(2)) > 0.3
        kw["extra_kv"] = (ts[3], ts[4], keep_e)
        kk, vv = torch.cat([ts[1], ts[3]], 2), torch.cat([ts[2], ts[4]], 2)
        mask = torch.cat([mask.expand(b, heads, n, n), keep_e[:, None].expand(b, heads, n, g)], -1)
    got = block_sparse_attention(ts[0], ts[1], ts[2], layout, keep, dropout_p=p, dropout_seed=seed, **kw)
    want = dense_dropout_reference(ts[0], kk, vv, mask, pair_mask(seed, b, heads, n, n + g, p), p)
    assert_close(got, want, msg="forward")
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=got.dtype)
    for x, y in zip(torch.autograd.grad(got, ts, up), torch.autograd.grad(want, ts, up), strict=True):
        assert_close(x, y, msg="gradient")
    with torch.no_grad():  # inference with dropout on drops the same pairs
        again = block_sparse_attention(ts[0], ts[1], ts[2], layout, keep, dropout_p=p, dropout_seed=seed, **kw)
    assert_close(again, want.detach())


def test_chunking_does_not_change_the_dropout_mask():
    q, k, v = inputs(2, 2, 29, 4)
    layout = lr.compile_layout(Window(3) | Global([5]), 29, 4)
    a = block_sparse_attention(q, k, v, layout, dropout_p=0.2, dropout_seed=9, chunk_bytes=1)
    c = block_sparse_attention(q, k, v, layout, dropout_p=0.2, dropout_seed=9)
    assert_close(a, c)


def test_dropout_index_maps_a_permuted_sequence_back_to_natural_coordinates():
    """Running the engine on a reversed sequence with DropoutIndex(query=key=reversed positions)
    drops the same pairs as running it in natural order."""
    n, p, seed = 16, 0.4, 3
    q, k, v = inputs(1, 2, n, 4)
    pattern = Window(2)
    layout = lr.compile_layout(pattern, n, 4)
    natural = block_sparse_attention(q, k, v, layout, dropout_p=p, dropout_seed=seed)
    rev = torch.arange(n - 1, -1, -1)
    flipped = block_sparse_attention(q[:, :, rev], k[:, :, rev], v[:, :, rev], layout, dropout_p=p,
                                     dropout_seed=seed, dropout_index=DropoutIndex(query=rev, key=rev))
    assert_close(flipped[:, :, rev], natural)


# -- statistics, seeds, p = 0 -------------------------------------------------------------------------------
def test_expected_output_is_unchanged():
    """The mean over S seeds of the dropped output approaches the output without dropout: each
    entry's deviation stays within 6 standard errors, the standard error estimated from the seeds."""
    torch.manual_seed(0)
    n, p, seeds = 12, 0.3, 400
    q, k, v = (t.detach() for t in inputs(1, 2, n, 4))
    layout = lr.compile_layout(Window(3), n, 4)
    with torch.no_grad():
        clean = block_sparse_attention(q, k, v, layout)
        runs = torch.stack([block_sparse_attention(q, k, v, layout, dropout_p=p, dropout_seed=s)
                            for s in range(seeds)])
    stderr = runs.std(0) / math.sqrt(seeds)
    assert ((runs.mean(0) - clean).abs() <= 6 * stderr + 1e-12).all()
    assert (runs.std(0) > 0).any()  # dropout did something


def test_same_seed_reproduces_other_seeds_differ_and_none_follows_torch_manual_seed():
    q, k, v = inputs(1, 2, 20, 4)
    layout = lr.compile_layout(Window(3), 20, 4)
    run = lambda **kw: block_sparse_attention(q, k, v, layout, dropout_p=0.5, **kw)  # noqa: E731
    assert torch.equal(run(dropout_seed=1), run(dropout_seed=1))
    assert not torch.equal(run(dropout_seed=1), run(dropout_seed=2))
    torch.manual_seed(7)
    a = run()
    torch.manual_seed(7)
    assert torch.equal(a, run())


@pytest.mark.parametrize("grad", [False, True])
def test_p_zero_is_bit_identical_to_no_dropout(grad):
    q, k, v = inputs(2, 2, 19, 4)
    keep = lengths_mask([19, 11], 19)
    layout = lr.compile_layout(Window(2) | Global([3]), 19, 4)
    with torch.set_grad_enabled(grad):
        a = block_sparse_attention(q, k, v, layout, keep, dropout_p=0.0, dropout_seed=3)
        b = block_sparse_attention(q, k, v, layout, keep)
    assert torch.equal(a, b)
    if grad:
        up = torch.randn(a.shape, dtype=a.dtype)
        for x, y in zip(torch.autograd.grad(a, (q, k, v), up), torch.autograd.grad(b, (q, k, v), up), strict=True):
            assert torch.equal(x, y)


def test_p_one_gives_zeros_and_bad_p_is_an_error():
    q, k, v = inputs(1, 1, 8, 4)
    layout = lr.compile_layout(Window(2), 8, 4)
    assert (block_sparse_attention(q, k, v, layout, dropout_p=1.0, dropout_seed=0) == 0).all()
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="dropout_p must be a probability in"):
            block_sparse_attention(q, k, v, layout, dropout_p=bad)
    with pytest.raises(TypeError, match="dropout_seed must be an int"):
        block_sparse_attention(q, k, v, layout, dropout_p=0.1, dropout_seed=1.5)


def test_sparse_attention_passes_dropout_through():
    q, k, v = inputs(1, 2, 10, 4)
    a = lr.sparse_attention(q, k, v, Window(2), tile=4, dropout_p=0.3, dropout_seed=5)
    layout = lr.compile_layout(Window(2), 10, 4)
    assert torch.equal(a, block_sparse_attention(q, k, v, layout, dropout_p=0.3, dropout_seed=5))


def test_xl_segment_drops_the_pairs_a_dense_reference_drops():
    """XL's attention dropout (its `dropatt`) on the segment's rectangular layout: the pairs
    `dropout_keep` drops for (example, head, query row, key position), outputs and gradients against
    the dense formula with that mask, float64, with memory and padding."""
    from longrange.core.dropout import resolve_seed
    from longrange.mechanisms.memory import allowed_keys

    p, n, m, heads = 0.3, 9, 6, 2
    module = lr.build_attention("xl", dim=8, heads=heads, tile=4, dropout=p).double().train()
    gen = torch.Generator().manual_seed(0)
    x, memory = (torch.randn(2, t, 8, generator=gen, dtype=torch.float64) for t in (n, m))
    keep_x = lengths_mask([n, n - 3], n)
    torch.manual_seed(3)
    seed = resolve_seed(None)  # what the layer draws: its only random number
    torch.manual_seed(3)
    out = module(x, keep_x, memory=memory)

    def dense():
        q, k, v = module.project_with_memory(x, memory)
        length = m + n
        scores = ((q + module.content_bias[:, None]) @ k.transpose(-1, -2) + module.position_scores(q, length))
        mask = allowed_keys(n, length, True, None, "cpu")[None, None] & torch.cat(
            [torch.ones(2, m, dtype=torch.bool), keep_x], 1)[:, None, None, :]
        probs = torch.softmax((scores * (8 // heads) ** -0.5).masked_fill(~mask, float("-inf")), -1)
        return module.merge(probs * pair_mask(seed, 2, heads, n, length, p) * dropout_scale(p) @ v)

    want = dense()
    assert_close(out, want)
    up = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    params = [module.qkv.weight, module.r_net.weight, module.content_bias, module.position_bias]
    for a, b in zip(torch.autograd.grad(out, params, up), torch.autograd.grad(want, params, up), strict=True):
        assert_close(a, b)
