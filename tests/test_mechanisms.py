"""Every registered mechanism against its own dense oracle (enrolled automatically from the
registry), config round-trips, determinism of random blocks, low precision, and global tokens."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import longrange as lr
from conftest import LOW_PRECISION, assert_close, lengths_mask
from longrange.mechanisms import ATTENTIONS
from longrange.patterns import BlockWindow, Window, global_blocks

DIM, HEADS, BATCH = 8, 2, 2

CASES = [
    pytest.param(name, cfg, id=f"{name}-{i}")
    for name in lr.list_attentions()
    for i, cfg in enumerate(ATTENTIONS.get(name)[1].test_configs())
]
FIRST_CONFIGS = [
    pytest.param(name, ATTENTIONS.get(name)[1].test_configs()[0], id=name) for name in lr.list_attentions()
]


def build(name, cfg, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)  # same weights for the same seed
    module = lr.build_attention(name, **{"dim": DIM, "heads": HEADS, **cfg, **overrides})
    return module.to(dtype)


def block_of(module) -> int:
    return getattr(module, "tile", 4)


def inputs(n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, n, DIM, generator=gen, dtype=torch.float64).to(dtype)


def padding(n):
    """Example 0 all real; example 1 with its first and last third padded (fully padded when n = 1)."""
    keep = torch.ones(BATCH, n, dtype=torch.bool)
    keep[1, 0] = False
    keep[1, n - n // 3 :] = False
    return keep


def globals_(n):
    """Example 0: tokens 0 and n // 2; example 1: the last token, and token 0 (a padding token,
    which must be ignored)."""
    g = torch.zeros(BATCH, n, dtype=torch.bool)
    g[0, 0] = g[0, n // 2] = True
    g[1, n - 1] = g[1, 0] = True
    return g


def outputs_and_grads(fn, module, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = fn(x)
    y.backward(upstream)
    params = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in module.named_parameters()}
    return y.detach(), x.grad.clone(), params


def assert_module_matches_reference(module, x, **kwargs):
    dtype = x.dtype
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    y, gx, gp = outputs_and_grads(lambda t: module(t, **kwargs), module, x, upstream)
    y_ref, gx_ref, gp_ref = outputs_and_grads(lambda t: module.reference_forward(t, **kwargs), module, x, upstream)
    assert y.shape == x.shape
    assert_close(y, y_ref, dtype, msg="output")
    assert_close(gx, gx_ref, dtype, msg="grad x")
    assert gp.keys() == gp_ref.keys()
    for key in gp:
        assert_close(gp[key], gp_ref[key], dtype, msg=f"grad {key}")
    return y


# -- registry-wide: forward == reference_forward ------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("length", ["one", "odd", "blocks", "long"])
@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_mechanism_matches_reference(name, cfg, length, padded):
    module = build(name, cfg)
    n = {"one": 1, "odd": 7, "blocks": 3 * block_of(module), "long": 41}[length]
    x = inputs(n)
    keep = padding(n) if padded else None
    assert_module_matches_reference(module, x, attention_mask=keep)
    if "global_mask" in type(module).capabilities.inputs:
        assert_module_matches_reference(module, x, attention_mask=keep, global_mask=globals_(n))


def test_registry_lists_every_mechanism():
    names = lr.list_attentions()
    assert {"full", "local", "dilated", "longformer", "bigbird", "sparse_transformer", "linformer", "performer",
            "linear", "nystrom", "reformer"} <= set(names)
    assert names == sorted(names)
    for name in names:
        config_cls, module_cls = ATTENTIONS.get(name)
        assert config_cls.name == name
        assert issubclass(module_cls, lr.Attention) and module_cls.config_class is config_cls
        assert module_cls.test_configs(), "every mechanism names at least one test config"


# -- configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_config_round_trips(name, cfg):
    config_cls = ATTENTIONS.get(name)[0]
    config = config_cls.from_dict({"dim": DIM, "heads": HEADS, **cfg})
    data = config.to_dict()
    assert data["attention"] == name
    assert config_cls.from_dict(data) == config
    assert config_cls.from_dict(json.loads(json.dumps(data))) == config
    module = lr.build_attention(name, **{key: value for key, value in data.items() if key != "attention"})
    assert module.config == config and isinstance(module, ATTENTIONS.get(name)[1])
    for key, value in cfg.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize("name", lr.list_attentions())
def test_unknown_config_key_is_a_type_error_naming_it(name):
    with pytest.raises(TypeError, match="not_a_real_option"):
        lr.build_attention(name, dim=DIM, heads=HEADS, not_a_real_option=1)
    config_cls = ATTENTIONS.get(name)[0]
    with pytest.raises(TypeError, match="windw"):
        config_cls.from_dict({"dim": DIM, "heads": HEADS, "windw": 4})


# -- determinism and the random-block policy ---------------------------------------------------------------
BIGBIRD = {"block_size": 2, "num_random_blocks": 2, "seed": 3}


def random_table(module, n):
    module.current_pattern()
    return module.random_blocks.table(n).clone()


def test_bigbird_same_seed_same_weights_is_bit_identical():
    n = 24
    a = build("bigbird", BIGBIRD, dtype=torch.float32, seed=0)
    b = build("bigbird", BIGBIRD, dtype=torch.float32, seed=99)
    b.load_state_dict(a.state_dict())
    x, keep = inputs(n, torch.float32), padding(n)
    ya, yb = a(x, attention_mask=keep), b(x, attention_mask=keep)
    assert torch.equal(ya, yb)
    assert torch.equal(ya, a(x, attention_mask=keep)), "a second call is bit-identical too"
    assert torch.equal(random_table(a, n), random_table(b, n))


def test_bigbird_seed_and_redraw_change_the_random_table():
    n = 32
    a = build("bigbird", BIGBIRD)
    other = build("bigbird", {**BIGBIRD, "seed": 4})
    table = random_table(a, n)
    assert (table >= 0).any()
    assert not torch.equal(table, random_table(other, n))
    x = inputs(n)
    y = a(x)
    a.redraw_random(5)
    assert a.config.seed == 5
    assert not torch.equal(random_table(a, n), table)
    assert not torch.allclose(a(x), y)
    assert_module_matches_reference(a, x)
    a.redraw_random(3)
    assert torch.equal(random_table(a, n), table) and torch.equal(a(x), y)


def test_bigbird_random_blocks_in_eval_policy():
    n = 32
    x = inputs(n)
    same = build("bigbird", {**BIGBIRD, "random_in_eval": "same"})
    none = build("bigbird", {**BIGBIRD, "random_in_eval": "none"})
    none.load_state_dict(same.state_dict())
    y_train = same(x)
    assert torch.equal(none(x), y_train), "training mode uses random blocks under either policy"
    same.eval()
    none.eval()
    assert torch.equal(same(x), y_train), "'same' keeps the training draw in eval"
    y_none = none(x)
    assert not torch.allclose(y_none, y_train)
    plain = (BlockWindow(1, 2) | global_blocks(2)).to_dense(n)
    assert torch.equal(none.dense_mask(n), plain)
    assert (same.dense_mask(n) & ~plain).any()
    assert_module_matches_reference(none, x, attention_mask=padding(n))
    none.train()
    assert torch.equal(none(x), y_train), "back in training the same draw returns"


# -- low precision: fully padded rows ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(("name", "cfg"), FIRST_CONFIGS)
def test_fully_padded_rows_are_zero_in_low_precision(name, cfg, dtype):
    n = 6
    module = build(name, cfg, dtype=dtype, bias=False)  # no output bias: an empty row is exactly zero
    x = inputs(n, dtype).requires_grad_(True)
    keep = lengths_mask([n, 0], n)
    kwargs = {"global_mask": globals_(n)} if "global_mask" in type(module).capabilities.inputs else {}
    y = module(x, attention_mask=keep, **kwargs)
    assert y.dtype == dtype
    assert not y.isnan().any()
    assert (y[1] == 0).all()
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all()
    for key, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad.float()).all(), key


@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_fully_padded_example_gives_the_output_bias(name, cfg):
    """What the docs say: a query with no key gets zeros from the kernel, so the layer returns its
    output projection's bias there (as a linear layer fed zeros), never NaN."""
    n = 6
    module = build(name, cfg)
    keep = lengths_mask([n, 0], n)
    kwargs = {"global_mask": globals_(n)} if "global_mask" in type(module).capabilities.inputs else {}
    y = module(inputs(n, torch.float64), attention_mask=keep, **kwargs)
    bias = module.out.bias if module.out.bias is not None else torch.zeros_like(y[1, 0])
    torch.testing.assert_close(y[1], bias.expand(n, -1))


@pytest.mark.parametrize("shape", [(BATCH, 0), (0, 5), (0, 0)], ids=["n0", "b0", "both0"])
@pytest.mark.parametrize(("name", "cfg"), FIRST_CONFIGS)
def test_empty_input_gives_an_empty_output(name, cfg, shape):
    """One rule for every mechanism (docs/mechanisms.md): B = 0 or N = 0 -> an empty [B, N, C] output
    that backward runs through; a wrong attention_mask is still an error naming it."""
    module = build(name, cfg)
    x = torch.randn(*shape, DIM, dtype=torch.float64, requires_grad=True)
    for kwargs in ({}, {"attention_mask": torch.ones(shape, dtype=torch.bool)}):
        y = module(x, **kwargs)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        module(x, attention_mask=torch.ones(shape[0], shape[1] + 1, dtype=torch.bool))


# -- bigbird at short lengths, with zero random blocks ---------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 11, 12])
def test_bigbird_short_inputs_are_exact_and_equal_full_attention(n):
    """At most 3 blocks: every block sees every block (globals + window), so bigbird is full attention."""
    bigbird = build("bigbird", {"block_size": 4, "num_random_blocks": 2, "seed": 1})
    full = build("full", {})
    full.load_state_dict(bigbird.state_dict())
    x, keep = inputs(n), padding(n)
    y = assert_module_matches_reference(bigbird, x, attention_mask=keep)
    assert bigbird.dense_mask(n).all()
    assert_close(y, full(x, attention_mask=keep))


@pytest.mark.parametrize("n", [1, 6, 13, 40])
def test_bigbird_with_zero_random_blocks(n):
    module = build("bigbird", {"block_size": 2, "num_random_blocks": 0})
    assert not hasattr(module, "random_blocks") or module.random_blocks is None
    assert torch.equal(module.dense_mask(n), (BlockWindow(1, 2) | global_blocks(2)).to_dense(n))
    x = inputs(n)
    y = assert_module_matches_reference(module, x, attention_mask=padding(n), global_mask=globals_(n))
    module.eval()
    assert torch.equal(module(x, attention_mask=padding(n), global_mask=globals_(n)), y)


# -- user global tokens --------------------------------------------------------------------------------------
def softmax_attention(q, k, v, mask):
    """Written out: softmax(q kᵀ / √D) v over allowed keys; rows with no key give 0."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def test_longformer_global_tokens_by_hand():
    n, w = 13, 4
    module = build("longformer", {"window": w, "tile": 2})
    x, keep, g = inputs(n), padding(n), globals_(n)
    g = g & keep
    q, k, v = module.project(x)
    qg, kg, vg = (module.split_heads(t) for t in module.qkv_global(x).chunk(3, dim=-1))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    local = ((i - j).abs() <= w // 2)[None, None] | g[:, None, None, :]
    o_local = softmax_attention(q, k, v, local & keep[:, None, None, :])
    o_global = softmax_attention(qg, kg, vg, keep[:, None, None, :].expand(BATCH, 1, n, n))
    expected = module.merge(torch.where(g[:, None, :, None], o_global, o_local))
    y = module(x, attention_mask=keep, global_mask=globals_(n))
    assert_close(y, expected)
    assert_close(module(x, attention_mask=keep, global_mask=torch.zeros_like(g)), module(x, attention_mask=keep))


@pytest.mark.parametrize("count", [2, 12])
def test_longformer_global_rows_both_ways(count):
    """Few global tokens fold the global K, V projections into the queries (`rows_over_inputs`);
    many project K, V for every token: both equal the reference, outputs and gradients, with padding."""
    from longrange.mechanisms.globals import fold_key_projection

    n = 41
    module = build("longformer", {"window": 4, "tile": 2})
    assert fold_key_projection(n, count, DIM, HEADS) == (count == 2)
    x, keep = inputs(n), padding(n)
    g = torch.zeros(BATCH, n, dtype=torch.bool)
    g[:, torch.randperm(n, generator=torch.Generator().manual_seed(count))[:count]] = True
    assert_module_matches_reference(module, x, attention_mask=keep, global_mask=g)


def test_rows_over_inputs_equals_projected_keys():
    """The folded global rows against SDPA over projected keys and values, float64, with biases, a
    fully padded example (zeros, finite gradients) and gradients for x, q and the weights."""
    from longrange.mechanisms.globals import global_rows, rows_over_inputs

    gen = torch.Generator().manual_seed(3)
    B, H, g, D, N = 2, 3, 2, 4, 11
    C = H * D
    leaves = [torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
              for shape in ((B, N, C), (B, H, g, D), (C, C), (C, C), (C,), (C,))]
    x, q_g, w_k, w_v, b_k, b_v = leaves
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, 5:] = False
    keep[1] = False

    def projected():
        k, v = (torch.nn.functional.linear(x, w, b).view(B, N, H, D).transpose(1, 2)
                for w, b in ((w_k, b_k), (w_v, b_v)))
        return global_rows(q_g, k, v, keep)

    up = torch.randn(B, H, g, D, generator=gen, dtype=torch.float64)
    got = rows_over_inputs(q_g, x, w_k, w_v, b_v, keep)
    want = projected()
    assert_close(got, want)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    grads = torch.autograd.grad((got * up).sum(), leaves, allow_unused=True)
    want_grads = torch.autograd.grad((want * up).sum(), leaves)
    assert grads[4] is None  # the key bias adds the same score to every key of a row: no gradient
    assert_close(want_grads[4], torch.zeros_like(b_k))
    for name, a, b in zip(("x", "q", "w_k", "w_v", "b_v"), grads[:4] + grads[5:], want_grads[:4] + want_grads[5:],
                          strict=True):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_global_token_reaches_and_is_reached_from_far_away(name):
    cfg = {  # a bare local graph, so reaching far can only come from the global token
        "longformer": {"window": 2, "tile": 1},
        "bigbird": {"block_size": 2, "num_random_blocks": 0, "global_blocks_first": 0, "global_blocks_last": 0,
                    "window_blocks": 1},
    }[name]
    n, far, glob = 16, 12, 1
    module = build(name, cfg)
    x = inputs(n)
    g = torch.zeros(BATCH, n, dtype=torch.bool)
    g[:, glob] = True
    base = module(x, global_mask=g)
    bumped = x.clone()
    bumped[:, glob] += 1.0  # change the global token: a far local token must notice
    assert not torch.allclose(module(bumped, global_mask=g)[:, far], base[:, far])
    bumped = x.clone()
    bumped[:, far] += 1.0  # change a far token: the global token must notice, a local token must not
    y = module(bumped, global_mask=g)
    assert not torch.allclose(y[:, glob], base[:, glob])
    assert torch.equal(y[:, far - 6], base[:, far - 6])
    # without the global mask token 1 is local and cannot see token 12
    assert torch.equal(module(bumped)[:, glob], module(x)[:, glob])


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_global_mask_on_padding_only_is_no_global_mask(name):
    cls = ATTENTIONS.get(name)[1]
    module = build(name, cls.test_configs()[0])
    n = 9
    x, keep = inputs(n), lengths_mask([7, 7], n)
    g = torch.zeros(BATCH, n, dtype=torch.bool)
    g[:, -1] = True  # marks padding tokens only
    y = assert_module_matches_reference(module, x, attention_mask=keep, global_mask=g)
    assert_close(y, module(x, attention_mask=keep))


def test_bigbird_global_tokens_by_hand():
    n = 20
    module = build("bigbird", BIGBIRD)
    x, keep = inputs(n), padding(n)
    g = globals_(n) & keep
    q, k, v = module.project(x)
    mask = module.dense_mask(n)[None] | g[:, None, :, None] | g[:, None, None, :]
    expected = module.merge(softmax_attention(q, k, v, mask & keep[:, None, None, :]))
    assert_close(module(x, attention_mask=keep, global_mask=globals_(n)), expected)


def test_local_window_is_local():
    n, w = 16, 4
    module = build("local", {"window": w, "tile": 2})
    x = inputs(n)
    y = module(x)
    bumped = x.clone()
    bumped[:, 10] += 1.0
    y2 = module(bumped)
    changed = (y2 - y).abs().amax(dim=(0, 2)) > 0
    expected = (torch.arange(n) - 10).abs() <= w // 2
    assert torch.equal(changed, expected)
    assert isinstance(module.current_pattern(), Window)


def test_config_dataclasses_are_plain():
    for name in lr.list_attentions():
        config_cls = ATTENTIONS.get(name)[0]
        assert dataclasses.is_dataclass(config_cls)
        assert config_cls().to_dict()["attention"] == name, "defaults form a valid config"


@pytest.mark.parametrize("empty", [False, True], ids=["padded", "empty_example"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [24, 25])  # a multiple of the stride (merged as [M, l] views) or not (padded)
def test_strided_factor_by_factor_equals_its_reference(n, causal, grad, empty):
    """Strided sparse_transformer runs A(1) in natural order and A(2) on the interleaved
    subsequences (one tile each, read in place), merged by log-sum-exp: in place into the near
    factor's buffer for inference; in training (n a multiple of the stride) one autograd function
    whose factors' backward take the merged output and log-sum-exp (`sparse.factored`). Both equal
    the dense reference, with padding or a fully padded example (zeros, finite gradients)."""
    module = build("sparse_transformer", {"mode": "strided", "stride": 4, "tile": 4, "causal": causal}).eval()
    x, keep = inputs(n), padding(n)
    if empty:
        keep[1] = False
    if grad:
        assert_module_matches_reference(module, x, attention_mask=keep)
        return
    with torch.no_grad():
        assert_close(module(x, attention_mask=keep), module.reference_forward(x, attention_mask=keep))
