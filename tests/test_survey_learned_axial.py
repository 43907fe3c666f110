"""Issue 13, learnable patterns and axial: `routing`, `sinkhorn`, `axial`.

The registry-wide tests (test_mechanisms, test_flops, test_models, ...) already check each against
its own dense oracle. Here: the exact limits against plain softmax attention (float64, outputs and
gradients), causality bit for bit, padding, low precision, the k-means state (EMA, checkpoints),
the Sinkhorn operator, shapes and bad options."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from conftest import assert_close, lengths_mask
from longrange.mechanisms.axial import most_square, resolve_shape
from longrange.mechanisms.routing import top_members
from longrange.mechanisms.sinkhorn import sinkhorn_block_attention, sinkhorn_normalise
from longrange.patterns import Causal, Segments

DIM, HEADS, BATCH = 8, 2, 2


def build(name, dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    return lr.build_attention(name, dim=DIM, heads=HEADS, **options).to(dtype)


def inputs(n, dtype=torch.float64, seed=0, batch=BATCH):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, DIM, generator=gen, dtype=torch.float64).to(dtype)


def padding(n):
    """Example 0 all real, example 1 with its first token and last third padded."""
    keep = torch.ones(BATCH, n, dtype=torch.bool)
    keep[1, 0] = False
    keep[1, n - n // 3:] = False
    return keep


def run(module, x, attention_mask=None, params=None, **kwargs):
    """(output, grad x, grads of the parameters) for a fixed upstream gradient, zero at padding (what
    a padded query outputs is no one's business: full attention averages the real keys, routing's and
    axial's lines give zeros). `module` may be a function; `params`: the module owning the weights."""
    params = module if params is None else params
    x = x.detach().clone().requires_grad_(True)
    params.zero_grad(set_to_none=True)
    y = module(x, attention_mask=attention_mask, **kwargs)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    if attention_mask is not None:
        up = up * attention_mask[..., None]
        y = y * attention_mask[..., None]
    y.backward(up)
    grads = {k: p.grad.clone() for k, p in params.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def assert_same_layer(a, b, x, **kwargs):
    """a and b (same q/k/v/out weights) give the same outputs (real tokens) and gradients."""
    ya, ga, pa = run(a, x, **kwargs)
    yb, gb, pb = run(b, x, **kwargs)
    assert_close(ya, yb, msg="output")
    assert_close(ga, gb, msg="grad x")
    for key in ("qkv.weight", "qkv.bias", "out.weight", "out.bias"):
        assert_close(pa[key], pb[key], msg=f"grad {key}")


def full_like(module, causal=False):
    full = lr.build_attention("full", dim=DIM, heads=HEADS, causal=causal).to(torch.float64)
    full.load_state_dict({k: v for k, v in module.state_dict().items() if k.startswith(("qkv.", "out."))})
    return full


# -- exact limits ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 6, 13])
def test_routing_with_one_cluster_is_full_attention(n, causal):
    """Every head routed, one cluster taking every token: full softmax attention (causal: with a
    cluster as long as the input, one chunk)."""
    size = None if not causal else 16
    module = build("routing", num_clusters=1, cluster_size=size, routed_heads=HEADS, causal=causal)
    assert_same_layer(module, full_like(module, causal), inputs(n), attention_mask=padding(n))


def test_routing_mixes_local_heads_and_one_full_cluster():
    """routed_heads=1 of 2, one cluster: head 0 is the local window, head 1 full attention."""
    n, w = 11, 4
    module = build("routing", num_clusters=1, routed_heads=1, window=w, tile=2)
    q, k, v = (torch.randn(BATCH, HEADS, n, DIM // HEADS, dtype=torch.float64) for _ in range(3))
    keep = padding(n)
    out = module.attend(q, k, v, keep)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = ((i - j).abs() <= w // 2)[None, None] & keep[:, None, None, :]
    assert_close(out[:, :1], lr.reference_attention(q[:, :1], k[:, :1], v[:, :1], window))
    assert_close(out[:, 1:], lr.reference_attention(q[:, 1:], k[:, 1:], v[:, 1:], keep[:, None, None, :]))


@pytest.mark.parametrize("n", [5, 12, 17])
def test_sinkhorn_identity_permutation_is_block_local_attention(n):
    """A hard identity permutation: each block's partner is itself, so a query attends to its own
    block (counted twice, which a softmax does not see): Segments(b) attention."""
    b = 4
    q, k, v = (torch.randn(BATCH, HEADS, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = padding(n)
    nb = -(-n // b)
    eye = torch.eye(nb, dtype=torch.float64).expand(BATCH, HEADS, nb, nb)
    out = sinkhorn_block_attention(q, k, v, eye, b, keep)
    mask = Segments(b).to_dense(n)[None, None] & keep[:, None, None, :]
    ref = lr.reference_attention(q, k, v, mask)
    up = torch.randn_like(out)
    assert_close(out, ref)
    for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up), strict=True):
        assert_close(g, g_ref)


def test_sinkhorn_causal_previous_block_permutation():
    """Causal, each block sorted to the one before it: a query sees the whole previous block and
    its own block up to itself (block 0 has no partner)."""
    n, b = 14, 3
    q, k, v = (torch.randn(BATCH, HEADS, n, 4, dtype=torch.float64) for _ in range(3))
    nb = -(-n // b)
    shift = torch.eye(nb, dtype=torch.float64).roll(-1, dims=1).tril(-1).expand(BATCH, HEADS, nb, nb)
    out = sinkhorn_block_attention(q, k, v, shift, b, None, causal=True)
    blk = torch.arange(n) // b
    mask = ((blk[:, None] - blk[None, :]) == 1) | ((blk[:, None] == blk[None, :]) & Causal().to_dense(n))
    assert_close(out, lr.reference_attention(q, k, v, mask[None, None]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 16])
def test_sinkhorn_one_block_covering_everything_is_full_attention(n, causal):
    """block_size >= n: one block, its own partner (causal: none), whatever the sorting network and
    the Gumbel noise (training mode): full softmax attention."""
    module = build("sinkhorn", block_size=16, causal=causal)
    module.train()
    assert_same_layer(module, full_like(module, causal), inputs(n), attention_mask=padding(n))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 12])
def test_axial_one_row_is_full_attention(n, causal):
    for shape in ((1, n), (n, 1), (1, 1, n)):
        module = build("axial", shape=shape, causal=causal)
        assert_same_layer(module, full_like(module, causal), inputs(n), attention_mask=padding(n))


# -- causality ------------------------------------------------------------------------------------------------
CAUSAL = [
    ("routing", {"num_clusters": 3, "cluster_size": 4, "window": 4}),
    ("routing", {"num_clusters": 2, "cluster_size": 3, "routed_heads": 2}),
    ("sinkhorn", {"block_size": 4}),
    ("sinkhorn", {"block_size": 3, "sinkhorn_iters": 0}),
    ("axial", {"shape": (-1, 5)}),
    ("axial", {"shape": (-1, 2, 3)}),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("name", "options"), CAUSAL)
def test_causal_variants_do_not_see_later_tokens(name, options, train):
    """Changing tokens t.. leaves outputs ..t-1 bit-identical (float32), for every cut t; in training
    with the same noise (seeded) and the same centroids."""
    n = 23
    module = build(name, dtype=torch.float32, causal=True, **options).train(train)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = inputs(n, torch.float32)
    for t in (1, 5, 12, 22):
        later = x.clone()
        later[:, t:] = torch.randn(BATCH, n - t, DIM)
        module.load_state_dict(state)  # training moves routing's centroids: start each pair alike
        torch.manual_seed(1)
        y = module(x)
        module.load_state_dict(state)
        torch.manual_seed(1)
        y_later = module(later)
        assert torch.equal(y[:, :t], y_later[:, :t]), (name, t)
        assert not torch.equal(y[:, t:], y_later[:, t:])


# -- padding --------------------------------------------------------------------------------------------------
PADDED = [
    ("routing", {"num_clusters": 2, "cluster_size": 5, "window": 4}),
    ("routing", {"num_clusters": 2, "cluster_size": 5, "window": 4, "causal": True}),
    ("sinkhorn", {"block_size": 4}),
    ("sinkhorn", {"block_size": 4, "causal": True}),
    ("axial", {"shape": (-1, 4)}),
    ("axial", {"shape": (-1, 4), "causal": True}),
]


@pytest.mark.parametrize(("name", "options"), PADDED)
def test_padding_content_never_changes_real_tokens(name, options):
    """Whatever the padded positions hold, the real tokens' outputs are bit-identical; and a
    right-padded input gives the trimmed input's outputs."""
    n, real = 19, 13
    module = build(name, dtype=torch.float32, **options).eval()
    x = inputs(n, torch.float32)
    keep = padding(n)
    other = torch.where(keep[..., None], x, torch.randn_like(x) * 5)
    y, y_other = module(x, attention_mask=keep), module(other, attention_mask=keep)
    assert torch.equal(y[keep], y_other[keep])
    right = lengths_mask([real, real], n)
    torch.testing.assert_close(module(x, attention_mask=right)[:, :real], module(x[:, :real]), atol=1e-5, rtol=1e-5)


# -- low precision ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "options"), PADDED)
def test_low_precision_is_finite_and_near_float32(name, options, dtype):
    n = 24  # tiny: bf16 matmuls are slow on this CPU
    ref = build(name, dtype=torch.float32, **options).eval()
    low = build(name, dtype=torch.float32, **options).to(dtype).eval()
    x, keep = inputs(n, torch.float32), padding(n)
    x_low = x.to(dtype).requires_grad_(True)
    y = low(x_low, attention_mask=keep)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    y.float().square().sum().backward()
    assert torch.isfinite(x_low.grad.float()).all()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (y.float() - ref(x, attention_mask=keep))[keep].abs().max() < tol


# -- routing's k-means ------------------------------------------------------------------------------------------
def test_centroids_move_in_training_only_and_by_the_ema_formula():
    n, c = 12, 3
    module = build("routing", num_clusters=c, cluster_size=4, routed_heads=1, ema_decay=0.9)
    x, keep = inputs(n), padding(n)
    before = module.centroids.clone()
    module.eval()
    module(x, attention_mask=keep)
    assert torch.equal(module.centroids, before), "eval never moves the centroids"
    module.train()
    q, k, _ = module.project(x)
    module(x, attention_mask=keep)
    # by hand: unit queries and keys of the routed head (head 1), real tokens, nearest centroid, EMA
    members = torch.cat([t[:, 1][keep] for t in (q, k)])  # (R, D)
    members = members / members.norm(dim=-1, keepdim=True)
    nearest = (members @ before[0].T).argmax(-1)
    expected = before[0].clone()
    for j in range(c):
        if (nearest == j).any():
            moved = 0.9 * before[0, j] + 0.1 * members[nearest == j].mean(0)
            expected[j] = moved / moved.norm()
    assert_close(module.centroids[0], expected)
    assert not torch.equal(module.centroids, before)
    assert not any(b is module.centroids for b in module.parameters()), "a buffer, not a parameter"


def test_centroid_update_ignores_padding_and_decay_one_freezes():
    n = 10
    a = build("routing", num_clusters=2, cluster_size=3)
    b = build("routing", num_clusters=2, cluster_size=3)
    x, keep = inputs(n), padding(n)
    a(x, attention_mask=keep)
    b(torch.where(keep[..., None], x, -3 * x), attention_mask=keep)
    assert torch.equal(a.centroids, b.centroids)
    frozen = build("routing", num_clusters=2, cluster_size=3, ema_decay=1.0)
    before = frozen.centroids.clone()
    frozen(x)
    assert_close(frozen.centroids, before)


def test_balanced_membership_takes_exactly_w_tokens_per_cluster_in_order():
    sim = torch.randn(2, 3, 20, 4)
    keep = lengths_mask([20, 14], 20)
    idx = top_members(sim, keep, 5)
    assert idx.shape == (2, 3, 4, 5)
    assert (idx.diff(dim=-1) > 0).all(), "distinct, in position order"
    assert (idx[1] < 14).all(), "real tokens before padding"
    best = sim[0, 0, :, 2].topk(5).indices.sort().values
    assert torch.equal(idx[0, 0, 2], best)


def test_checkpoint_round_trip_keeps_centroids_and_sort_network(tmp_path):
    from longrange.models import Encoder, ModelConfig

    for name, options in (("routing", {"num_clusters": 2, "cluster_size": 8, "window": 4}),
                          ("sinkhorn", {"block_size": 4})):
        config = ModelConfig(vocab_size=30, dim=16, heads=2, layers=2, ffn_dim=32, max_length=64,
                             attention=name, attention_options=options)
        torch.manual_seed(0)
        model = Encoder(config)
        ids = torch.randint(1, 30, (2, 20))
        model.train()
        model(ids).last_hidden_state.sum().backward()  # one training call moves the centroids
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))  # as if after a step (the sort network too)
        model.eval()
        model.save_pretrained(tmp_path / name)
        loaded = Encoder.from_pretrained(tmp_path / name).eval()
        state, loaded_state = model.state_dict(), loaded.state_dict()
        for key, value in state.items():
            assert torch.equal(value, loaded_state[key]), key
        buffers = [k for k in state if k.endswith("centroids")] if name == "routing" else \
            [k for k in state if k.endswith("sort_net")]
        assert buffers, name
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


# -- sinkhorn ---------------------------------------------------------------------------------------------------
def test_sinkhorn_operator_rows_are_convex_and_columns_balance():
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    valid = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    p = sinkhorn_normalise(logits, valid, iters=50)
    assert_close(p.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))
    assert (p.sum(-2) - 1).abs().max() < 1e-6, "doubly stochastic after enough rounds"
    assert_close(sinkhorn_normalise(logits, valid, iters=0), logits.softmax(-1))
    causal = torch.ones(6, 6, dtype=torch.bool).tril(-1)[None, None]
    pc = sinkhorn_normalise(logits, causal, iters=5, causal=True)
    assert (pc[..., ~causal[0, 0]] == 0).all() and (pc[..., 0, :] == 0).all(), "block 0 has no partner"
    assert_close(pc[..., 1:, :].sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    changed = logits.clone()
    changed[..., 4:, :] += 3.0  # later rows: earlier rows of the causal operator do not move
    assert torch.equal(sinkhorn_normalise(changed, causal, 5, causal=True)[..., :4, :], pc[..., :4, :])


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_chunks_and_head_by_head_backward_match_the_oracle(monkeypatch, causal):
    """The fast paths at sizes the registry tests do not reach: many chunks of query blocks (forced
    to one block each) and the head-by-head backward, against the dense oracle in float64."""
    import longrange.mechanisms.sinkhorn as sinkhorn

    monkeypatch.setattr(sinkhorn, "CHUNK_BYTES", 1)
    module = build("sinkhorn", block_size=3, causal=causal, gumbel_noise=False)
    x, keep = inputs(20), padding(20)
    y, gx, gp = run(module, x, attention_mask=keep)
    y_ref, gx_ref, gp_ref = run(lambda t, **kw: module.reference_forward(t, **kw), x, attention_mask=keep,
                                params=module)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    for key in gp:
        assert_close(gp[key], gp_ref[key], msg=key)
    module.eval()
    with torch.no_grad():
        assert_close(module(x, attention_mask=keep), module.reference_forward(x, attention_mask=keep))


def test_gumbel_noise_only_in_training_and_seeded():
    n = 24
    module = build("sinkhorn", dtype=torch.float32, block_size=4)
    x = inputs(n, torch.float32)
    torch.manual_seed(3)
    y1 = module(x)
    y2 = module(x)
    torch.manual_seed(3)
    assert torch.equal(module(x), y1), "the same seed, the same noise"
    assert not torch.equal(y1, y2), "fresh noise each training call"
    module.eval()
    assert torch.equal(module(x), module(x))
    quiet = build("sinkhorn", dtype=torch.float32, block_size=4, gumbel_noise=False)
    assert torch.equal(quiet(x), module(x)), "eval = training without noise"


def test_sinkhorn_with_noise_matches_its_oracle_under_one_seed():
    module = build("sinkhorn", block_size=3)
    x, keep = inputs(14), padding(14)
    torch.manual_seed(5)
    y = module(x, attention_mask=keep)
    torch.manual_seed(5)
    assert_close(y, module.reference_forward(x, attention_mask=keep))


# -- axial shapes ------------------------------------------------------------------------------------------------
def test_axial_shapes_and_the_bench_default():
    assert [most_square(n) for n in (1024, 2048, 4096, 8192, 16384)] == [
        (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    assert most_square(1) == (1, 1) and most_square(12) == (3, 4)
    assert resolve_shape((-1, 8), 20) == (3, 8) and resolve_shape((2, -1, 3), 13) == (2, 3, 3)
    module = build("axial")
    n = 12
    x = inputs(n)
    y = module(x)
    assert_close(y, build("axial", shape=(3, 4))(x))
    assert_close(module(x, shape=(2, 6)), build("axial", shape=(2, 6))(x)), "the call's shape wins"
    assert not torch.allclose(module(x, shape=(2, 6)), y)
    assert_close(module(x, shape=(2, 6)), module.reference_forward(x, shape=(2, 6)))


# -- bad options --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("routing", {"num_clusters": 0}, "num_clusters"),
        ("routing", {"cluster_size": -2}, "cluster_size"),
        ("routing", {"num_clusters": None}, "cluster_size"),
        ("routing", {"routed_heads": 3}, r"routed_heads=3 must be at most heads=2"),
        ("routing", {"ema_decay": 1.5}, "ema_decay"),
        ("routing", {"num_clusters": None, "cluster_size": 8}, "seq_len"),
        ("sinkhorn", {"block_size": 0}, "block_size"),
        ("sinkhorn", {"temperature": 0.0}, "temperature"),
        ("sinkhorn", {"sinkhorn_iters": -1}, "sinkhorn_iters"),
        ("axial", {"shape": (0, 4)}, "shape"),
        ("axial", {"shape": (-1, -1)}, "shape"),
        ("axial", {"shape": "4x4"}, "shape"),
    ],
)
def test_bad_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention(name, dim=DIM, heads=HEADS, **options)


def test_lengths_that_do_not_fit_name_the_option():
    routing = build("routing", num_clusters=3)
    with pytest.raises(ValueError, match=r"num_clusters=3 must divide the input length n=10"):
        routing(inputs(10))
    routing(inputs(12))  # 3 clusters of 4
    axial = build("axial", shape=(3, 4))
    with pytest.raises(ValueError, match=r"shape \(3, 4\) multiplies to 12, not the input length 10"):
        axial(inputs(10))
    with pytest.raises(ValueError, match=r"shape: the length n=13 is prime"):
        build("axial")(inputs(13))
    with pytest.raises(ValueError, match="shape"):
        axial(inputs(10), shape=(5, 3))
