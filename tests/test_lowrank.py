"""Linformer and Nyström: exact limits against dense softmax attention, their own rules (lengths,
sharing, padding, landmarks), approximation behaviour and low precision at long lengths.
(Both are also enrolled in the registry-wide parity tests of test_mechanisms.py.)"""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from conftest import assert_close, lengths_mask, random_qkv
from longrange.mechanisms.nystrom import pinv

DIM, HEADS = 8, 2


def dense_softmax(q, k, v, keep=None):
    mask = None if keep is None else keep[:, None, None, :]
    return lr.reference_attention(q, k, v, mask)


# -- Linformer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 16])
def test_linformer_with_identity_projections_is_softmax_attention(n):
    q, k, v = random_qkv(2, 3, n, 4)
    eye = torch.eye(n, dtype=torch.float64)
    assert_close(lr.functional.linformer(q, k, v, eye, eye), dense_softmax(q, k, v))
    per_head = eye.expand(3, n, n)
    assert_close(lr.functional.linformer(q, k, v, per_head, None), dense_softmax(q, k, v))


@pytest.mark.parametrize("sharing", ["headwise", "kv", "none"])
def test_linformer_module_with_identity_projections_is_full_attention(sharing):
    n = 12
    torch.manual_seed(0)
    lin = lr.build_attention("linformer", dim=DIM, heads=HEADS, seq_len=n, k=n, sharing=sharing).double()
    full = lr.build_attention("full", dim=DIM, heads=HEADS).double()
    full.load_state_dict(lin.state_dict(), strict=False)
    with torch.no_grad():
        for p in (lin.proj_k, lin.proj_v):
            if p is not None:
                p.copy_(torch.eye(n, dtype=torch.float64).expand_as(p))
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    assert_close(lin(x), full(x))


def test_linformer_shorter_inputs_use_the_first_columns_and_longer_ones_fail():
    module = lr.build_attention("linformer", dim=DIM, heads=HEADS, seq_len=32, k=4).double()
    x = torch.randn(2, 20, DIM, dtype=torch.float64)
    q, k, v = module.project(x)
    expected = module.merge(lr.functional.linformer(q, k, v, module.proj_k[:, :20], module.proj_v[:, :20]))
    assert_close(module(x), expected)
    with pytest.raises(ValueError, match=r"seq_len=32.*length 33"):
        module(torch.randn(1, 33, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"E covers 20 positions but the input has N = 21"):
        q, k, v = random_qkv(1, 2, 21, 4)
        lr.functional.linformer(q, k, v, torch.randn(3, 20, dtype=torch.float64))


@pytest.mark.parametrize("sharing", ["headwise", "none"])
def test_linformer_padded_tokens_never_reach_the_output(sharing):
    n = 10
    module = lr.build_attention("linformer", dim=DIM, heads=HEADS, seq_len=16, k=3, sharing=sharing).double()
    keep = lengths_mask([10, 6], n)
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    noisy = x.clone()
    noisy[1, 6:] = 100 * torch.randn(4, DIM, dtype=torch.float64)
    y, y_noisy = module(x, attention_mask=keep), module(noisy, attention_mask=keep)
    assert_close(y[:, :6], y_noisy[:, :6])
    assert_close(y[0], y_noisy[0])


def test_linformer_sharing_options_and_layerwise_tying():
    shapes = {
        sharing: lr.build_attention("linformer", dim=DIM, heads=HEADS, seq_len=16, k=3, sharing=sharing)
        for sharing in ("none", "headwise", "kv")
    }
    assert shapes["none"].proj_k.shape == (HEADS, 3, 16) and shapes["none"].proj_v.shape == (HEADS, 3, 16)
    assert shapes["headwise"].proj_k.shape == (3, 16) and shapes["headwise"].proj_v is not None
    assert shapes["kv"].proj_v is None and shapes["kv"].projections[0] is shapes["kv"].projections[1]
    first, second = (lr.build_attention("linformer", dim=DIM, heads=HEADS, seq_len=16, k=3) for _ in range(2))
    second.share_projections(first)
    assert second.proj_k is first.proj_k and second.proj_v is first.proj_v
    x = torch.randn(1, 16, DIM)
    second(first(x)).sum().backward()
    assert first.proj_k.grad is not None and torch.count_nonzero(first.proj_k.grad) > 0
    with pytest.raises(ValueError, match="share_projections"):
        second.share_projections(shapes["none"])


# -- Nyström ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 6, 17])
def test_nystrom_with_one_landmark_per_token_is_softmax_attention(n):
    q, k, v = random_qkv(2, 2, n, 4)
    out = lr.functional.nystrom(q, k, v, num_landmarks=n, pinv_iterations=None)
    assert_close(out, dense_softmax(q, k, v))


def test_nystrom_exact_limit_holds_with_padding():
    """Segments of one token: padded segments are empty landmarks, which must drop out exactly."""
    n = 9
    q, k, v = random_qkv(3, 2, n, 4)
    keep = lengths_mask([9, 5, 0], n)
    keep[1, 0] = False
    out = lr.functional.nystrom(q, k, v, num_landmarks=n, key_padding_mask=keep, pinv_iterations=None)
    assert_close(out, dense_softmax(q, k, v, keep))
    assert (out[2] == 0).all()


def test_nystrom_iterative_pseudo_inverse_converges():
    gen = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(4, 8, 8, generator=gen, dtype=torch.float64), dim=-1)
    exact = torch.linalg.inv(a)
    errors = [(pinv(a, it) - exact).abs().max().item() for it in (2, 6, 12, 20)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-8, errors


def test_nystrom_error_falls_as_landmarks_grow():
    """With the paper's iterative pseudo-inverse, more landmarks bring the output closer to softmax
    attention, on average over seeds. (The exact inverse is exact at m = N but unstable below it:
    the landmark kernel of smooth attention is close to singular; measured 0.48 / 1.8 / 1.4 mean
    relative error at m = 2 / 8 / 32 here, against 0.24 / 0.22 / 0.08 with 6 iterations.)"""
    n, errors = 64, {m: 0.0 for m in (2, 8, 32)}
    for seed in range(4):
        q, k, v = random_qkv(1, 2, n, 8, seed=seed)
        exact = dense_softmax(q * 0.5, k * 0.5, v)
        for m in errors:
            approx = lr.functional.nystrom(q * 0.5, k * 0.5, v, num_landmarks=m)
            errors[m] += (approx - exact).norm().item() / exact.norm().item() / 4
    assert errors[2] > errors[8] > errors[32], errors
    assert errors[32] < 0.15, errors


def test_nystrom_example_does_not_depend_on_the_rest_of_the_batch():
    """The pseudo-inverse is scaled per matrix (a peer scales by the batch-wide maximum)."""
    q, k, v = random_qkv(2, 2, 16, 4)
    both = lr.functional.nystrom(q, k, v, num_landmarks=4)
    alone = lr.functional.nystrom(q[:1], k[:1], v[:1], num_landmarks=4)
    assert_close(both[:1], alone)


def test_nystrom_conv_skip_is_a_depthwise_convolution_of_values():
    module = lr.build_attention("nystrom", dim=DIM, heads=HEADS, num_landmarks=2, conv_kernel=3).double()
    plain = lr.build_attention("nystrom", dim=DIM, heads=HEADS, num_landmarks=2).double()
    plain.load_state_dict(module.state_dict(), strict=False)
    x = torch.randn(1, 7, DIM, dtype=torch.float64)
    q, k, v = module.project(x)
    w = module.conv.weight[:, 0, :, 0]  # [H, 3]
    vp = torch.nn.functional.pad(v, (0, 0, 1, 1))
    conv = sum(w[None, :, j, None, None] * vp[:, :, j : j + 7] for j in range(3))
    assert_close(module(x), plain(x) + module.merge(conv) - module.out.bias)


# -- both --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["linformer", "nystrom"])
def test_long_low_precision_inputs_stay_finite(name, dtype):
    n = 8192
    opts = {"seq_len": n, "k": 32} if name == "linformer" else {"num_landmarks": 32}
    fn = {"linformer": lambda q, k, v: lr.functional.linformer(q, k, v, E, E),
          "nystrom": lambda q, k, v: lr.functional.nystrom(q, k, v, opts["num_landmarks"])}[name]
    E = torch.randn(32, n) / n**0.5  # compressed keys of unit scale
    q, k, v = (t * 3 for t in random_qkv(1, 1, n, 8, dtype=torch.float32))
    reference = fn(q, k, v)
    out = fn(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("linformer", {"k": 0}, "k must be a positive int"),
        ("linformer", {"seq_len": -1}, "seq_len must be a positive int"),
        ("linformer", {"sharing": "layer"}, "sharing must be one of"),
        ("nystrom", {"num_landmarks": 0}, "num_landmarks must be a positive int"),
        ("nystrom", {"pinv_iterations": -1}, "pinv_iterations must be a non-negative int"),
        ("nystrom", {"conv_kernel": 4}, "conv_kernel must be odd"),
    ],
)
def test_bad_options_name_the_argument(name, opts, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention(name, dim=DIM, heads=HEADS, **opts)


def test_functional_bad_shapes():
    q, k, v = random_qkv(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"E per head must be \[H, k, M\] with H = 2"):
        lr.functional.linformer(q, k, v, torch.randn(3, 3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_landmarks must be a positive int"):
        lr.functional.nystrom(q, k, v, num_landmarks=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        lr.functional.nystrom(q, k, v, 2, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
