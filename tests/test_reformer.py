"""`reformer` (LSH attention): exact limits against dense attention written here, the fast path
against its dense oracle (outputs and gradients, float64), causality, the self-token rule, seeds,
hash locality, low precision at long lengths, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import longrange as lr
from conftest import assert_close, lengths_mask, random_qkv
from longrange.mechanisms import reformer
from longrange.mechanisms.reformer import (
    SELF_PENALTY,
    covered_pairs,
    default_n_buckets,
    hash_buckets,
    lsh,
    lsh_reference,
)

DIM, HEADS = 8, 2


def build(weights_seed=0, dtype=torch.float64, **cfg):
    torch.manual_seed(weights_seed)
    return lr.build_attention("reformer", dim=DIM, heads=HEADS, **cfg).to(dtype)


def x_of(n, b=2, seed=0, dtype=torch.float64):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def padding(b, n):
    """Example 0 all real; example 1 with its first token and last third padded."""
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, 0] = False
    keep[-1, n - n // 3 :] = False
    return keep


def dense_self_masked(qk, v, keep=None):
    """Written out: softmax(q k̂ᵀ / √D − 5·10⁴ I) v over real keys, k̂ = qk / |qk|."""
    n, d = qk.shape[2], qk.shape[3]
    keys = qk / qk.norm(dim=-1, keepdim=True)
    scores = qk @ keys.transpose(-1, -2) / math.sqrt(d) - SELF_PENALTY * torch.eye(n, dtype=qk.dtype)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Many head groups, chunk blocks and hash blocks even at test sizes."""
    monkeypatch.setattr(reformer, "_GROUP_SLOTS", 8)
    monkeypatch.setattr(reformer, "_BLOCK_SLOTS", 12)
    monkeypatch.setattr(reformer, "_HASH_BLOCK", 8)


# -- exact limits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 9, 16])
@pytest.mark.parametrize("chunks", [1, 2], ids=["one_chunk", "two_chunks"])
def test_covering_every_pair_is_dense_attention(n, n_hashes, chunks):
    """One chunk (bucket_size >= n), or two (each the other's look-back): every round covers every
    pair, so LSH attention is dense softmax attention with the self penalty, whatever the buckets."""
    qk, _, v = random_qkv(2, 3, n, 5)
    bucket_size = max(1, -(-n // chunks))
    keep = padding(2, n) if n > 2 else None
    got = lsh(qk, v, n_hashes=n_hashes, bucket_size=bucket_size, seed=4, key_padding_mask=keep)
    want = dense_self_masked(qk, v, keep)
    if keep is not None:  # a padded query whose every key is padded returns zeros
        want = want.nan_to_num(0.0)
    assert_close(got, want)


def test_one_bucket_limit_through_the_module():
    n = 11
    module = build(n_hashes=2, bucket_size=16, n_buckets=2)
    x = x_of(n)
    qk, _, v = module.project(x)
    assert_close(module(x), module.merge(dense_self_masked(qk, v)))


def test_rounds_combine_as_one_softmax_with_pair_multiplicity():
    """Duplicates allowed: the log-sum-exp combination equals one softmax over all keys, each pair
    weighted by the number of rounds that cover it (written here from `covered_pairs`)."""
    n, d, bs, rounds = 23, 4, 3, 3
    qk, _, v = random_qkv(1, 2, n, d, seed=5)
    buckets = hash_buckets(qk, default_n_buckets(n, bs), rounds, seed=2)
    count = sum(covered_pairs(buckets[:, :, r], bs).double() for r in range(rounds))  # [B, H, N, N]
    keys = qk / qk.norm(dim=-1, keepdim=True)
    scores = qk @ keys.transpose(-1, -2) / math.sqrt(d) - SELF_PENALTY * torch.eye(n, dtype=qk.dtype)
    weights = count * torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    want = (weights / weights.sum(dim=-1, keepdim=True)) @ v
    assert_close(lsh(qk, v, n_hashes=rounds, bucket_size=bs, seed=2), want)
    assert (count > 1).any(), "some pair is found by several rounds"


# -- fast path == oracle ------------------------------------------------------------------------------------
CASES = list(itertools.product([1, 7, 12, 41], [2, 3, 5], [1, 3], [False, True]))


@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize(("n", "bucket_size", "n_hashes", "causal"), CASES)
def test_fast_path_matches_reference(n, bucket_size, n_hashes, causal, blocks, request):
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    qk, _, v = random_qkv(2, 3, n, 4, seed=n, requires_grad=True)
    keep = padding(2, n)
    kwargs = {"n_hashes": n_hashes, "bucket_size": bucket_size, "causal": causal, "seed": 7, "key_padding_mask": keep}
    fast, ref = lsh(qk, v, **kwargs), lsh_reference(qk, v, **kwargs)
    assert_close(fast, ref)
    upstream = torch.randn_like(fast)
    for g_fast, g_ref in zip(torch.autograd.grad(fast, (qk, v), upstream),
                             torch.autograd.grad(ref, (qk, v), upstream), strict=True):
        assert_close(g_fast, g_ref)
    with torch.no_grad():  # the in-place inference path
        assert_close(lsh(qk, v, **kwargs), ref)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    qk, _, v = random_qkv(1, 2, 7, 3, seed=11, requires_grad=True)
    keep = torch.tensor([[True, True, False, True, True, True, False]])
    assert torch.autograd.gradcheck(
        lambda a, b: lsh(a, b, n_hashes=2, bucket_size=2, causal=causal, seed=1, key_padding_mask=keep), (qk, v)
    )


def test_explicit_n_buckets_and_returned_buckets():
    n, bs = 30, 4
    qk, _, v = random_qkv(2, 2, n, 4)
    keep = padding(2, n)
    out, buckets = lsh(qk, v, n_hashes=3, bucket_size=bs, n_buckets=6, key_padding_mask=keep, return_buckets=True)
    assert buckets.shape == (2, 2, 3, n) and buckets.dtype == torch.long
    assert torch.equal(buckets, hash_buckets(qk, 6, 3, key_padding_mask=keep))
    real = keep[:, None, None, :].expand_as(buckets)
    assert (buckets[real] < 6).all() and (buckets[~real] == 6).all(), "padded tokens get the extra bucket"
    assert_close(out, lsh_reference(qk, v, n_hashes=3, bucket_size=bs, n_buckets=6, key_padding_mask=keep))


@pytest.mark.parametrize(("n", "bucket_size", "expected"), [(1, 64, 2), (64, 64, 2), (129, 64, 4), (192, 64, 4),
                                                          (16384, 64, 256), (7, 2, 4), (10, 2, 6)])
def test_derived_n_buckets(n, bucket_size, expected):
    assert default_n_buckets(n, bucket_size) == expected
    _, buckets = lsh(*random_qkv(1, 1, n, 4)[::2], bucket_size=bucket_size, n_hashes=2, return_buckets=True)
    assert int(buckets.max()) < expected


# -- padding -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_padded_tokens_never_reach_real_outputs(causal):
    n = 29
    module = build(n_hashes=3, bucket_size=4, causal=causal)
    x, keep = x_of(n), padding(2, n)
    y = module(x, attention_mask=keep)
    noisy = x.clone()
    noisy[~keep] = 1e3 * torch.randn(int((~keep).sum()), DIM, dtype=x.dtype)
    assert torch.equal(module(noisy, attention_mask=keep)[keep], y[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_query_without_real_keys_is_zero_with_finite_gradients(dtype):
    qk, _, v = random_qkv(2, 2, 10, 4, dtype=dtype, requires_grad=True)
    keep = lengths_mask([10, 0], 10)
    out = lsh(qk, v, n_hashes=2, bucket_size=4, key_padding_mask=keep)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert (out[1] == 0).all()
    out.float().square().sum().backward()
    assert torch.isfinite(qk.grad.float()).all() and torch.isfinite(v.grad.float()).all()


# -- causality -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize(("bucket_size", "n_hashes"), [(2, 3), (3, 2), (4, 4)])
def test_causal_outputs_ignore_the_future_bit_for_bit(bucket_size, n_hashes, blocks, request):
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    n = 40
    module = build(n_hashes=n_hashes, bucket_size=bucket_size, causal=True, dtype=torch.float32)
    x = x_of(n, dtype=torch.float32)
    y = module(x)  # the autograd path (parameters need gradients)
    with torch.no_grad():  # the inference path
        y_inference = module(x)
    for t in (1, 17, 39):
        for trial in range(2):
            changed = x.clone()
            changed[:, t:] = torch.randn(2, n - t, DIM, generator=torch.Generator().manual_seed(100 * t + trial))
            assert torch.equal(module(changed)[:, :t], y[:, :t]), f"tokens from {t} on changed earlier outputs"
            with torch.no_grad():
                assert torch.equal(module(changed)[:, :t], y_inference[:, :t])


def test_non_causal_outputs_do_see_the_future():
    n = 48
    module = build(n_hashes=2, bucket_size=4)
    x = x_of(n)
    changed = x.clone()
    changed[:, 40:] += 1.0
    assert not torch.allclose(module(changed)[:, :40], module(x)[:, :40])


def test_causal_first_token_sees_only_itself():
    qk, _, v = random_qkv(1, 2, 12, 4)
    out = lsh(qk, v, n_hashes=3, bucket_size=4, causal=True)
    assert_close(out[:, :, 0], v[:, :, 0])


# -- the self-token rule ---------------------------------------------------------------------------------------
def test_self_only_when_nothing_else():
    qk, _, v = random_qkv(1, 2, 2, 4)
    out = lsh(qk, v, n_hashes=2, bucket_size=2)  # one chunk: each token sees itself and the other
    assert_close(out[:, :, 0], v[:, :, 1])
    assert_close(out[:, :, 1], v[:, :, 0])
    alone = lsh(qk[:, :, :1], v[:, :, :1], n_hashes=2, bucket_size=2)  # n = 1: itself is all there is
    assert_close(alone, v[:, :, :1])
    keep = torch.tensor([[True, False]])  # the other token padded
    out = lsh(qk, v, n_hashes=2, bucket_size=2, key_padding_mask=keep)
    assert_close(out[:, :, 0], v[:, :, 0])
    assert_close(out[:, :, 1], v[:, :, 0]), "a padded query still reads the real keys of its chunks"
    keep = torch.tensor([[False, False]])
    assert (lsh(qk, v, n_hashes=2, bucket_size=2, key_padding_mask=keep) == 0).all()


def test_self_penalty_is_finite_in_the_oracle():
    """The paper's rule: a large negative finite score, not −inf (a lone token still attends to itself)."""
    qk, _, v = random_qkv(1, 1, 1, 4)
    assert_close(lsh_reference(qk, v, bucket_size=4), v)
    assert SELF_PENALTY == 5e4 and math.isfinite(SELF_PENALTY)


# -- seeds and rotations -----------------------------------------------------------------------------------------
def test_same_seed_is_bit_identical_and_another_seed_differs():
    n = 40
    a = build(n_hashes=2, bucket_size=4, seed=3)
    b = build(n_hashes=2, bucket_size=4, seed=3)
    x = x_of(n)
    y = a(x)
    torch.manual_seed(1234)  # the global RNG plays no part
    assert torch.equal(b(x), y) and torch.equal(a(x), y)
    other = build(n_hashes=2, bucket_size=4, seed=4)
    other.load_state_dict(a.state_dict())
    assert not torch.allclose(other(x), y)


def test_global_rng_is_left_alone():
    qk, _, v = random_qkv(1, 2, 20, 4)
    state = torch.get_rng_state()
    lsh(qk, v, bucket_size=4)
    assert torch.equal(torch.get_rng_state(), state)


def test_rotations_are_a_function_of_the_seed():
    r1 = reformer.lsh_rotations(5, 8, 3, 6)
    assert r1.shape == (3, 8, 3)
    assert torch.equal(r1, reformer.lsh_rotations(5, 8, 3, 6))
    assert torch.equal(r1[:2], reformer.lsh_rotations(5, 8, 2, 6)), "earlier rounds do not depend on n_hashes"
    assert not torch.equal(r1, reformer.lsh_rotations(6, 8, 3, 6))


# -- hashing -------------------------------------------------------------------------------------------------------
def test_close_directions_share_buckets_more_often_than_far_ones():
    gen = torch.Generator().manual_seed(0)
    pairs, d, n_buckets, rounds = 500, 16, 8, 4
    u = torch.nn.functional.normalize(torch.randn(pairs, d, generator=gen), dim=-1)
    near = u + 0.2 * torch.randn(pairs, d, generator=gen) / math.sqrt(d)  # cos ≈ 0.98
    far = torch.randn(pairs, d, generator=gen)  # independent: cos ≈ 0
    same = {}
    for name, other in (("near", near), ("far", far)):
        qk = torch.stack([u, other], dim=1)[None].transpose(1, 2)  # [1, 2, pairs, d]: head 0 u, head 1 other
        b = hash_buckets(qk, n_buckets, rounds, seed=1)
        same[name] = (b[0, 0] == b[0, 1]).double().mean().item()
    assert same["near"] > 0.75, same
    assert same["far"] < 0.3, same  # ≈ 1 / n_buckets for unrelated directions


def test_opposite_directions_land_in_opposite_buckets():
    qk, _, _ = random_qkv(1, 1, 64, 8)
    n_buckets = 10
    b = hash_buckets(qk, n_buckets, 3, seed=2)
    b_neg = hash_buckets(-qk, n_buckets, 3, seed=2)
    assert torch.equal(b_neg, (b + n_buckets // 2) % n_buckets)
    assert torch.equal(hash_buckets(3.0 * qk, n_buckets, 3, seed=2), b), "the hash ignores the length"


# -- low precision at long lengths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_low_precision_is_finite(dtype, causal):
    n = 8192
    gen = torch.Generator().manual_seed(0)
    qk = (4 * torch.randn(1, 1, n, 8, generator=gen)).to(dtype)
    v = torch.randn(1, 1, n, 8, generator=gen).to(dtype)
    keep = lengths_mask([n - 1000], n)
    with torch.no_grad():
        out = lsh(qk, v, n_hashes=2, bucket_size=64, causal=causal, key_padding_mask=keep)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = lsh(qk.double(), v.double(), n_hashes=2, bucket_size=64, causal=causal, key_padding_mask=keep)
    assert (out.double() - want).abs().max() < (2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_long_low_precision_gradients_are_finite():
    n = 8192
    gen = torch.Generator().manual_seed(1)
    qk = (4 * torch.randn(1, 1, n, 8, generator=gen)).to(torch.float16).requires_grad_(True)
    v = torch.randn(1, 1, n, 8, generator=gen).to(torch.float16).requires_grad_(True)
    keep = lengths_mask([n - 100], n)
    out = lsh(qk, v, n_hashes=2, bucket_size=64, key_padding_mask=keep)
    out.float().sum().backward()
    assert torch.isfinite(qk.grad).all() and torch.isfinite(v.grad).all()


# -- the module ------------------------------------------------------------------------------------------------------
def test_module_projects_shared_qk():
    module = build(bucket_size=4)
    assert module.qkv.out_features == 2 * DIM and module.block_size == 4
    qk, k, v = module.project(x_of(5))
    assert k is qk and qk.shape == v.shape == (2, HEADS, 5, DIM // HEADS)
    assert lr.functional.lsh is lsh


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [7, 41])
def test_module_inference_path_matches_reference(n, causal):
    """Without autograd the module takes the inference kernels (windows + flash, or causal chunks)."""
    module = build(n_hashes=2, bucket_size=3, causal=causal, seed=1)
    x, keep = x_of(n), padding(2, n)
    with torch.no_grad():
        assert_close(module(x, attention_mask=keep), module.reference_forward(x, attention_mask=keep))
        assert_close(module(x), module.reference_forward(x))


def test_without_the_fused_kernel_the_result_is_the_same():
    """With SDPA's flash backend switched off the windows run as plain products (what FlopCounterMode
    counts); same numbers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    module = build(n_hashes=3, bucket_size=4, seed=2)
    x, keep = x_of(30), padding(2, 30)
    with torch.no_grad():
        fused = module(x, attention_mask=keep)
        with sdpa_kernel(SDPBackend.MATH):
            plain = module(x, attention_mask=keep)
    assert_close(plain, fused)


def test_empty_input():
    module = build(bucket_size=4)
    x = x_of(0)
    assert module(x).shape == x.shape and module.reference_forward(x).shape == x.shape
    qk, _, v = random_qkv(1, 2, 0, 4)
    assert lsh(qk, v).shape == qk.shape


def test_module_attend_is_the_kernel():
    n = 13
    module = build(n_hashes=3, bucket_size=3, seed=2)
    x, keep = x_of(n), padding(2, n)
    qk, k, v = module.project(x)
    assert_close(module(x, attention_mask=keep), module.merge(module.attend(qk, k, v, keep)))


def test_macs_count_the_inference_path():
    """BERT-base shape: 3·n·C² for the projections; per round and head, every query's 2·64 keys
    (plus the one window a head group computes between its lanes), QKᵀ and PV; hashing in `other`."""
    n, c, h, r, bs = 16384, 768, 12, 4, 64
    module = lr.build_attention("reformer", dim=c, heads=h, n_hashes=r, bucket_size=bs)
    m = module.macs(n)
    assert m.projections == 3 * n * c * c
    lanes = h * r
    groups = len(reformer.head_groups(h, n, r))
    pairs = (lanes * (n // bs + 1) - groups) * bs * 2 * bs
    assert m.pairs == pairs and m.scores == m.weighted == pairs * (c // h)
    assert m.other == n * h * r * (n // bs // 2) * (c // h + 2)
    assert abs(m.scores / (n * 2 * bs * c * r) - 1) < 0.01, "within 1% of the paper's 2·bs keys a query"


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_hashes": 0}, "n_hashes must be a positive int"),
        ({"n_hashes": 2.0}, "n_hashes"),
        ({"bucket_size": 0}, "bucket_size must be a positive int"),
        ({"bucket_size": -4}, "bucket_size"),
        ({"n_buckets": 3}, "n_buckets must be an even int"),
        ({"n_buckets": 0}, "n_buckets"),
        ({"n_buckets": True}, "n_buckets"),
        ({"seed": 1.5}, "seed must be (an|a non-negative) int"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"causal": "yes"}, "causal must be a bool"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention("reformer", dim=DIM, heads=HEADS, **options)
    qk, _, v = random_qkv(1, 2, 6, 4)
    with pytest.raises(ValueError, match=match):
        lsh(qk, v, **options)


def test_bad_tensors():
    qk, _, v = random_qkv(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"qk and v must share shape"):
        lsh(qk, v[:, :, :5])
    with pytest.raises(ValueError, match=r"qk must be a 4-d tensor"):
        lsh(qk[0], v)
    with pytest.raises(TypeError, match=r"v must be a floating-point tensor"):
        lsh(qk, v.long())
    with pytest.raises(TypeError, match=r"qk and v must share a dtype"):
        lsh(qk, v.float())
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, N\] = \[1, 6\]"):
        lsh(qk, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"key_padding_mask must have dtype torch.bool"):
        lsh(qk, v, key_padding_mask=torch.ones(1, 6))
    module = build(bucket_size=4)
    with pytest.raises(ValueError, match="reformer shares queries and keys"):
        module.attend(qk, qk.clone(), v, None)
