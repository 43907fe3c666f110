"""Parity with HF transformers' Longformer and BigBird attention on shared weights (`lr.hf`).

HF's layers are called the way their models call them: inputs padded to a multiple of the window
(Longformer) or block (BigBird) with `attention_mask` off on the padding, and the model-level
masks built here. Padding positions are filled with noise, so any leak shows. Outputs are
compared on real tokens only (HF zeroes padding rows, we leave them unspecified).

Tolerances follow the dtype:
- float32: both sides round every product and softmax in float32 over <= 64 keys of unit-scale
  scores; 1e-5 absolute / 1e-4 relative is ~100 ulps of headroom for different summation orders.
- float64, BigBird: HF computes in float64 throughout, so 1e-12 (~4000 ulps).
- float64, Longformer: HF's softmax runs in float32 even for float64 inputs
  (`softmax(..., dtype=torch.float32)`), so probabilities carry ~6e-8 relative error: 1e-6.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import longrange as lr

transformers = pytest.importorskip("transformers")
from transformers import BigBirdConfig, LongformerConfig  # noqa: E402
from transformers.models.big_bird.modeling_big_bird import (  # noqa: E402
    BigBirdAttention as HFBigBirdAttention,
)
from transformers.models.big_bird.modeling_big_bird import BigBirdModel  # noqa: E402
from transformers.models.longformer.modeling_longformer import (  # noqa: E402
    LongformerAttention as HFLongformerAttention,
)
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

DIM, HEADS = 32, 4
TOL = {
    ("longformer", torch.float32): {"atol": 1e-5, "rtol": 1e-4},
    ("longformer", torch.float64): {"atol": 1e-6, "rtol": 1e-6},
    ("bigbird", torch.float32): {"atol": 1e-5, "rtol": 1e-4},
    ("bigbird", torch.float64): {"atol": 1e-12, "rtol": 1e-12},
}
DTYPES = [torch.float32, torch.float64]


# -- HF layers called as their models call them ---------------------------------------------------------------------
def pad_with_noise(x: torch.Tensor, keep: torch.Tensor, multiple: int, gen: torch.Generator):
    """Pad [B, N, C] to a multiple of `multiple` with random vectors (masked off in `keep`)."""
    b, n, c = x.shape
    extra = (-n) % multiple
    noise = torch.randn(b, extra, c, generator=gen, dtype=x.dtype)
    return torch.cat([x, noise], dim=1), F.pad(keep, (0, extra), value=False)


def hf_longformer(hf, x, keep, glob, gen):
    """LongformerModel's preprocessing at the layer level: pad to a multiple of the window, mask
    values -10000 (padding) / 0 (local) / +10000 (global), then the layer (`LongformerSelfAttention`
    or its `LongformerAttention` wrapper, which take the same arguments). Returns [B, N, C]."""
    n = x.shape[1]
    window = getattr(hf, "self", hf).one_sided_attn_window_size * 2
    x_p, keep_p = pad_with_noise(x, keep, window, gen)
    glob_p = F.pad(glob, (0, x_p.shape[1] - n), value=False) & keep_p
    mask = torch.zeros(keep_p.shape, dtype=x.dtype)
    mask = mask.masked_fill(~keep_p, -10000.0).masked_fill(glob_p, 10000.0)
    out = hf(
        x_p,
        attention_mask=mask,
        is_index_masked=mask < 0,
        is_index_global_attn=mask > 0,
        is_global_attn=bool((mask > 0).any()),
    )[0]
    return out[:, :n]


def hf_bigbird(hf, x, keep, gen):
    """BigBirdModel's block-sparse preprocessing: pad to a multiple of the block, build its masks."""
    n = x.shape[1]
    x_p, keep_p = pad_with_noise(x, keep, hf.block_size, gen)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        keep_p.to(x.dtype), hf.block_size
    )
    return hf(x_p, band, from_mask, to_mask, blocked, blocked)[0][:, :n]


def longformer_pair(window=8, dtype=torch.float64, layer_id=0, seed=0):
    torch.manual_seed(seed)
    config = LongformerConfig(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        attention_window=[4] * layer_id + [window],
        attention_probs_dropout_prob=0.0,
    )
    hf = LongformerSelfAttention(config, layer_id).to(dtype).eval()
    return hf, lr.hf.attention_from_hf(hf)


def hf_longformer_loss(hf, x, keep, glob, gen):
    """`masked_loss` of HF's output, one example at a time: the reference for float64 gradients.

    In a float64 batch HF's backward is NaN for every example with fewer global tokens than the
    batch's most: their filler global rows get score finfo(float64).min, which its float32 softmax
    turns into -inf, i.e. 0/0 rows whose NaN gradient reaches every key. Run alone, an example has
    no filler rows. (float32 keeps the minimum finite, so float32 batches are fine.)"""
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    total = 0.0
    for i in range(x.shape[0]):
        out = hf_longformer(hf, x[i : i + 1], keep[i : i + 1], glob[i : i + 1], gen)
        total = total + (out * weights[i : i + 1] * keep[i : i + 1, :, None]).sum()
    return total


def bigbird_wrapper(block_size=4, num_random_blocks=2, dtype=torch.float64, seed=0, **extra):
    torch.manual_seed(seed)
    config = BigBirdConfig(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        block_size=block_size,
        num_random_blocks=num_random_blocks,
        attention_type="block_sparse",
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
        **extra,
    )
    return HFBigBirdAttention(config, seed=seed).to(dtype).eval()


def inputs(batch, n, dtype, lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, DIM, generator=gen, dtype=dtype)
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return x, keep, gen


def assert_real_close(actual, expected, keep, tol):
    torch.testing.assert_close(actual[keep], expected[keep], **tol)


def masked_loss(y, keep, seed=2):
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y * weights * keep[..., None]).sum()


# -- conversion ------------------------------------------------------------------------------------------------------
def test_longformer_conversion_config_and_weights():
    hf, ours = longformer_pair(window=8, layer_id=1)
    assert type(ours).__name__ == "LongformerAttention"
    c = ours.config
    assert (c.dim, c.heads, c.window) == (DIM, HEADS, 8)  # the window of layer 1, not layer 0
    torch.testing.assert_close(ours.qkv.weight, torch.cat([hf.query.weight, hf.key.weight, hf.value.weight]))
    torch.testing.assert_close(ours.qkv.bias, torch.cat([hf.query.bias, hf.key.bias, hf.value.bias]))
    glob = torch.cat([hf.query_global.weight, hf.key_global.weight, hf.value_global.weight])
    torch.testing.assert_close(ours.qkv_global.weight, glob)
    torch.testing.assert_close(ours.out.weight, torch.eye(DIM, dtype=torch.float64))
    assert not ours.out.bias.any()
    assert ours.qkv.weight.dtype == torch.float64 and not ours.training
    assert ours.qkv.weight.data_ptr() != hf.query.weight.data_ptr()  # copied, not shared


def test_bigbird_conversion_config():
    hf = bigbird_wrapper(block_size=8, num_random_blocks=1, seed=5, use_bias=False)
    ours = lr.hf.attention_from_hf(hf)
    c = ours.config
    assert type(ours).__name__ == "BigBirdAttention"
    assert (c.dim, c.heads, c.block_size, c.num_random_blocks, c.seed) == (DIM, HEADS, 8, 1, 5)
    assert (c.window_blocks, c.global_blocks_first, c.global_blocks_last, c.random_in_eval) == (3, 1, 1, "none")
    assert not c.bias and ours.qkv.bias is None and ours.out.bias is None
    # use_bias=False but a biased SelfOutput.dense: bias on, q/k/v biases zero
    biased = lr.hf.attention_from_hf(hf, output=hf.output.dense)
    assert biased.config.bias and not biased.qkv.bias.any()
    torch.testing.assert_close(biased.out.bias, hf.output.dense.bias)


def test_unsupported_module_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="torch.nn.modules.linear.Linear"):
        lr.hf.attention_from_hf(torch.nn.Linear(DIM, DIM))
    hf, _ = longformer_pair()
    with pytest.raises(TypeError, match="output must be"):
        lr.hf.attention_from_hf(hf, output=torch.nn.LayerNorm(DIM))


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.models.longformer", None)
    with pytest.raises(ImportError, match=r"pip install longrange\[hf\]"):
        lr.hf.attention_from_hf(torch.nn.Linear(DIM, DIM))


def test_importing_longrange_hf_does_not_import_transformers():
    code = "import sys, longrange as lr; lr.hf.attention_from_hf; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- Longformer -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [24, 21])  # a multiple of the window (8) and not
@pytest.mark.parametrize("with_globals", [False, True])
def test_longformer_matches_hf(dtype, n, with_globals):
    hf, ours = longformer_pair(window=8, dtype=dtype)
    x, keep, gen = inputs(3, n, dtype, lengths=[n, n - 5, 11])
    glob = torch.zeros(3, n, dtype=torch.bool)
    if with_globals:  # several per example, different per example, one with none; 0 and 5 share a window
        glob[0, [0, 5, n - 1]] = True
        glob[1, [2, 9]] = True
    x.requires_grad_(True)
    expected = hf_longformer(hf, x, keep, glob, gen)
    actual = ours(x, attention_mask=keep, global_mask=glob)
    tol = TOL["longformer", dtype]
    assert_real_close(actual, expected, keep, tol)
    loss_hf = masked_loss(expected, keep) if dtype == torch.float32 else hf_longformer_loss(hf, x, keep, glob, gen)
    (grad_hf,) = torch.autograd.grad(loss_hf, x)
    (grad_ours,) = torch.autograd.grad(masked_loss(actual, keep), x)
    # real tokens only: in float64 HF's gradient is also NaN at padding tokens whose whole window
    # is padding (0/0 rows again, filled with 0 forward but not backward). Padding can get no
    # gradient from a masked loss: ours is exactly 0 there.
    assert_real_close(grad_ours, grad_hf, keep, tol)
    assert grad_hf[keep].abs().sum() > 0
    assert not grad_ours[~keep].any()


def test_longformer_weight_gradients_match_hf():
    hf, ours = longformer_pair(window=8)
    x, keep, gen = inputs(2, 16, torch.float64, lengths=[16, 13])
    glob = torch.zeros(2, 16, dtype=torch.bool)
    glob[0, [1, 10]] = True
    glob[1, 4] = True
    hf_longformer_loss(hf, x, keep, glob, gen).backward()  # float64: one example at a time, see there
    masked_loss(ours(x, attention_mask=keep, global_mask=glob), keep).backward()
    tol = TOL["longformer", torch.float64]
    local = torch.cat([hf.query.weight.grad, hf.key.weight.grad, hf.value.weight.grad])
    glob_grad = torch.cat([hf.query_global.weight.grad, hf.key_global.weight.grad, hf.value_global.weight.grad])
    torch.testing.assert_close(ours.qkv.weight.grad, local, **tol)
    torch.testing.assert_close(ours.qkv_global.weight.grad, glob_grad, **tol)
    assert glob_grad.abs().sum() > 0


def test_longformer_wrapper_with_output_dense_matches_hf_layer():
    """HF's LongformerAttention = LayerNorm(dense(context) + x): ours with output=dense, then the same norm."""
    torch.manual_seed(0)
    config = LongformerConfig(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        attention_window=[8],
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    hf = HFLongformerAttention(config).double().eval()
    ours = lr.hf.attention_from_hf(hf, output=hf.output.dense)
    torch.testing.assert_close(ours.out.weight, hf.output.dense.weight)
    x, keep, gen = inputs(2, 16, torch.float64, lengths=[16, 12])
    glob = torch.zeros(2, 16, dtype=torch.bool)
    glob[:, 0] = True
    expected = hf_longformer(hf, x, keep, glob, gen)  # same call signature as the self-attention
    actual = hf.output.LayerNorm(ours(x, attention_mask=keep, global_mask=glob) + x)
    assert_real_close(actual, expected, keep, TOL["longformer", torch.float64])


# -- BigBird ------------------------------------------------------------------------------------------------------
# HF's block-sparse path needs n > (5 + 2r)·b (otherwise its model switches to full attention):
# b=4, r=2 -> n > 36; b=8, r=1 -> n > 56. 41 and 61 are not multiples of the block. Each geometry
# and each dtype meets a multiple and a non-multiple length (kept to four cases for speed).
BIGBIRD_CASES = [
    (4, 2, 44, torch.float64),
    (4, 2, 41, torch.float32),
    (8, 1, 64, torch.float32),
    (8, 1, 61, torch.float64),
]


@pytest.mark.parametrize(("block_size", "r", "n", "dtype"), BIGBIRD_CASES)
def test_bigbird_train_mode_matches_hf_with_aligned_random_blocks(block_size, r, n, dtype):
    hf = bigbird_wrapper(block_size, r, dtype).train()
    ours = lr.hf.attention_from_hf(hf)
    assert ours.training
    x, keep, gen = inputs(2, n, dtype, lengths=[n, n - 7])
    x.requires_grad_(True)
    with lr.hf.aligned_random_blocks(hf, ours):
        expected = hf_bigbird(hf.self, x, keep, gen)
    # on HF's padded length (its last, partly padded block is the global one); see the module notes
    x_p, keep_p = pad_with_noise(x, keep, block_size, torch.Generator().manual_seed(9))
    actual = ours(x_p, attention_mask=keep_p)[:, :n]
    tol = TOL["bigbird", dtype]
    assert_real_close(actual, expected, keep, tol)
    (grad_hf,) = torch.autograd.grad(masked_loss(expected, keep), x)
    (grad_ours,) = torch.autograd.grad(masked_loss(actual, keep), x)
    torch.testing.assert_close(grad_ours, grad_hf, **tol)
    # the random blocks matter: without them the outputs differ
    ours.config.num_random_blocks = 0
    ours.forget_layouts()
    assert not torch.allclose(ours(x_p, attention_mask=keep_p)[:, :n][keep], expected[keep], **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bigbird_eval_mode_with_aligned_random_blocks_matches_ours_same(dtype):
    hf = bigbird_wrapper(4, 2, dtype)
    ours = lr.hf.attention_from_hf(hf, random_in_eval="same")
    assert not ours.training
    x, keep, gen = inputs(2, 44, dtype, lengths=[44, 30])
    with lr.hf.aligned_random_blocks(hf, ours):
        expected = hf_bigbird(hf.self, x, keep, gen)
    assert_real_close(ours(x, attention_mask=keep), expected, keep, TOL["bigbird", dtype])
    # outside the block HF's own helpers are back
    assert "_bigbird_block_rand_mask_with_head" not in vars(hf.self)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bigbird_eval_mode_is_ours_without_random_blocks_except_hf_repeats_block_0(dtype):
    """HF's eval mode sets every random block id to 0 instead of dropping the random blocks, so
    for query blocks 1 .. nb-2 the first (global) block enters the softmax 1 + r times. Ours with
    `random_in_eval="none"` has exactly HF's eval graph: the global rows agree, and the other rows
    agree with our graph once block 0's scores get HF's multiplicity (+ log(1 + r))."""
    b, r, n = 4, 2, 44
    hf = bigbird_wrapper(b, r, dtype)
    ours = lr.hf.attention_from_hf(hf)
    x, keep, gen = inputs(2, n, dtype, lengths=[n, 37])
    expected = hf_bigbird(hf.self, x, keep, gen)
    actual = ours(x, attention_mask=keep)
    tol = TOL["bigbird", dtype]
    rows = torch.zeros(n, dtype=torch.bool)
    rows[:b] = rows[-b:] = True  # the two global query blocks
    assert_real_close(actual[:, rows], expected[:, rows], keep[:, rows], tol)
    assert not torch.allclose(actual[:, ~rows][keep[:, ~rows]], expected[:, ~rows][keep[:, ~rows]], **tol)
    # our graph + HF's multiplicity of block 0 == HF's eval output
    q, k, v = ours.project(x)
    bias = torch.zeros(n, n, dtype=dtype)
    bias[b : n - b, :b] = math.log(1 + r)
    allowed = ours.dense_mask(n)[None, None] & keep[:, None, None, :]
    bias = bias.masked_fill(~allowed, float("-inf"))  # [B, 1, n, n]
    simulated = ours.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    assert_real_close(simulated, expected, keep, tol)


def test_bigbird_full_mode_maps_to_full():
    torch.manual_seed(0)
    config = BigBirdConfig(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        attention_type="original_full",
        attention_probs_dropout_prob=0.0,
    )
    hf = HFBigBirdAttention(config).double().eval()
    ours = lr.hf.attention_from_hf(hf)
    assert type(ours).__name__ == "FullAttention" and not ours.config.causal
    x, keep, _ = inputs(2, 10, torch.float64, lengths=[10, 6])
    additive = torch.zeros(2, 1, 1, 10, dtype=torch.float64).masked_fill(~keep[:, None, None, :], -1e9)
    expected = hf.self(x, attention_mask=additive)[0]
    assert_real_close(ours(x, attention_mask=keep), expected, keep, TOL["bigbird", torch.float64])


def test_aligned_random_blocks_rejects_wrong_modules():
    hf = bigbird_wrapper(4, 2)
    with pytest.raises(TypeError, match="BigBirdBlockSparseAttention"):
        with lr.hf.aligned_random_blocks(torch.nn.Linear(2, 2), lr.hf.attention_from_hf(hf)):
            pass
    no_random = lr.build_attention("bigbird", dim=DIM, heads=HEADS, block_size=4, num_random_blocks=0)
    with pytest.raises(ValueError, match="num_random_blocks"):
        with lr.hf.aligned_random_blocks(hf, no_random):
            pass
