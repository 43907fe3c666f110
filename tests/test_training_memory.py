"""The training paths of the kernel, low-rank and hashing family (issue 19): each recomputing autograd
Function against plain autograd through the same forward (outputs and gradients in float64, every
option), gradcheck on tiny shapes, half precision, and what each layer keeps for backward.

Speed and peak memory are measured by `longrange bench --preset lowrank --mode fwdbwd` and
`scripts/reversible_memory.py`, never asserted here."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import longrange as lr
from conftest import assert_close, lengths_mask, random_qkv
from longrange.mechanisms import feature_maps, reformer
from longrange.mechanisms.feature_maps import feature_attention
from longrange.mechanisms.linear import elu_feature_map
from longrange.mechanisms.nystrom import sequence_conv
from longrange.mechanisms.performer import draw_projection, performer_feature_map
from longrange.mechanisms.reformer import LSHSettings, lsh_table


def padding(b, n):
    """Example 0 all real; the last example with its first token and last third padded."""
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, 0] = False
    keep[-1, n - n // 3 :] = False
    return keep


def output_and_grads(fn, inputs, seed=7):
    """fn(*inputs) and the gradients of <fn, upstream> for a fixed random upstream."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out.detach(), torch.autograd.grad(out, inputs, upstream.to(out.dtype)), out.grad_fn


def assert_same(got, want, dtype=None):
    assert_close(got[0], want[0], dtype, msg="output")
    for i, (a, b) in enumerate(zip(got[1], want[1], strict=True)):
        assert_close(a, b, dtype, msg=f"gradient of input {i}")


# -- feature maps: performer (softmax, relu) and linear --------------------------------------------------------
FEATURE_MAPS = {
    "performer": lambda d: performer_feature_map(draw_projection(10, d, seed=3).double(), "softmax"),
    "performer-relu": lambda d: performer_feature_map(draw_projection(10, d, seed=3).double(), "relu"),
    "linear": elu_feature_map,
}


@pytest.fixture(params=["one-chunk", "small-chunks"])
def feature_chunks(request, monkeypatch):
    """small-chunks: the training path takes 2 rows at a time (B·H·m = 60 elements a row), so the
    running key max, the carried causal summary and its reverse carry in backward all run."""
    if request.param == "small-chunks":
        monkeypatch.setattr(feature_maps, "GRAD_CHUNK_ELEMENTS", 120)
    return request.param


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize(("causal", "chunk_size"), [(False, 64), (True, 1), (True, 3), (True, 64)],
                         ids=["bidir", "causal-1", "causal-3", "causal-64"])
@pytest.mark.parametrize("n", [1, 7, 30])
@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_feature_attention_function_equals_autograd(name, n, causal, chunk_size, padded, feature_chunks):
    fmap = FEATURE_MAPS[name](4)
    keep = padding(2, n) if padded else None
    qkv = random_qkv(2, 3, n, 4, seed=n)

    def run(recompute):
        return output_and_grads(lambda q, k, v: feature_attention(fmap, q, k, v, keep, causal=causal,
                                                                  chunk_size=chunk_size, recompute=recompute), qkv)

    fast, slow = run(True), run(False)
    assert type(fast[2]).__name__ == "FeatureAttentionFunctionBackward"
    assert type(slow[2]).__name__ != "FeatureAttentionFunctionBackward"
    assert_same(fast[:2], slow[:2])


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, keep: lr.functional.linear(q, k, v, True, key_padding_mask=keep, chunk_size=2),
        lambda q, k, v, keep: lr.functional.linear(q, k, v, False, key_padding_mask=keep),
        lambda q, k, v, keep: lr.functional.performer(q, k, v, 4, False, key_padding_mask=keep),
        lambda q, k, v, keep: lr.functional.performer(q, k, v, 4, True, key_padding_mask=keep, chunk_size=2),
        lambda q, k, v, keep: lr.functional.performer(q, k, v, 4, True, key_padding_mask=keep, kernel="relu"),
    ],
    ids=["linear-causal", "linear", "performer", "performer-causal", "performer-relu-causal"],
)
def test_feature_attention_function_gradcheck_over_several_chunks(fn, monkeypatch):
    monkeypatch.setattr(feature_maps, "GRAD_CHUNK_ELEMENTS", 8)  # two rows (B·H·m = 4 or 6 elements a row)
    q, k, v = random_qkv(2, 1, 7, 3, seed=3, requires_grad=True)
    keep = lengths_mask([7, 4], 7)
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, keep), (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", ["performer", "linear"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_attention_function_in_half_precision(name, causal, dtype):
    """Half inputs are computed in float32 chunk by chunk: the same numbers as float32 inputs, up to
    the inputs' and outputs' rounding."""
    fmap = FEATURE_MAPS[name](8)
    if name == "performer":
        fmap = performer_feature_map(draw_projection(16, 8, seed=1), "softmax")
    q, k, v = random_qkv(2, 2, 300, 8, seed=1, dtype=torch.float32)
    keep = padding(2, 300)
    qkv_half = [t.to(dtype) for t in (q, k, v)]

    def call(q, k, v):
        return feature_attention(fmap, q, k, v, keep, causal=causal, chunk_size=16)

    out, grads, _ = output_and_grads(call, qkv_half)
    want, want_grads, _ = output_and_grads(call, [t.float() for t in qkv_half])
    assert out.dtype == dtype and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.float16 else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(out.float(), want, **tol)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.float(), w, **tol)


def test_performer_module_gradients_use_the_projection_of_their_call():
    """Training mode with a redraw every call: the call's gradients are those of the projection it
    drew (the Function keeps that feature map), equal to the dense oracle's with the same draw."""
    torch.manual_seed(0)
    module = lr.build_attention("performer", dim=8, heads=2, nb_features=6, redraw_interval=1).double().train()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    keep = padding(2, 9)
    module(x)  # first call: the initial draw
    out = output_and_grads(lambda t: module(t, attention_mask=keep), [x])  # redraws before attending
    assert module.config.seed == 1
    want = output_and_grads(lambda t: module.reference_forward(t, attention_mask=keep), [x])
    assert_same(out[:2], want[:2])


def test_a_projection_that_needs_a_gradient_takes_the_autograd_path():
    q, k, v = random_qkv(1, 2, 6, 4, requires_grad=True)
    projection = draw_projection(5, 4).double().requires_grad_(True)
    out = lr.functional.performer(q, k, v, projection=projection)
    assert type(out.grad_fn).__name__ != "FeatureAttentionFunctionBackward"
    out.sum().backward()
    assert projection.grad is not None and torch.isfinite(projection.grad).all()


# -- reformer ---------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_blocks(monkeypatch):
    """Many head groups, chunk blocks and hash blocks even at test sizes."""
    monkeypatch.setattr(reformer, "_GROUP_SLOTS", 8)
    monkeypatch.setattr(reformer, "_BLOCK_SLOTS", 12)
    monkeypatch.setattr(reformer, "_HASH_BLOCK", 8)


def lsh_grads(qk, v, keep, settings, recompute):
    def call(qk, v):
        table = torch.cat([qk, v], dim=-1).transpose(1, 2).contiguous()  # [B, N, H, 2D]
        return lsh_table(table, keep, settings, recompute=recompute)[0]

    return output_and_grads(call, (qk, v))


LSH_CASES = list(itertools.product([1, 7, 12, 41], [2, 5], [1, 3], [False, True]))


@pytest.mark.parametrize("kernel", ["fused", "plain"])
@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize(("n", "bucket_size", "n_hashes", "causal"), LSH_CASES)
def test_lsh_function_equals_autograd(n, bucket_size, n_hashes, causal, padded, blocks, kernel, request):
    """The recomputing backward (windows for the paper's layout, gathered chunks for the causal
    one; PyTorch's fused CPU kernel or plain products) against autograd through gathered chunks."""
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    qk, _, v = random_qkv(2, 3, n, 4, seed=n)
    keep = padding(2, n) if padded else None
    settings = LSHSettings.make(n, n_hashes, bucket_size, None, causal, 7)
    backend = SDPBackend.FLASH_ATTENTION if kernel == "fused" else SDPBackend.MATH
    with sdpa_kernel(backend):
        fast = lsh_grads(qk, v, keep, settings, True)
        slow = lsh_grads(qk, v, keep, settings, False)
    assert type(fast[2]).__name__ == "LSHFunctionBackward"
    assert_same(fast[:2], slow[:2])


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_function_with_explicit_buckets(causal):
    """n_buckets set by hand: many empty buckets."""
    qk, _, v = random_qkv(1, 2, 23, 4, seed=5)
    settings = LSHSettings.make(23, 2, 3, 8, causal, 1)
    assert_same(lsh_grads(qk, v, None, settings, True)[:2], lsh_grads(qk, v, None, settings, False)[:2])


def test_lsh_function_with_a_zero_vector():
    """A qk row exactly zero: its key is 0 / eps, so its key gradient is scaled by 1 / eps (as in
    autograd, where the norm's gradient vanishes below eps). Non-causal with one chunk, so the row
    is a key of many queries (a row alone in its chunk would turn rounding noise into 1 / eps · 1e-16)."""
    qk, _, v = random_qkv(1, 2, 9, 4, seed=5)
    qk[0, 1, 4] = 0.0
    settings = LSHSettings.make(9, 2, 16, None, False, 1)
    assert_same(lsh_grads(qk, v, None, settings, True)[:2], lsh_grads(qk, v, None, settings, False)[:2])


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_function_gradcheck_with_plain_products(causal):
    """gradcheck through the plain-op backward (test_reformer.py's gradcheck runs the fused one)."""
    qk, _, v = random_qkv(1, 2, 7, 3, seed=11, requires_grad=True)
    keep = torch.tensor([[True, True, False, True, True, True, False]])
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradcheck(
            lambda a, b: lr.functional.lsh(a, b, n_hashes=2, bucket_size=2, causal=causal, seed=1,
                                           key_padding_mask=keep), (qk, v))


def test_lsh_function_queries_without_keys_have_zero_finite_gradients():
    """Example 1 fully padded: its outputs are 0 and every gradient finite (0 for its rows)."""
    qk, _, v = random_qkv(2, 2, 9, 4, seed=2)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1] = False
    out, (d_qk, d_v), _ = lsh_grads(qk, v, keep, LSHSettings.make(9, 2, 2, None, False, 0), True)
    assert (out[1] == 0).all() and torch.isfinite(d_qk).all() and torch.isfinite(d_v).all()
    assert (d_qk[1] == 0).all() and (d_v[1] == 0).all()


# -- nystrom's convolution skip --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 64, 100, 300])
@pytest.mark.parametrize("kernel", [1, 3, 33, 129])
def test_sequence_conv_is_the_depthwise_conv2d(kernel, n):
    conv = torch.nn.Conv2d(3, 3, (kernel, 1), padding=(kernel // 2, 0), groups=3, bias=False).double()
    v = torch.randn(2, 3, n, 4, dtype=torch.float64)
    got = output_and_grads(lambda v, w: sequence_conv(v, w[:, 0, :, 0]), (v, conv.weight))
    want = output_and_grads(lambda v, w: torch.nn.functional.conv2d(v, w, padding=(kernel // 2, 0), groups=3),
                            (v, conv.weight))
    assert_same(got[:2], want[:2])


def test_sequence_conv_gradcheck():
    v = torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sequence_conv, (v, w))


# -- what a layer keeps for backward ---------------------------------------------------------------------------
def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("performer", {"nb_features": 64}),
        ("performer", {"nb_features": 64, "causal": True}),
        ("linear", {}),
        ("linear", {"causal": True}),
        ("reformer", {"bucket_size": 16, "n_hashes": 4}),
        ("reformer", {"bucket_size": 16, "n_hashes": 4, "causal": True}),
    ],
    ids=["performer", "performer-causal", "linear", "linear-causal", "reformer", "reformer-causal"],
)
def test_a_layer_keeps_no_more_than_the_dense_layer(name, options):
    """Inputs, outputs, normalisers and summaries only: no [N, m] features, no per-round chunk
    tiles (autograd kept 2.4-3.2x the dense layer's for performer, 7-13x for reformer)."""
    n, dim, heads = 512, 64, 4
    x = torch.randn(1, n, dim, requires_grad=True)
    torch.manual_seed(0)
    dense = lr.build_attention("full", dim=dim, heads=heads)
    layer = lr.build_attention(name, dim=dim, heads=heads, **options)
    assert saved_bytes(lambda: layer(x)) <= 1.05 * saved_bytes(lambda: dense(x))
