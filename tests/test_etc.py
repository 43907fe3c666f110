"""ETC (`etc` attention, `ETCEncoder`, `etc_structure`) against dense references written out here,
in float64, outputs and gradients; the engine's `score_bias` hook; cost and memory; bad input.

Relative labels (the convention these tests pin down): long→long and global→global pairs get
clip(j - i, -k, k) + k with i, j counted inside their own sequence; every global↔long pair the
single label CROSS = 2k + 1.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longrange as lr
from conftest import assert_close
from longrange.models import ETCEncoder, ModelConfig, etc_structure
from longrange.sparse import block_sparse_attention
from longrange.sparse.layout import compile_layout

DIM, HEADS = 8, 2


def build(dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    opts = {"radius": 2, "max_distance": 2, "tile": 2, **options}
    return lr.build_attention("etc", dim=DIM, heads=HEADS, **opts).to(dtype)


def inputs(b, total, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, total, DIM, generator=gen, dtype=torch.float64).to(dtype)


def random_masks(b, g, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"long_to_global": torch.rand(b, n, g, generator=gen) > 0.4,
            "global_to_long": torch.rand(b, g, n, generator=gen) > 0.5,
            "global_to_global": torch.rand(b, g, g, generator=gen) > 0.3}


# -- the dense reference, written pair by pair -------------------------------------------------------------------------
def pair_label(i, j, g, k):
    """Relative label of query i, key j in the concatenated [global ; long] sequence."""
    if (i < g) != (j < g):
        return 2 * k + 1  # CROSS
    a, c = (i, j) if i < g else (i - g, j - g)
    return max(-k, min(k, c - a)) + k


def pair_allowed(i, j, g, radius, b, masks):
    """May query i see key j (structure only; padding applies on top)."""
    if i >= g and j >= g:
        return abs(i - j) <= radius
    name = {(False, True): "long_to_global", (True, False): "global_to_long", (True, True): "global_to_global"}[
        (i < g, j < g)]
    m = masks.get(name)
    if m is None:
        return True
    ii, jj = (i - g if i >= g else i), (j - g if j >= g else j)
    return bool(m[b, ii, jj])


def dense_etc(module, x, keep=None, num_global=0, radius=None, **masks):
    """softmax over every allowed key of [global ; long] with score q_i·(k_j + a_label(i, j)) / √D."""
    cfg = module.config
    b, total, _ = x.shape
    g, h, d, kdist = num_global, cfg.heads, cfg.head_dim, cfg.max_distance
    radius = cfg.radius if radius is None else radius
    w_long = module.qkv.weight, module.qkv.bias
    w_glob = w_long if module.qkv_global is None else (module.qkv_global.weight, module.qkv_global.bias)
    qkv = torch.cat([torch.nn.functional.linear(x[:, :g], *w_glob), torch.nn.functional.linear(x[:, g:], *w_long)], 1)
    q, k, v = (t.view(b, total, h, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, H, N, D)
    a = module.relative.weight.view(-1, h, d)  # (L, H, D)
    labels = torch.tensor([[pair_label(i, j, g, kdist) for j in range(total)] for i in range(total)])
    allowed = torch.tensor([[[pair_allowed(i, j, g, radius, e, masks) for j in range(total)] for i in range(total)]
                            for e in range(b)])  # (B, N, N)
    if keep is not None:
        allowed &= keep[:, None, :]
    rel = a[labels].permute(2, 0, 1, 3)  # (H, N, N, D): a_label(i, j)
    scores = (torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum("bhid,hijd->bhij", q, rel)) / d**0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed[:, None].any(-1, keepdim=True), probs, 0.0)  # rows with no key: zeros
    o = probs @ v  # (B, H, N, D)
    return module.out(o.transpose(1, 2).reshape(b, total, h * d))


def outputs_and_grads(fn, module, x):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = fn(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    y.backward(upstream)
    grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for name, p in module.named_parameters()}
    return y.detach(), x.grad.clone(), grads


def assert_matches(module, x, reference, **kwargs):
    y, gx, gp = outputs_and_grads(lambda t: module(t, **kwargs), module, x)
    y_ref, gx_ref, gp_ref = outputs_and_grads(reference, module, x)
    assert_close(y, y_ref, msg="output")
    assert_close(gx, gx_ref, msg="grad x")
    for name in gp:
        assert_close(gp[name], gp_ref[name], msg=f"grad {name}")
    return y


# -- equal to dense attention -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(("g", "n"), [(0, 7), (1, 1), (3, 9), (2, 13), (3, 0)])
def test_wide_window_without_masks_is_full_attention_with_relative_bias(g, n, share):
    """r >= n, no structure mask: ETC is full attention over [global ; long] with the relative bias."""
    module = build(radius=n + 1, tile=4, share_global_projections=share)
    x = inputs(2, g + n)
    assert_matches(module, x, lambda t: dense_etc(module, t, num_global=g, radius=10**6), num_global=g)


@pytest.mark.parametrize("options", [{}, {"share_global_projections": False}, {"radius": 3, "tile": 4},
                                     {"radius": 5, "max_distance": 1, "tile": 8}, {"radius": 1, "tile": 1}])
@pytest.mark.parametrize(("g", "n"), [(2, 11), (4, 17), (1, 6)])
def test_structured_masks_and_padding_equal_the_dense_construction(g, n, options):
    module = build(**options)
    b = 3
    x = inputs(b, g + n, seed=g + n)
    keep = torch.ones(b, g + n, dtype=torch.bool)
    keep[1, g - 1] = False  # a padded global token
    keep[1, -3:] = False  # padded long tokens
    keep[2, g:] = False  # no real long token at all
    masks = random_masks(b, g, n)
    y = assert_matches(module, x, lambda t: dense_etc(module, t, keep, g, **masks), attention_mask=keep,
                       num_global=g, **masks)
    assert torch.isfinite(y).all()
    # the module's own oracle agrees too (the registry-wide tests use it)
    assert_close(y, module.reference_forward(x, attention_mask=keep, num_global=g, **masks).detach())


@pytest.mark.parametrize("which", ["long_to_global", "global_to_long", "global_to_global"])
def test_each_mask_alone(which):
    g, n, b = 3, 10, 2
    module = build(radius=3, tile=2)
    masks = {which: random_masks(b, g, n, seed=5)[which]}
    x = inputs(b, g + n, seed=3)
    assert_matches(module, x, lambda t: dense_etc(module, t, None, g, **masks), num_global=g, **masks)


def test_gradcheck_tiny():
    g, n = 2, 5
    module = build(radius=1, tile=2, share_global_projections=False)
    masks = random_masks(1, g, n, seed=2)
    keep = torch.ones(1, g + n, dtype=torch.bool)
    keep[0, -1] = False
    x = inputs(1, g + n).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t, attention_mask=keep, num_global=g, **masks), (x,))
    rel = module.relative.weight
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(module, {"relative.weight": w}, (x.detach(),),
                                             {"attention_mask": keep, "num_global": g, **masks}), (rel.detach().clone()
                                                                                                   .requires_grad_(),))


def test_relative_positions_change_the_output():
    module = build(radius=3, tile=2)
    x = inputs(1, 12)
    y = module(x, num_global=2)
    with torch.no_grad():
        module.relative.weight.zero_()
    assert not torch.allclose(module(x, num_global=2), y)


# -- padding, empty rows ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fully_padded_and_isolated_rows_are_zero_never_nan(dtype):
    g, n = 2, 7
    module = build(dtype=dtype, bias=False)
    x = inputs(2, g + n, dtype=dtype).requires_grad_(True)
    keep = torch.ones(2, g + n, dtype=torch.bool)
    keep[1] = False  # example 1 fully padded
    g2g = torch.ones(2, g, g, dtype=torch.bool)
    g2l = torch.ones(2, g, n, dtype=torch.bool)
    g2g[0, 1], g2l[0, 1] = False, False  # global token 1 of example 0 may see no key at all
    y = module(x, attention_mask=keep, num_global=g, global_to_global=g2g, global_to_long=g2l)
    assert not y.isnan().any()
    assert (y[1] == 0).all() and (y[0, 1] == 0).all()
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad.float()).all(), name


def test_padding_does_not_reach_real_tokens():
    g, n = 2, 9
    module = build(radius=2)
    x = inputs(1, g + n)
    keep = torch.ones(1, g + n, dtype=torch.bool)
    keep[0, -4:] = False
    bumped = x.clone()
    bumped[0, -4:] += 5.0
    y, y2 = module(x, attention_mask=keep, num_global=g), module(bumped, attention_mask=keep, num_global=g)
    assert torch.equal(y[0, : g + n - 4], y2[0, : g + n - 4])


# -- lengths: no absolute positions ------------------------------------------------------------------------------------
def test_long_inputs_match_the_dense_oracle_and_are_translation_invariant():
    module = build(radius=4, max_distance=3, tile=4)
    g, n = 3, 301  # far longer than any other test
    x = inputs(1, g + n, seed=11)
    assert_close(module(x, num_global=g), module.reference_forward(x, num_global=g))
    # without global tokens a token's output depends only on its neighbourhood, not its index
    long = inputs(1, 40, seed=12)
    shifted = torch.cat([inputs(1, 17, seed=13), long], dim=1)
    assert_close(module(shifted)[:, 17 + 4 :], module(long)[:, 4:])


# -- the engine hook ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("pattern", ["window", "window+global"])
def test_engine_score_bias_and_per_query_extra_keys(pattern, grad):
    """block_sparse_attention(score_bias=f, extra_kv=(k_e, v_e, keep [B, N, g])) equals softmax(q kᵀ/√D + bias)
    over the dense mask, with bias[i, j] = f's value for the pair (here a function of i and j)."""
    from longrange.patterns import Global, Window

    b, h, n, d, ge, bsz = 2, 2, 13, 4, 3, 4
    pat = Window(3) if pattern == "window" else Window(3) | Global([5])
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float64 if grad else torch.float32
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    k_e, v_e = (torch.randn(b, h, ge, d, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    keep_e = torch.rand(b, n, ge, generator=gen) > 0.4
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, -2:] = False
    w = torch.randn(h, 2 * n + 1, generator=gen, dtype=torch.float64).to(dtype)  # bias per head and offset
    extra_bias = torch.randn(h, ge, generator=gen, dtype=torch.float64).to(dtype)

    def bias(q_tok, kv_tok):  # (R, r), (Hp, R, c) -> (1, R, H, r, c + ge)
        off = (kv_tok[0][:, None, :] - q_tok[:, :, None]).clamp(-n, n) + n  # (R, r, c)
        block = w[:, off].permute(1, 0, 2, 3)  # (R, H, r, c)
        extra = extra_bias[None, :, None, :].expand(q_tok.shape[0], h, q_tok.shape[1], ge)
        return torch.cat([block, extra], dim=-1)[None]

    layout = compile_layout(pat, n, bsz)
    ts = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    with torch.set_grad_enabled(grad):
        got = block_sparse_attention(*ts, layout, keep, extra_kv=(k_e, v_e, keep_e), score_bias=bias,
                                     chunk_bytes=None if grad else 1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    dense_bias = torch.cat([w[:, (j - i).clamp(-n, n) + n], extra_bias[:, None, :].expand(h, n, ge)], dim=-1)
    mask = torch.cat([pat.to_dense(n)[None].expand(b, n, n) & keep[:, None, :], keep_e], dim=-1)[:, None]
    ref_ts = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    kk, vv = torch.cat([ref_ts[1], k_e], 2), torch.cat([ref_ts[2], v_e], 2)
    scores = (ref_ts[0] @ kk.transpose(-1, -2)) / d**0.5 + dense_bias
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    want = torch.where(mask.any(-1, keepdim=True), probs, 0.0) @ vv
    tol = {"atol": 1e-10, "rtol": 1e-8} if grad else {"atol": 2e-5, "rtol": 1e-4}
    torch.testing.assert_close(got, want, **tol)
    if grad:
        up = torch.randn(got.shape, generator=gen, dtype=torch.float64)
        for a, c in zip(torch.autograd.grad(got, ts, up), torch.autograd.grad(want, ref_ts, up), strict=True):
            torch.testing.assert_close(a, c, **tol)


def test_engine_rejects_badly_shaped_extra_keys():
    q = k = v = torch.randn(1, 2, 8, 4)
    layout = compile_layout(lr.patterns.Window(1), 8, 2)
    with pytest.raises(ValueError, match=r"extra_kv keep mask must be bool \[B, g\] = \[1, 3\] or \[B, N, g\]"):
        block_sparse_attention(q, k, v, layout, extra_kv=(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
                                                          torch.ones(1, 7, 3, dtype=torch.bool)))


# -- cost and memory ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"share_global_projections": False, "radius": 3, "tile": 4}])
@pytest.mark.parametrize(("g", "n"), [(0, 33), (3, 40), (5, 21)])
def test_macs_equal_counted_flops_with_global_tokens(g, n, options):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module = build(dtype=torch.float32, **options).eval()
    x = inputs(1, g + n, dtype=torch.float32)
    masks = random_masks(1, g, n)
    for kwargs in ({}, masks):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            module(x, num_global=g, **kwargs)
        assert counter.get_total_flops() == 2 * module.macs(g + n, global_tokens=g).total


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_memory_is_linear_in_n_never_n_squared(grad):
    """Fixed g and r: the largest intermediate grows like n (forward and backward), far below n²."""
    g, radius = 4, 8
    module = build(dtype=torch.float32, radius=radius, max_distance=4, tile=8)
    sizes = {}
    for n in (512, 1024):
        x = inputs(1, g + n, dtype=torch.float32).requires_grad_(grad)
        masks = random_masks(1, g, n)
        with LargestTensor() as probe, torch.set_grad_enabled(grad):
            y = module(x, num_global=g, **masks)
            if grad:
                y.sum().backward()
        sizes[n] = probe.largest
        assert probe.largest < n * n / 8, (n, probe.largest)
    assert sizes[1024] <= 2.2 * sizes[512], sizes


# -- structure helper --------------------------------------------------------------------------------------------------
def dense_structure(sent, para, tokens_see_paragraph=False):
    """Links by loops: l2g [n, g], g2g [g, g] for one example (sentences first, then paragraphs)."""
    s_count = max(sent) + 1
    p_count = (max(para) + 1) if para is not None else 0
    g = s_count + p_count
    l2g = torch.zeros(len(sent), g, dtype=torch.bool)
    g2g = torch.ones(g, g, dtype=torch.bool)
    for t, s in enumerate(sent):
        if s >= 0:
            l2g[t, s] = True
            if para is not None and tokens_see_paragraph:
                l2g[t, s_count + para[t]] = True
    if para is not None:
        g2g[:s_count, s_count:] = False
        g2g[s_count:, :s_count] = False
        for t, s in enumerate(sent):
            if s >= 0:
                g2g[s, s_count + para[t]] = g2g[s_count + para[t], s] = True
    return l2g, g2g


def test_structure_from_separator_ids_with_padding_and_different_sentence_counts():
    dot, par, pad = 7, 8, 0
    ids = torch.tensor([[3, 4, dot, 5, 6, 9, par, 4, 3, dot, 5, 0],
                        [3, dot, 4, dot, 5, dot, 6, par, 9, 9, 0, 0]])
    keep = ids != pad
    st = etc_structure(ids, attention_mask=keep, sentence_end_ids=[dot], paragraph_end_ids=[par])
    sent = [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, -1], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1]]
    para = [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, -1, -1]]
    assert st.sentence_ids.tolist() == sent and st.paragraph_ids.tolist() == para
    s_max, p_max = 5, 2
    assert st.num_global == s_max + p_max
    assert st.global_attention_mask.tolist() == [[True] * 4 + [False] + [True] * 2, [True] * 7]
    assert st.global_ids.tolist() == [[1, 1, 1, 1, 0, 2, 2], [1, 1, 1, 1, 1, 2, 2]]
    assert st.global_type_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1]]
    for e in range(2):
        l2g, g2g = dense_structure(sent[e], para[e])
        real = st.global_attention_mask[e]
        s_count = max(sent[e]) + 1
        cols = list(range(s_count)) + [s_max + p for p in range(max(para[e]) + 1)]
        assert torch.equal(st.long_to_global[e][:, cols], l2g)
        assert not st.long_to_global[e][:, ~real].any()
        assert torch.equal(st.global_to_long[e], st.long_to_global[e].T)
        assert torch.equal(st.global_to_global[e][cols][:, cols], g2g)
        assert not st.global_to_global[e][~real].any() and not st.global_to_global[e][:, ~real].any()


def test_structure_from_segment_ids_paragraph_links_and_cls():
    sent = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, -1, -1, -1]])
    para = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, -1, -1, -1]])
    st = etc_structure(sentence_ids=sent, paragraph_ids=para, tokens_see_paragraph=True, cls_token_id=5)
    assert st.num_global == 1 + 3 + 2
    assert st.global_ids[:, 0].tolist() == [5, 5]
    assert st.global_attention_mask.tolist() == [[True] * 6, [True, True, True, False, True, False]]
    l2g, g2g = dense_structure(sent[0].tolist(), para[0].tolist(), tokens_see_paragraph=True)
    assert torch.equal(st.long_to_global[0, :, 1:], l2g)
    assert st.long_to_global[0, :, 0].all() and st.long_to_global[1, :, 0].tolist() == [True] * 3 + [False] * 3
    assert torch.equal(st.global_to_global[0, 1:, 1:], g2g) and st.global_to_global[0, 0].all()
    # without paragraphs: global→global is free (None), one global per sentence
    st = etc_structure(sentence_ids=sent)
    assert st.global_to_global is None and st.num_global == 3 and st.paragraph_ids is None
    # sentence ids from separators without a paragraph separator, paragraphs=True: one paragraph per example
    st = etc_structure(torch.tensor([[4, 7, 4, 4]]), sentence_end_ids=[7], paragraphs=True)
    assert st.paragraph_ids.tolist() == [[0, 0, 0, 0]] and st.num_global == 3


def test_structure_masks_run_through_the_attention_and_equal_the_dense_reference():
    ids = torch.tensor([[3, 4, 7, 5, 6, 7, 4, 9, 3, 7, 5, 0, 0], [3, 7, 4, 7, 5, 7, 6, 9, 9, 9, 9, 9, 9]])
    keep = ids != 0
    st = etc_structure(ids, attention_mask=keep, sentence_end_ids=[7], paragraphs=True)
    module = build(radius=2)
    g, n = st.num_global, ids.shape[1]
    x = inputs(2, g + n, seed=4)
    joint = torch.cat([st.global_attention_mask, keep], dim=1)
    masks = {"long_to_global": st.long_to_global, "global_to_long": st.global_to_long,
             "global_to_global": st.global_to_global}
    assert_matches(module, x, lambda t: dense_etc(module, t, joint, g, **masks), attention_mask=joint,
                   num_global=g, **masks)


def test_structure_bad_input():
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        etc_structure()
    with pytest.raises(ValueError, match="sentence_end_ids"):
        etc_structure(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sentence_ids must be an integer tensor \[B, n\]"):
        etc_structure(sentence_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"paragraph_ids must have the shape of sentence_ids \[B, n\] = \[1, 3\]"):
        etc_structure(sentence_ids=torch.zeros(1, 3, dtype=torch.long),
                      paragraph_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of shape \[B, N\] = \[1, 4\]"):
        etc_structure(torch.ones(1, 4, dtype=torch.long), sentence_end_ids=[1], attention_mask=torch.ones(1, 5))


# -- ETCEncoder --------------------------------------------------------------------------------------------------------
VOCAB = 30


def tiny(**changes):
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=2, ffn_dim=32, max_length=16, dropout=0.0,
                attention="etc", attention_options={"radius": 2, "max_distance": 3, "tile": 2})
    return ModelConfig(**{**base, **changes})


def document(b=2, n=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=gen)
    ids[:, 4::5] = 7  # sentence ends
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[-1, n - 6 :] = False
    ids = ids.masked_fill(~keep, 0)
    return ids, keep, etc_structure(ids, attention_mask=keep, sentence_end_ids=[7])


@pytest.mark.parametrize("head", [None, "classification", "token_classification", "masked_lm", "question_answering"])
def test_encoder_heads_forward_backward_and_lengths_beyond_max_length(head):
    model = ETCEncoder(tiny(head=head, num_labels=3))
    ids, keep, st = document(n=23)  # max_length is 16: no position table bounds the input
    targets = {None: {}, "classification": {"labels": torch.tensor([0, 2])},
               "token_classification": {"labels": torch.randint(0, 3, ids.shape).masked_fill(~keep, -100)},
               "masked_lm": {"labels": ids.masked_fill(~keep, -100)},
               "question_answering": {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}}
    out = model(ids, attention_mask=keep, **st.model_inputs(), **targets[head])
    assert out.last_hidden_state.shape == (2, 23, 16)
    assert out.global_last_hidden_state.shape == (2, st.num_global, 16)
    assert torch.isfinite(out.last_hidden_state).all()
    if head is None:
        return
    shapes = {"classification": (2, 3), "token_classification": (2, 23, 3), "masked_lm": (2, 23, VOCAB),
              "question_answering": (2, 23, 2)}
    assert out.logits.shape == shapes[head]
    out.loss.backward()
    assert model.embeddings.word.weight.grad.abs().sum() > 0
    assert model.stack.blocks[0].attention.relative.weight.grad.abs().sum() > 0


def test_classification_pools_the_first_global_token_or_the_long_tokens():
    ids, keep, st = document()
    model = ETCEncoder(tiny(head="classification")).eval()
    out = model(ids, attention_mask=keep, **st.model_inputs())
    torch.testing.assert_close(out.logits, model.head(out.global_last_hidden_state, None))
    no_globals = model(ids, attention_mask=keep)
    torch.testing.assert_close(no_globals.logits, model.head(no_globals.last_hidden_state, keep))
    long_pool = ETCEncoder(tiny(head="classification", global_cls=False, pooling="mean")).eval()
    out = long_pool(ids, attention_mask=keep, **st.model_inputs())
    torch.testing.assert_close(out.logits, long_pool.head(out.last_hidden_state, keep))


def test_encoder_without_globals_and_padding_invariance():
    model = ETCEncoder(tiny()).eval()
    ids, keep, st = document(b=1, n=20)
    keep[0, 14:] = False
    st = etc_structure(ids, attention_mask=keep, sentence_end_ids=[7])
    full = model(ids, attention_mask=keep, **st.model_inputs()).last_hidden_state[:, :14]
    st_short = etc_structure(ids[:, :14], sentence_end_ids=[7])
    alone = model(ids[:, :14], **st_short.model_inputs()).last_hidden_state
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-5)
    assert model(ids).last_hidden_state.shape == (1, 20, 16)


def test_encoder_save_load_is_bit_identical(tmp_path):
    model = ETCEncoder(tiny(head="question_answering", attention_options={
        "radius": 2, "max_distance": 3, "tile": 2, "share_global_projections": False})).eval()
    ids, keep, st = document()
    before = model(ids, attention_mask=keep, **st.model_inputs())
    model.save_pretrained(tmp_path / "etc")
    loaded = ETCEncoder.from_pretrained(tmp_path / "etc")
    after = loaded(ids, attention_mask=keep, **st.model_inputs())
    assert loaded.config == model.config
    assert torch.equal(before.start_logits, after.start_logits) and torch.equal(before.logits, after.logits)
    assert torch.equal(before.global_last_hidden_state, after.global_last_hidden_state)


def test_encoder_checkpointing_gives_the_same_grads():
    ids, keep, st = document()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ETCEncoder(tiny(head="masked_lm", gradient_checkpointing=ckpt)).train()
        model(ids, attention_mask=keep, labels=ids, **st.model_inputs()).loss.backward()
        grads.append(model.stack.blocks[0].attention.relative.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_encoder_reversible_and_autocast():
    ids, keep, st = document()
    model = ETCEncoder(tiny(norm="pre", reversible=True, head="masked_lm"))
    out = model(ids, attention_mask=keep, labels=ids.masked_fill(~keep, -100), **st.model_inputs())
    out.loss.backward()
    assert torch.isfinite(model.stack.blocks[1].attention.relative.weight.grad).all()
    model = ETCEncoder(tiny(head="classification")).eval()
    ref = model(ids, attention_mask=keep, **st.model_inputs()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, attention_mask=keep, **st.model_inputs()).logits
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


def test_encoder_bad_input_names_the_argument():
    model = ETCEncoder(tiny())
    ids, keep, st = document()
    kw = st.model_inputs()
    with pytest.raises(ValueError, match=r"long_to_global must have shape \[B, n, g\]"):
        model(ids, attention_mask=keep, **{**kw, "long_to_global": kw["long_to_global"][:, :-1]})
    with pytest.raises(ValueError, match=r"global_attention_mask must be a tensor of shape \[B, N\]"):
        model(ids, **{**kw, "global_attention_mask": kw["global_attention_mask"][:, :-1]})
    with pytest.raises(ValueError, match=r"global_ids must be \[B, g\] with B = 2"):
        model(ids, global_ids=kw["global_ids"][:1])
    with pytest.raises(ValueError, match="global inputs were given without global_ids"):
        model(ids, long_to_global=kw["long_to_global"])
    with pytest.raises(ValueError, match=r"global_type_ids must be \[B, g\]"):
        model(ids, global_ids=kw["global_ids"], global_type_ids=kw["global_type_ids"][:, :2])
    with pytest.raises(ValueError, match="ETCEncoder needs attention='etc' in every layer"):
        ETCEncoder(tiny(attention="local", attention_options={"window": 4}))


# -- bad input to the attention ----------------------------------------------------------------------------------------
def test_attention_bad_input_names_the_argument():
    module = build(dtype=torch.float32)
    x = torch.randn(2, 9, DIM)
    with pytest.raises(ValueError, match=r"num_global must be an int in \[0, N\] with N = x.shape\[1\] = 9"):
        module(x, num_global=10)
    with pytest.raises(ValueError, match="num_global"):
        module(x, num_global=-1)
    with pytest.raises(ValueError, match="num_global"):
        module(x, num_global=2.0)
    with pytest.raises(ValueError, match=r"long_to_global must have shape \[B, n, g\] = \[2, 6, 3\]"):
        module(x, num_global=3, long_to_global=torch.ones(2, 7, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"global_to_long must have shape \[B, g, n\] = \[2, 3, 6\]"):
        module(x, num_global=3, global_to_long=torch.ones(2, 6, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"global_to_global must have shape \[B, g, g\] = \[2, 3, 3\]"):
        module(x, num_global=3, global_to_global=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"global_to_global must be a bool tensor \[B, g, g\]"):
        module(x, num_global=3, global_to_global=torch.ones(2, 3, 3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        module(x, num_globals=3)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, N\] = \[2, 9\]"):
        module(x, num_global=3, attention_mask=torch.ones(2, 6, dtype=torch.bool))


@pytest.mark.parametrize(("options", "match"), [
    ({"radius": 0}, "radius must be a positive int"), ({"radius": 2.5}, "radius"),
    ({"max_distance": 0}, "max_distance must be a positive int"), ({"max_distance": True}, "max_distance"),
    ({"tile": 0}, "tile"), ({"share_global_projections": "yes"}, "share_global_projections"),
])
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention("etc", dim=DIM, heads=HEADS, **options)
