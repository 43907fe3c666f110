"""The sparse engine against the dense oracle on the same mask: forward, gradients, padding,
low precision, determinism; plus gradcheck and a hypothesis sweep over shapes and patterns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longrange as lr
from conftest import (
    LOW_PRECISION,
    TOL,
    assert_close,
    assert_error_within_factor,
    dense_reference,
    grads,
    lengths_mask,
    random_qkv,
)
from longrange.patterns import (
    BlockWindow,
    Dilated,
    Empty,
    Full,
    Global,
    RandomBlocks,
    Segments,
    Window,
    fixed,
    global_blocks,
    strided,
)
from longrange.sparse import block_sparse_attention

ENGINE_PATTERNS = {
    "window2": lambda h, b: Window(2),
    "causal_window3": lambda h, b: Window(3, causal=True),
    "window_or_global": lambda h, b: Window(1) | Global([0, -1]),
    "dilated_per_head": lambda h, b: Dilated(1, dilation=tuple(range(1, h + 1))),
    "bigbird_like": lambda h, b: BlockWindow(1, b) | global_blocks(b) | RandomBlocks(1, b, num_heads=h, seed=3),
    "strided": lambda h, b: strided(3),
    "fixed": lambda h, b: fixed(4, 1, causal=False),
    "segments_and_global": lambda h, b: Segments(5) | Global([6], clip=True),  # clip: SHAPES has n = 1
    "full": lambda h, b: Full(),
}

SHAPES = [  # (batch, heads, n, block size): lengths multiples of b and not
    (1, 1, 1, 4),
    (2, 2, 8, 4),
    (3, 3, 13, 4),
    (2, 1, 17, 3),
    (1, 2, 24, 2),
]


def assert_matches_reference(q, k, v, pattern, bsz, keep=None, scale=None, layout=None):
    """Forward and q/k/v gradients of the engine (on `layout` if given, else `pattern`) vs the oracle."""
    dtype = q.dtype
    out = lr.sparse_attention(q, k, v, layout or pattern, tile=bsz, key_padding_mask=keep, scale=scale)
    ref = dense_reference(q, k, v, pattern, keep, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype, msg="forward")
    upstream = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(q.device)
    g_out = grads(out, (q, k, v), upstream)
    g_ref = grads(ref, (q, k, v), upstream)
    for name, a, e in zip("qkv", g_out, g_ref, strict=True):
        assert_close(a, e, dtype, msg=f"grad {name}")
    return out


@pytest.mark.parametrize(("batch", "heads", "n", "bsz"), SHAPES)
@pytest.mark.parametrize("name", sorted(ENGINE_PATTERNS))
def test_engine_matches_dense_reference(name, batch, heads, n, bsz):
    pattern = ENGINE_PATTERNS[name](heads, bsz)
    q, k, v = random_qkv(batch, heads, n, 4, requires_grad=True, seed=n)
    assert_matches_reference(q, k, v, pattern, bsz)


@pytest.mark.parametrize(("batch", "heads", "n", "bsz"), SHAPES[1:])
@pytest.mark.parametrize("name", sorted(ENGINE_PATTERNS))
def test_engine_matches_dense_reference_with_key_padding(name, batch, heads, n, bsz):
    pattern = ENGINE_PATTERNS[name](heads, bsz)
    q, k, v = random_qkv(batch, heads, n, 4, requires_grad=True, seed=n + 1)
    lengths = [n, max(n - bsz - 1, 1), 0][:batch]  # full, padded, and (with 3 examples) fully padded
    keep = lengths_mask(lengths, n)
    if batch >= 2:
        keep[1, 0] = False  # padding need not be at the end
    out = assert_matches_reference(q, k, v, pattern, bsz, keep)
    if batch == 3:
        assert (out[2] == 0).all(), "a fully padded example gives zeros"


def test_fully_padded_example_is_zero_with_zero_gradients():
    q, k, v = random_qkv(2, 2, 10, 4, requires_grad=True)
    keep = lengths_mask([10, 0], 10)
    out = lr.sparse_attention(q, k, v, Window(2) | Global([0]), tile=4, key_padding_mask=keep)
    assert (out[1] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()


def test_empty_pattern_gives_zeros_and_full_pattern_is_sdpa():
    q, k, v = random_qkv(2, 2, 11, 4)
    assert (lr.sparse_attention(q, k, v, Empty(), tile=4) == 0).all()
    full = lr.sparse_attention(q, k, v, Full(), tile=4)
    assert_close(full, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_compiled_layout_and_scale_are_honoured():
    q, k, v = random_qkv(2, 2, 14, 4, requires_grad=True)
    pattern = Window(2) | Global([3])
    layout = lr.compile_layout(pattern, 14, 4)
    assert_close(lr.sparse_attention(q, k, v, layout), lr.sparse_attention(q, k, v, pattern, tile=4))
    assert_matches_reference(q, k, v, pattern, 4, scale=0.3)


@pytest.mark.parametrize("chunk_bytes", [1, 4096, 2**30])
def test_chunking_does_not_change_the_result(chunk_bytes):
    q, k, v = random_qkv(2, 3, 29, 4, requires_grad=True)
    keep = lengths_mask([29, 20], 29)
    pattern = Window(3) | Global([0, 17]) | RandomBlocks(2, 4, num_heads=3, seed=1)
    layout = lr.compile_layout(pattern, 29, 4)
    out = block_sparse_attention(q, k, v, layout, keep, chunk_bytes=chunk_bytes)
    assert_close(out, dense_reference(q, k, v, pattern, keep))


@pytest.mark.parametrize(
    ("pattern", "n", "bsz", "heads"),
    [
        (Window(2, causal=True) | Global([3, -1]), 61, 4, 1),
        (Dilated(1, dilation=(1, 2)) | Global([7]), 50, 2, 2),
        (BlockWindow(1, 3) | global_blocks(3) | RandomBlocks(1, 3, num_heads=2, seed=0), 70, 3, 2),
        (BlockWindow(1, 3) | global_blocks(3) | RandomBlocks(1, 3, num_heads=2, seed=0), 72, 3, 2),
    ],
)
def test_dense_rows_per_head_and_causal_match(pattern, n, bsz, heads):
    layout = lr.compile_layout(pattern, n, bsz)
    assert len(layout.dense_rows) > 0
    q, k, v = random_qkv(3, heads, n, 4, requires_grad=True, seed=5)
    keep = lengths_mask([n, n - 7, 0], n)
    keep[0, 3] = False  # a padded global token
    assert_matches_reference(q, k, v, pattern, bsz, keep=keep, layout=layout)


def test_dense_rows_go_through_the_side_path_and_match():
    n, bsz = 64, 4
    pattern = Window(1) | Global([0, 33])
    layout = lr.compile_layout(pattern, n, bsz)
    assert layout.dense_rows.tolist() == [0, 8]
    q, k, v = random_qkv(2, 2, n, 4, requires_grad=True)
    assert_matches_reference(q, k, v, pattern, bsz, keep=lengths_mask([n, 40], n), layout=layout)


def test_same_inputs_give_bit_identical_outputs():
    q, k, v = random_qkv(2, 2, 21, 4, dtype=torch.float32)
    pattern = Window(2) | global_blocks(4) | RandomBlocks(1, 4, num_heads=2, seed=5)
    keep = lengths_mask([21, 15], 21)
    a = lr.sparse_attention(q, k, v, pattern, tile=4, key_padding_mask=keep)
    b = lr.sparse_attention(q.clone(), k.clone(), v.clone(), pattern, tile=4, key_padding_mask=keep)
    assert torch.equal(a, b)


# -- low precision ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_fully_padded_rows_are_zero_and_gradients_finite(dtype):
    q, k, v = random_qkv(2, 2, 6, 4, dtype=dtype, requires_grad=True)
    keep = lengths_mask([6, 0], 6)
    keep[0, 1:] = False  # example 0: rows outside token 0's window see no key at all
    out = lr.sparse_attention(q, k, v, Window(1), tile=2, key_padding_mask=keep)
    assert out.dtype == dtype
    assert not out.isnan().any()
    assert (out[1] == 0).all() and (out[0, :, 2:] == 0).all()
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad.float()).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_is_within_a_factor_of_the_reference_error(dtype):
    n, bsz = 10, 4
    pattern = Window(2) | Global([0])
    q, k, v = random_qkv(1, 2, n, 8, dtype=torch.float64, seed=3)
    keep = lengths_mask([8], n)
    golden = dense_reference(q, k, v, pattern, keep)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    fast = lr.sparse_attention(ql, kl, vl, pattern, tile=bsz, key_padding_mask=keep)
    ref = dense_reference(ql, kl, vl, pattern, keep)
    assert fast.dtype == dtype
    assert_error_within_factor(fast, ref, golden)


# -- gradcheck ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "heads"),
    [(Window(1) | Global([0]), 1), (Dilated(1, dilation=(1, 2)), 2)],
    ids=["window_or_global", "per_head"],
)
def test_gradcheck(pattern, heads):
    q, k, v = random_qkv(1, heads, 7, 3, requires_grad=True, seed=2)
    keep = lengths_mask([6], 7)
    fn = lambda q, k, v: lr.sparse_attention(q, k, v, pattern, tile=2, key_padding_mask=keep)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


# -- hypothesis: shapes, lengths, block sizes, window sizes, globals, padding -------------------------
@st.composite
def engine_cases(draw):
    n = draw(st.integers(1, 40))
    bsz = draw(st.sampled_from([1, 2, 3, 4, 8]))
    radius = draw(st.integers(0, 6))
    causal = draw(st.booleans())
    globals_ = draw(st.lists(st.integers(-n, n - 1), max_size=3))
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    keep = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=batch, max_size=batch))
    use_keep = draw(st.booleans())
    return n, bsz, radius, causal, globals_, batch, heads, keep if use_keep else None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine_cases())
def test_engine_matches_reference_hypothesis(case):
    n, bsz, radius, causal, globals_, batch, heads, keep = case
    pattern = Window(radius, causal=causal)
    if globals_:
        pattern = pattern | Global(globals_)
    keep = None if keep is None else torch.tensor(keep, dtype=torch.bool)
    q, k, v = random_qkv(batch, heads, n, 4, requires_grad=True, seed=n)
    assert_matches_reference(q, k, v, pattern, bsz, keep)


# -- CUDA ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["window_or_global", "bigbird_like", "dilated_per_head", "causal_window3"])
def test_engine_matches_dense_reference_cuda(name, dtype):
    batch, heads, n, bsz = 3, 2, 37, 4
    pattern = ENGINE_PATTERNS[name](heads, bsz)
    q, k, v = random_qkv(batch, heads, n, 8, dtype=dtype, requires_grad=True, device="cuda")
    keep = lengths_mask([n, 20, 0], n).cuda()
    out = lr.sparse_attention(q, k, v, pattern, tile=bsz, key_padding_mask=keep)
    assert out.device.type == "cuda"
    assert (out[2] == 0).all()
    golden = dense_reference(*(t.detach().double() for t in (q, k, v)), pattern, keep)
    tol = TOL[dtype] if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-3}  # TF32 may be on
    torch.testing.assert_close(out.double(), golden, **tol)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("kernel", ["scores-buffer", "fused-sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_path_matches_reference(kernel, dtype):
    """Without autograd the engine reuses buffers and, for small blocks on CPU, runs its own
    matmul-softmax-matmul kernel: it must give what the oracle gives, zero rows included."""
    from longrange.sparse.engine import SMALL_BLOCK

    block = 4 if kernel == "scores-buffer" else SMALL_BLOCK + 32
    torch.manual_seed(1)
    n = 3 * block + 5
    pattern = Window(block // 2 + 1) | Global([0]) | RandomBlocks(1, block, num_heads=2, seed=3)
    q, k, v = torch.randn(3, 2, 2, n, 8, dtype=dtype).unbind(0)
    keep = torch.rand(2, n) > 0.3
    keep[1] = False  # a fully padded example
    k_e, v_e = torch.randn(2, 2, 2, 3, 8, dtype=dtype).unbind(0)
    keep_e = torch.tensor([[True, True, False], [False, False, False]])
    layout = lr.compile_layout(pattern, n, block)
    with torch.no_grad():
        got = block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e), chunk_bytes=1)
    dense = pattern.to_dense(n)[None] & keep[:, None, None, :]
    mask = torch.cat([dense, keep_e[:, None, None, :].expand(2, 2, n, 3)], dim=-1)
    want = lr.reference_attention(q, torch.cat([k, k_e], 2), torch.cat([v, v_e], 2), mask)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
