"""Bad input fails early and says which argument is wrong (ValueError for values/shapes, TypeError
for types and unknown names)."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from longrange.patterns import Band, Dilated, Global, RandomBlocks, Segments, SummaryColumns, Window

DIM, HEADS = 8, 2


def qkv(b=1, h=2, n=6, d=4, dtype=torch.float32):
    return tuple(torch.randn(b, h, n, d).to(dtype) for _ in range(3))


@pytest.fixture(params=lr.list_attentions())
def module(request):
    cls = lr.mechanisms.ATTENTIONS.get(request.param)[1]
    return lr.build_attention(request.param, dim=DIM, heads=HEADS, **cls.test_configs()[0])


# -- module inputs ------------------------------------------------------------------------------------
def test_wrong_mask_shape(module):
    x = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match=r"attention_mask.*\[2, 5\].*\[2, 6\]"):
        module(x, attention_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        module(x, attention_mask=torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_wrong_mask_dtype(module, dtype):
    x = torch.randn(2, 5, DIM)
    with pytest.raises(TypeError, match=r"attention_mask.*torch\.bool"):
        module(x, attention_mask=torch.ones(2, 5, dtype=dtype))


def test_mask_not_a_tensor(module):
    with pytest.raises(TypeError, match="attention_mask"):
        module(torch.randn(1, 3, DIM), attention_mask=[[True, True, True]])


def test_x_with_wrong_last_dim_or_rank(module):
    with pytest.raises(ValueError, match=rf"x must be \[B, N, C\] with C = dim = {DIM}"):
        module(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        module(torch.randn(5, DIM))


@pytest.mark.parametrize("name", ["bigbird", "longformer"])
def test_wrong_global_mask(name):
    cls = lr.mechanisms.ATTENTIONS.get(name)[1]
    module = lr.build_attention(name, dim=DIM, heads=HEADS, **cls.test_configs()[0])
    x = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match="global_mask"):
        module(x, global_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="global_mask"):
        module(x, global_mask=torch.zeros(2, 5))


# -- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["local", "longformer", "dilated"])
def test_old_option_name_still_loads_with_a_warning(name):
    with pytest.warns(DeprecationWarning, match="'block_size' is now called 'tile'"):
        module = lr.build_attention(name, dim=DIM, heads=HEADS, window=8, block_size=2)
    assert module.config.tile == 2
    with pytest.raises(TypeError, match="give 'tile' only"):
        lr.build_attention(name, dim=DIM, heads=HEADS, window=8, block_size=2, tile=2)


@pytest.mark.parametrize("name", ["local", "dilated", "longformer"])
def test_tile_must_divide_the_window(name):
    with pytest.raises(ValueError, match=r"tile=2 must divide .* window // 2 = 3"):
        lr.build_attention(name, dim=DIM, heads=HEADS, window=6, tile=2)


@pytest.mark.parametrize("name", ["local", "longformer", "dilated"])
@pytest.mark.parametrize("window", [-4, 0, 5, 4.0, True])
def test_window_must_be_positive_even_int(name, window):
    # 4.0 and True are caught by the type check of every field (an int), -4, 0 and 5 by validate()
    with pytest.raises(ValueError, match=r"window must be (a positive even int|an int).*got"):
        lr.build_attention(name, dim=DIM, heads=HEADS, window=window)


@pytest.mark.parametrize("name", lr.list_attentions())
def test_heads_must_divide_dim(name):
    with pytest.raises(ValueError, match=r"heads=3 must divide dim=8"):
        lr.build_attention(name, dim=8, heads=3)


@pytest.mark.parametrize(("key", "value"), [("dim", 0), ("dim", 8.0), ("heads", -1), ("heads", True)])
def test_dim_and_heads_must_be_positive_ints(key, value):
    with pytest.raises(ValueError, match=key):
        lr.build_attention("full", **{"dim": DIM, "heads": HEADS, key: value})


def test_unknown_config_key_and_unknown_mechanism():
    with pytest.raises(TypeError, match="num_random_block"):
        lr.build_attention("bigbird", dim=DIM, heads=HEADS, num_random_block=2)
    with pytest.raises(ValueError, match=r"unknown attention 'linformr'.*bigbird"):
        lr.build_attention("linformr", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match=r"config is for attention 'local', not 'bigbird'"):
        lr.mechanisms.config_class("bigbird").from_dict({"attention": "local"})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("bigbird", {"window_blocks": 2}, "window_blocks must be odd"),
        ("bigbird", {"num_random_blocks": -1}, "num_random_blocks"),
        ("bigbird", {"block_size": 0}, "block_size"),
        ("bigbird", {"random_in_eval": "sometimes"}, "random_in_eval"),
        ("bigbird", {"global_blocks_first": -1}, "global_blocks_first"),
        ("dilated", {"window": 4, "dilation": (1, 2, 3)}, r"dilation needs one value per head \(2\)"),
        ("dilated", {"window": 4, "dilation": 0}, "dilation"),
        ("longformer", {"window": 4, "causal": True}, "'longformer' has no causal variant"),
        ("sparse_transformer", {"mode": "banded"}, "mode"),
        ("sparse_transformer", {"mode": "fixed", "stride": 4, "c": 5}, "c=5 must be at most stride=4"),
        ("sparse_transformer", {"stride": 0}, "stride"),
        ("xl", {"tile": 0}, "tile"),
        ("compressive", {"backend": "cuda"}, "backend"),
    ],
)
def test_invalid_mechanism_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention(name, dim=DIM, heads=HEADS, **options)


def test_module_needs_its_own_config_class():
    local_config = lr.mechanisms.config_class("local")(dim=DIM, heads=HEADS, window=4)
    with pytest.raises(TypeError, match="BigBirdAttention needs a BigBirdConfig"):
        lr.mechanisms.BigBirdAttention(local_config)


# -- engine inputs --------------------------------------------------------------------------------------
def test_qkv_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q, k, v must share shape"):
        lr.sparse_attention(q, k[:, :, :5], v, Window(1), tile=2)
    with pytest.raises(ValueError, match=r"q, k, v must share shape"):
        lr.sparse_attention(q, k, v[..., :3], Window(1), tile=2)
    with pytest.raises(ValueError, match=r"k must be a 4-d tensor"):
        lr.sparse_attention(q, k[0], v, Window(1), tile=2)


def test_qkv_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        lr.sparse_attention(q, k.double(), v, Window(1), tile=2)
    with pytest.raises(TypeError, match="v must be a floating-point tensor"):
        lr.sparse_attention(q, k, v.long(), Window(1), tile=2)


def test_per_head_pattern_with_wrong_head_count():
    q, k, v = qkv(h=2)
    with pytest.raises(ValueError, match=r"pattern is defined for 3 heads, but q has 2 heads"):
        lr.sparse_attention(q, k, v, Dilated(1, dilation=(1, 2, 3)), tile=2)
    with pytest.raises(ValueError, match=r"pattern is defined for 4 heads, but q has 2 heads"):
        lr.sparse_attention(q, k, v, Window(1) | RandomBlocks(1, 2, num_heads=4), tile=2)


def test_patterns_for_different_head_counts_do_not_combine():
    with pytest.raises(ValueError, match=r"different head counts: \[2, 3\]"):
        Dilated(1, dilation=(1, 2)) | Dilated(1, dilation=(1, 2, 3))


def test_engine_key_padding_mask_and_pattern_type():
    q, k, v = qkv(b=2, n=6)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, N\] = \[2, 6\]"):
        lr.sparse_attention(q, k, v, Window(1), tile=2, key_padding_mask=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must have dtype torch.bool"):
        lr.sparse_attention(q, k, v, Window(1), tile=2, key_padding_mask=torch.ones(2, 6))
    with pytest.raises(TypeError, match="pattern must be a longrange Pattern or BlockLayout, got Tensor"):
        lr.sparse_attention(q, k, v, torch.ones(6, 6, dtype=torch.bool), tile=2)
    with pytest.raises(ValueError, match="layout was compiled for length 8, but q has length 6"):
        lr.sparse_attention(q, k, v, lr.compile_layout(Window(1), 8, 2))
    with pytest.raises(ValueError, match="tile must be a positive int"):
        lr.sparse_attention(q, k, v, Window(1), tile=0)


def test_reference_rejects_non_bool_mask():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        lr.reference_attention(q, k, v, torch.ones(6, 6))


# -- pattern constructors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: Window(-1), ValueError, "radius must be a non-negative int"),
        (lambda: Window(1.5), ValueError, "radius"),
        (lambda: Dilated(1, dilation=0), ValueError, "dilation must be a positive int"),
        (lambda: Dilated(1, dilation=()), ValueError, "dilation must be an int or a non-empty sequence"),
        (lambda: Band(2, 1), ValueError, "lo <= hi"),
        (lambda: Band(0, 1, unit=0), ValueError, "unit"),
        (lambda: Segments(0), ValueError, "length"),
        (lambda: SummaryColumns(2, 3), ValueError, "c=3 must be at most stride=2"),
        (lambda: RandomBlocks(-1, 2), ValueError, "num_blocks"),
        (lambda: RandomBlocks(1, 2, num_heads=0), ValueError, "num_heads"),
        (lambda: lr.compile_layout(Window(1), 0, 2), ValueError, "n must be a positive int"),
        (lambda: lr.compile_layout(Global([0]), 4, -2), ValueError, "tile"),
    ],
)
def test_bad_pattern_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
