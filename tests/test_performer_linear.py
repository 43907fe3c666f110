"""Performer (FAVOR+) and linear attention: the fast paths against naive formulas written out here,
chunking, causality, decoding steps, low precision, the approximation to softmax, feature redraws,
and bad input. (The registry-wide tests in test_mechanisms.py cover the modules against their own
`reference_attend` too.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longrange as lr
import longrange.mechanisms.feature_maps as feature_maps
from conftest import assert_close, lengths_mask, random_qkv
from longrange.mechanisms.performer import draw_projection

DIM, HEADS = 8, 2  # head_dim 4


# -- naive formulas, independent of the library's feature code -------------------------------------------
def naive_attention(fq, fk, v, causal, keep):
    """out_i = Σ_j A_ij v_j / Σ_j A_ij with A = φ(Q) φ(K)ᵀ over allowed keys; no key -> 0."""
    a = fq @ fk.transpose(-1, -2)  # [B, H, N, N]
    n = a.shape[-1]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] & (True if keep is None else keep[:, None, None, :])
    a = torch.where(allowed, a, torch.zeros_like(a))
    total = a.sum(-1, keepdim=True)
    return (a @ v) / torch.where(total > 0, total, torch.ones_like(total))


def naive_linear(q, k, v, causal=False, keep=None):
    return naive_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal, keep)


def naive_performer(q, k, v, w, causal=False, keep=None, kernel="softmax"):
    """FAVOR+ as in the paper: φ(x) = exp(W x̃ - |x̃|²/2) / √m, x̃ = x / D^¼, no stabilisers at all."""
    d = q.shape[-1]
    qs, ks = q * d**-0.25, k * d**-0.25
    if kernel == "relu":
        return naive_attention(torch.relu(qs @ w.T) + 1e-3, torch.relu(ks @ w.T) + 1e-3, v, causal, keep)

    def phi(x):
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / w.shape[0] ** 0.5

    return naive_attention(phi(qs), phi(ks), v, causal, keep)


def padding(b, n):
    """Example 0 all real; example 1 with its first token and its last third padded."""
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, 0] = False
    keep[-1, n - n // 3 :] = False
    return keep


def assert_same_grads(out, expected, inputs):
    upstream = torch.randn_like(out)
    got, want = torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@pytest.fixture
def small_chunks(monkeypatch):
    """The row loops take a few rows at a time here (B·H·m = 60 feature elements per row), so the
    running key max, the rescaled key summary and the carried causal state are exercised."""
    monkeypatch.setattr(feature_maps, "CHUNK_ELEMENTS", 180)


# -- fast path == naive formula ------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n", [1, 7, 13])
def test_linear_matches_naive(n, causal, padded, small_chunks):
    q, k, v = random_qkv(2, 3, n, 5, requires_grad=True)
    keep = padding(2, n) if padded else None
    out = lr.functional.linear(q, k, v, causal, key_padding_mask=keep, chunk_size=4)
    expected = naive_linear(q, k, v, causal, keep)
    assert_close(out, expected)
    assert_same_grads(out, expected, (q, k, v))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n", [1, 7, 13])
def test_performer_matches_naive(n, causal, padded, kernel, small_chunks):
    """The stabilisers (per-query max, per-head or constant key offset) cancel exactly."""
    q, k, v = random_qkv(2, 3, n, 4, seed=1, requires_grad=True)
    keep = padding(2, n) if padded else None
    out = lr.functional.performer(q, k, v, 10, causal, seed=5, key_padding_mask=keep, kernel=kernel, chunk_size=4)
    expected = naive_performer(q, k, v, draw_projection(10, 4, seed=5).double(), causal, keep, kernel)
    assert_close(out, expected)
    assert_same_grads(out, expected, (q, k, v))


def test_performer_key_max_ignores_padding(small_chunks):
    """A padded key with a huge norm must not push the real keys' features into underflow."""
    q, k, v = random_qkv(1, 1, 6, 4, seed=2)
    keep = lengths_mask([4], 6)
    k_bad = k.clone()
    k_bad[:, :, 4:] = 1e4
    for causal in (False, True):
        got = lr.functional.performer(q, k_bad, v, 8, causal, key_padding_mask=keep)
        assert torch.isfinite(got).all()
        assert_close(got, lr.functional.performer(q, k, v, 8, causal, key_padding_mask=keep))


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v, keep: lr.functional.linear(q, k, v, True, key_padding_mask=keep, chunk_size=2),
        lambda q, k, v, keep: lr.functional.linear(q, k, v, False, key_padding_mask=keep),
        lambda q, k, v, keep: lr.functional.performer(q, k, v, 4, False, key_padding_mask=keep),
        lambda q, k, v, keep: lr.functional.performer(q, k, v, 4, True, key_padding_mask=keep, chunk_size=2),
    ],
    ids=["linear-causal", "linear", "performer", "performer-causal"],
)
def test_gradcheck(fn, small_chunks):
    q, k, v = random_qkv(2, 1, 5, 3, seed=3, requires_grad=True)
    keep = lengths_mask([5, 3], 5)
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, keep), (q, k, v))


FUNCTIONS = {  # name -> (kernel, extra arguments, features per row m)
    "performer": (lr.functional.performer, {"nb_features": 16}, 16),
    "linear": (lr.functional.linear, {}, 4),
}


def rows_per_chunk(monkeypatch, rows, batch_heads, m):
    """Make the row loops take `rows` rows at a time (they budget CHUNK_ELEMENTS = rows·B·H·m)."""
    monkeypatch.setattr(feature_maps, "CHUNK_ELEMENTS", rows * batch_heads * m)


@pytest.mark.parametrize("group_rows", [5, None])
@pytest.mark.parametrize("name", ["performer", "linear"])
def test_chunk_size_does_not_change_results(name, group_rows, monkeypatch):
    """Chunks of c tokens, batched in groups of >= `group_rows` rows (None: one group), with the state
    carried between groups."""
    fn, extra, m = FUNCTIONS[name]
    if group_rows:
        rows_per_chunk(monkeypatch, group_rows, 4, m)
    n = 11
    q, k, v = random_qkv(2, 2, n, 4, seed=4)
    keep = padding(2, n)
    outs = [fn(q, k, v, causal=True, key_padding_mask=keep, chunk_size=c, **extra) for c in (1, 2, 3, 5, n, n + 9)]
    for out in outs[1:]:
        assert_close(out, outs[0])


@pytest.mark.parametrize("name", ["performer", "linear"])
def test_bidirectional_chunks_do_not_change_results(name, monkeypatch):
    fn, extra, m = FUNCTIONS[name]
    q, k, v = random_qkv(2, 2, 10, 4, seed=5)
    keep = padding(2, 10)
    whole = fn(q, k, v, key_padding_mask=keep, **extra)
    for rows in (1, 3, 4):
        rows_per_chunk(monkeypatch, rows, 4, m)
        assert_close(fn(q, k, v, key_padding_mask=keep, **extra), whole)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", ["performer", "linear"])
def test_mac_count_follows_the_chunked_path(name, causal, monkeypatch):
    """macs(n) equals what FlopCounterMode sees when the row loops run in several groups and the
    last chunk is padded (test_flops.py checks every test config with a single group)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = lr.build_attention(
        name, dim=DIM, heads=HEADS, causal=causal, chunk_size=3, **({"nb_features": 8} if name == "performer" else {})
    ).eval()
    m = 8 if name == "performer" else DIM // HEADS
    rows_per_chunk(monkeypatch, 7, HEADS, m)  # groups of 9 rows (7 rounded up to whole chunks of 3)
    n = 23
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.randn(1, n, DIM))
    assert counter.get_total_flops() == 2 * module.macs(n).total


def test_functional_equals_module():
    torch.manual_seed(0)
    for name, options in [("performer", {"nb_features": 12, "seed": 7}), ("linear", {})]:
        for causal in (False, True):
            module = lr.build_attention(name, dim=DIM, heads=HEADS, causal=causal, **options).double()
            q, k, v = random_qkv(2, HEADS, 9, DIM // HEADS, seed=6)
            keep = padding(2, 9)
            extra = {"nb_features": 12, "seed": 7} if name == "performer" else {}
            expected = getattr(lr.functional, name)(q, k, v, causal=causal, key_padding_mask=keep, **extra)
            assert_close(module.attend(q, k, v, keep), expected)


# -- causality and decoding -----------------------------------------------------------------------------------
CAUSAL_MODULES = [
    pytest.param("performer", {"nb_features": 16, "chunk_size": 4}, id="performer"),
    pytest.param("performer", {"nb_features": 16, "chunk_size": 4, "kernel": "relu"}, id="performer-relu"),
    pytest.param("linear", {"chunk_size": 4}, id="linear"),
]


def causal_module(name, options, dtype=torch.float64):
    torch.manual_seed(0)
    return lr.build_attention(name, dim=DIM, heads=HEADS, causal=True, **options).to(dtype)


@pytest.mark.parametrize(("name", "options"), CAUSAL_MODULES)
@pytest.mark.parametrize("t", [1, 5, 8])
def test_future_tokens_leave_earlier_outputs_bit_identical(name, options, t):
    module = causal_module(name, options, torch.float32)
    x = torch.randn(2, 13, DIM)
    keep = padding(2, 13)
    y = module(x, attention_mask=keep)
    changed = x.clone()
    changed[:, t:] = 100 * torch.randn(2, 13 - t, DIM)
    later_keep = keep.clone()
    later_keep[:, t:] = ~later_keep[:, t:]
    y2 = module(changed, attention_mask=later_keep)
    assert torch.equal(y2[:, :t], y[:, :t])
    assert not torch.allclose(y2[:, t:], y[:, t:])


@pytest.mark.parametrize(("name", "options"), CAUSAL_MODULES)
@pytest.mark.parametrize("piece", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_the_causal_call(name, options, piece, dtype):
    module = causal_module(name, options, dtype)
    n = 10
    x = torch.randn(2, n, DIM, dtype=dtype)
    keep = padding(2, n)
    q, k, v = module.project(x)
    full = module.attend(q, k, v, keep)
    state = module.initial_state(2)
    outs = []
    for start in range(0, n, piece):
        part = slice(start, start + piece)
        o, state = module.step(q[:, :, part], k[:, :, part], v[:, :, part], state, key_padding_mask=keep[:, part])
        assert o.shape == (2, HEADS, min(piece, n - start), DIM // HEADS) and o.dtype == dtype
        outs.append(o)
    assert_close(torch.cat(outs, dim=2), full, dtype)
    m = module.feature_map(torch.float32, "cpu").num_features
    assert state.kv.shape == (2, HEADS, m, DIM // HEADS) and state.k_sum.shape == (2, HEADS, m)


def test_step_state_is_float32_for_half_inputs():
    module = causal_module("linear", {}, torch.bfloat16)
    state = module.initial_state(3)
    assert state.kv.dtype == torch.float32 and state.kv.shape == (3, HEADS, DIM // HEADS, DIM // HEADS)
    q, k, v = (torch.randn(3, HEADS, 2, DIM // HEADS, dtype=torch.bfloat16) for _ in range(3))
    o, state = module.step(q, k, v, state)
    assert o.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    assert module.initial_state(1, dtype=torch.float64).kv.dtype == torch.float64


# -- low precision ---------------------------------------------------------------------------------------------
LONG = [
    pytest.param("linear", {}, id="linear"),
    pytest.param("linear", {"causal": True}, id="linear-causal"),
    pytest.param("performer", {"nb_features": 32}, id="performer"),
    pytest.param("performer", {"nb_features": 32, "causal": True, "chunk_size": 512}, id="performer-causal"),
]


@pytest.mark.parametrize(("name", "options"), LONG)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_sequences_in_half_precision(name, options, dtype):
    """n = 8192 with large values: the sums over keys overflow fp16 unless accumulated in fp32."""
    n, d = 8192, 8
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, d, generator=gen) * 2 for _ in range(2))
    v = torch.randn(1, 2, n, d, generator=gen) * 300
    keep = lengths_mask([n - 100], n)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    fn = getattr(lr.functional, name)
    out = fn(q, k, v, key_padding_mask=keep, **options)
    expected = fn(q.float(), k.float(), v.float(), key_padding_mask=keep, **options)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=0.02 * 300)


@pytest.mark.parametrize(("name", "options"), CAUSAL_MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_queries_without_real_keys_are_zero_in_low_precision(name, options, dtype):
    """Causal with leading padding: the first queries see no real key (and example 1 none at all)."""
    torch.manual_seed(0)
    module = lr.build_attention(name, dim=DIM, heads=HEADS, causal=True, bias=False, **options).to(dtype)
    x = torch.randn(2, 9, DIM).to(dtype).requires_grad_(True)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False
    keep[1] = False
    y = module(x, attention_mask=keep)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert (y[0, :3] == 0).all() and (y[1] == 0).all() and (y[0, 3:] != 0).any()
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in module.parameters() if p.grad is not None)


# -- FAVOR+ approximates softmax attention -------------------------------------------------------------------------
def approximation_error(m, seed, orthogonal):
    """Mean |performer - softmax| over a small problem with modest logits (|q|, |k| ~ 2)."""
    gen = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k = q * 0.5, k * 0.5
    exact = lr.reference_attention(q, k, v)
    approx = lr.functional.performer(q, k, v, m, seed=seed, orthogonal=orthogonal)
    return (approx - exact).abs().mean().item()


def test_performer_error_falls_with_more_features():
    seeds = range(8)
    errors = [sum(approximation_error(m, s, True) for s in seeds) / len(seeds) for m in (16, 64, 256, 1024)]
    # the estimator's standard deviation falls as 1/√m: each 4x more features about halves the error
    for more, fewer in zip(errors[1:], errors[:-1], strict=True):
        assert more < 0.8 * fewer, errors
    assert errors[-1] < 0.015, errors  # measured 0.0074 (v ~ N(0, 1))


def test_orthogonal_features_beat_iid_features():
    seeds = range(8)
    for m in (16, 64):
        ortho = sum(approximation_error(m, s, True) for s in seeds)
        iid = sum(approximation_error(m, s, False) for s in seeds)
        assert ortho < 0.95 * iid, (m, ortho, iid)


def test_orthogonal_projection_rows():
    w = draw_projection(40, 16, seed=3)  # blocks of 16, 16, 8 rows
    assert w.shape == (40, 16) and w.dtype == torch.float32
    w = w.double()
    directions = w / w.norm(dim=1, keepdim=True)
    for block in (slice(0, 16), slice(16, 32), slice(32, 40)):
        gram = directions[block] @ directions[block].T
        assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), torch.float32)
    assert 3.0 < w.norm(dim=1).mean() < 5.0  # chi(16) norms, mean ≈ √16
    assert torch.equal(draw_projection(40, 16, seed=3), draw_projection(40, 16, seed=3))
    assert not torch.equal(draw_projection(40, 16, seed=3), draw_projection(40, 16, seed=4))


# -- seeds and redraws ---------------------------------------------------------------------------------------------
def performer_module(**options):
    torch.manual_seed(0)  # same weights every time; the features come from `seed` only
    return lr.build_attention("performer", dim=DIM, heads=HEADS, nb_features=8, **options)


def test_same_seed_is_bit_identical_and_global_rng_is_untouched():
    x = torch.randn(2, 7, DIM)
    a, b = performer_module(seed=3), performer_module(seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ya = a(x)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG is never used"
    assert torch.equal(ya, b(x)) and torch.equal(ya, a(x))
    assert not torch.allclose(ya, performer_module(seed=4)(x))
    q, k, v = random_qkv(1, 2, 5, 4)
    assert torch.equal(lr.functional.performer(q, k, v, 8, seed=2), lr.functional.performer(q, k, v, 8, seed=2))


def test_redraw_features_is_explicit_and_reproducible():
    module = performer_module(seed=3)
    x = torch.randn(2, 7, DIM)
    y = module(x)
    projection = module.projection.clone()
    module.redraw_features()
    assert module.config.seed == 4
    y4 = module(x)
    assert not torch.allclose(y4, y) and not torch.equal(module.projection, projection)
    module.redraw_features(3)
    assert torch.equal(module.projection, projection) and torch.equal(module(x), y)
    module.redraw_features()
    assert torch.equal(module(x), y4)
    module.double()
    assert_close(module(x.double()), module.reference_forward(x.double()))


def test_redraw_interval_counts_training_calls_only():
    module = performer_module(seed=0, redraw_interval=2)
    twin = performer_module(seed=0, redraw_interval=2)
    x = torch.randn(1, 6, DIM)
    module.eval()
    first = module(x)
    assert all(torch.equal(module(x), first) for _ in range(3)), "eval mode never redraws"
    assert int(module.calls_since_redraw) == 0
    module.train()
    outs = [module(x) for _ in range(5)]  # draws: seed 0, 0, 1, 1, 2
    assert torch.equal(outs[0], first) and torch.equal(outs[1], first)
    assert not torch.allclose(outs[2], first) and torch.equal(outs[3], outs[2])
    assert not torch.allclose(outs[4], outs[2]) and module.config.seed == 2
    twin_outs = [twin(x) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(outs, twin_outs, strict=True)), "redraws reproduce from the seed"


def test_backward_through_a_call_before_a_redraw():
    module = performer_module(redraw_interval=1)
    x = torch.randn(1, 5, DIM, requires_grad=True)
    y1 = module(x)
    y2 = module(x)  # redraws: the buffer is replaced, not changed in place
    (y1.sum() + y2.sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_projection_is_in_the_state_dict():
    a = performer_module(seed=3)
    state = a.state_dict()
    assert "projection" in state and state["projection"].shape == (8, DIM // HEADS)
    b = performer_module(seed=9)
    b.load_state_dict(state)
    x = torch.randn(2, 5, DIM)
    assert torch.equal(b(x), a(x))


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("performer", {"nb_features": 0}, "nb_features must be a positive int"),
        ("performer", {"nb_features": -3}, "nb_features"),
        ("performer", {"nb_features": 2.5}, "nb_features"),
        ("performer", {"kernel": "gelu"}, r"kernel must be one of \('softmax', 'relu'\), got 'gelu'"),
        ("performer", {"chunk_size": 0}, "chunk_size must be a positive int"),
        ("performer", {"redraw_interval": 0}, "redraw_interval"),
        ("performer", {"seed": 1.5}, "seed must be an int"),
        ("performer", {"seed": -1}, "seed must be a non-negative int"),
        ("performer", {"orthogonal": 1}, "orthogonal must be a bool"),
        ("performer", {"causal": "yes"}, "causal must be a bool"),
        ("linear", {"chunk_size": -1}, "chunk_size must be a positive int"),
        ("linear", {"causal": None}, "causal must be a bool"),
    ],
)
def test_invalid_config(name, options, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention(name, dim=DIM, heads=HEADS, **options)


def test_invalid_kernel_arguments():
    q, k, v = random_qkv(1, 2, 5, 4)
    with pytest.raises(ValueError, match="nb_features must be a positive int"):
        lr.functional.performer(q, k, v, nb_features=0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        lr.functional.performer(q, k, v, kernel="exp")
    with pytest.raises(ValueError, match=r"projection must be \[m, D\] with D = q.shape\[-1\] = 4, got \[8, 5\]"):
        lr.functional.performer(q, k, v, projection=torch.randn(8, 5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lr.functional.linear(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="q, k, v must share shape"):
        lr.functional.linear(q, k[:, :, :3], v)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, N\] = \[1, 5\]"):
        lr.functional.performer(q, k, v, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_invalid_decoding_calls():
    bidirectional = lr.build_attention("linear", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="needs causal=True"):
        bidirectional.initial_state(1)
    module = lr.build_attention("performer", dim=DIM, heads=HEADS, nb_features=8, causal=True)
    q, k, v = random_qkv(2, HEADS, 1, DIM // HEADS, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs causal=True"):
        bidirectional.step(q, k, v, module.initial_state(2))
    with pytest.raises(ValueError, match=r"state does not match q: kv must be \[B, H, m, D\] = \[2, 2, 8, 4\]"):
        module.step(q, k, v, module.initial_state(3))
    with pytest.raises(TypeError, match="state must be a RecurrentState"):
        module.step(q, k, v, None)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        module.initial_state(0)
