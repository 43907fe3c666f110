"""Issue 13, second part: `inducing` (Set Transformer), `synthesizer`, `memory_compressed`, and the
Encoder's Funnel downsampling and Switch mixture-of-experts feed-forward.

Exact limits against dense softmax attention in float64 (outputs and gradients), an ISAB oracle
written here, causality, padding, low precision, bad options, the MoE layer by hand, the Funnel
against the plain Encoder, and checkpoints. (Each mechanism is also in the registry-wide tests of
test_mechanisms.py / test_flops.py / test_bad_input.py through its `test_configs`.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import longrange as lr
from conftest import LOW_PRECISION, assert_close, assert_error_within_factor, lengths_mask
from longrange.mechanisms import ATTENTIONS
from longrange.models import CausalLM, Encoder, ModelConfig
from longrange.models.funnel import Pooling, pooled_query_attention
from longrange.nn import FeedForward, SwitchFeedForward, TransformerBlock

DIM, HEADS, BATCH = 8, 2, 2
NEW = ("inducing", "synthesizer", "memory_compressed")


def build(name, dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    return lr.build_attention(name, **{"dim": DIM, "heads": HEADS, **options}).to(dtype)


def inputs(n, b=BATCH, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=gen, dtype=torch.float64).to(dtype)


def padding(n):
    keep = torch.ones(BATCH, n, dtype=torch.bool)
    keep[1, 0] = False
    keep[1, n - n // 3:] = False
    return keep


def run_with_grads(fn, x, params, upstream):
    """fn(x) and the gradients of x and of `params` (a dict name -> tensor) for the upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    for p in params.values():
        p.grad = None
    y = fn(x)
    y.backward(upstream)
    return y.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in params.items()}


def full_attention(q, k, v, mask):
    """softmax(q kᵀ / √D) v over allowed keys, written out; a row with no key gives zeros."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


# -- exact limits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("padded", [False, True])
def test_memory_compressed_stride_one_identity_convolution_is_full_attention(causal, block_size, padded):
    """compression 1 with the identity convolution (and, with blocks, one block covering the input):
    exactly full attention, outputs and every shared gradient, in float64."""
    n = 13
    full = build("full", causal=causal)
    mca = build("memory_compressed", compression=1, block_size=block_size, causal=causal)
    with torch.no_grad():
        for conv in (mca.compress_k, mca.compress_v):
            conv.weight.copy_(torch.eye(DIM, dtype=torch.float64)[:, :, None])
            conv.bias.zero_()
        mca.qkv.load_state_dict(full.qkv.state_dict())
        mca.out.load_state_dict(full.out.state_dict())
    x, keep = inputs(n), padding(n) if padded else None
    upstream = inputs(n, seed=3)
    shared = ("qkv.weight", "qkv.bias", "out.weight", "out.bias")
    y, gx, gp = run_with_grads(lambda t: mca(t, attention_mask=keep), x,
                               {k: dict(mca.named_parameters())[k] for k in shared}, upstream)
    y_ref, gx_ref, gp_ref = run_with_grads(lambda t: full(t, attention_mask=keep), x,
                                           {k: dict(full.named_parameters())[k] for k in shared}, upstream)
    assert_close(y, y_ref, msg="output")
    assert_close(gx, gx_ref, msg="grad x")
    for key in shared:
        assert_close(gp[key], gp_ref[key], msg=key)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_synthesizer_random_with_dot_product_logits_is_full_attention(causal, padded):
    """A fixed random synthesizer whose table holds q·kᵀ/√D (of one known input) is full attention on
    that input: the output, the gradients of x and of the value/output projections (through V), and the
    gradient of the table equal to the gradient of the logits."""
    n = 11
    full = build("full", causal=causal)
    syn = build("synthesizer", mode="random", max_length=16, causal=causal)
    x = inputs(n, b=1)
    keep = lengths_mask([8], n) if padded else None
    with torch.no_grad():
        syn.value.weight.copy_(full.qkv.weight[2 * DIM:])
        syn.value.bias.copy_(full.qkv.bias[2 * DIM:])
        syn.out.load_state_dict(full.out.state_dict())
        q, k, _ = full.project(x)  # (1, H, N, D)
        logits = (q @ k.transpose(-1, -2))[0] / math.sqrt(DIM // HEADS)  # (H, N, N)
        syn.random[:, :n, :n] = logits
    assert_close(syn(x, attention_mask=keep), full(x, attention_mask=keep))

    # the dense reference with the logits as a leaf: gradients through V, and of the logits themselves
    s = logits.clone().requires_grad_(True)
    mask = torch.ones(n, n, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if keep is not None:
        mask = mask & keep[0][None, :]

    def reference(t):
        v = full.split_heads(F.linear(t, full.qkv.weight[2 * DIM:], full.qkv.bias[2 * DIM:]))
        return full.merge(torch.softmax(s[None].masked_fill(~mask, float("-inf")), dim=-1) @ v)

    params = {"value.weight": syn.value.weight, "out.weight": syn.out.weight, "random": syn.random}
    upstream = inputs(n, b=1, seed=5)
    y, gx, gp = run_with_grads(lambda t: syn(t, attention_mask=keep), x, params, upstream)
    ref_params = {"value.weight": full.qkv.weight, "out.weight": full.out.weight, "random": s}
    y_ref, gx_ref, gp_ref = run_with_grads(reference, x, ref_params, upstream)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref, msg="grad x (through the values)")
    assert_close(gp["value.weight"], gp_ref["value.weight"][2 * DIM:], msg="grad W_v")
    assert_close(gp["out.weight"], gp_ref["out.weight"], msg="grad W_o")
    assert_close(gp["random"][:, :n, :n], gp_ref["random"], msg="grad of the table = grad of the logits")
    assert (gp["random"][:, n:] == 0).all() and (gp["random"][:, :, n:] == 0).all()


def test_synthesizer_mixture_with_equal_logits_is_full_attention():
    """α·R + (1 - α)·QKᵀ/√D with R = QKᵀ/√D (fixed α) is full attention on that input."""
    n = 9
    full = build("full")
    syn = build("synthesizer", mode="random", max_length=12, dot_product=True, mixing="fixed", mix_weight=0.3)
    x = inputs(n, b=1)
    with torch.no_grad():
        syn.qkv.load_state_dict(full.qkv.state_dict())
        syn.out.load_state_dict(full.out.state_dict())
        q, k, _ = full.project(x)
        syn.random[:, :n, :n] = (q @ k.transpose(-1, -2))[0] / math.sqrt(DIM // HEADS)
    assert_close(syn(x), full(x))


def isab_oracle(module, x, keep):
    """ISAB written out from the paper (eq. 6-9) with explicit matrices: H = MAB(I, X) on the m inducing
    rows; out = W_o · softmax(Q_X K_Hᵀ / √D) V_H. Padding: masked keys of the first attention."""
    b, n, c = x.shape
    h, d, m = HEADS, DIM // HEADS, module.config.num_inducing
    keep = torch.ones(b, n, dtype=torch.bool) if keep is None else keep

    def heads(t):  # [.., L, C] -> [.., H, L, D]
        return t.unflatten(-1, (h, d)).transpose(-2, -3)

    w_q, w_k, w_v = module.qkv.weight.chunk(3)
    b_q, b_k, b_v = module.qkv.bias.chunk(3)
    q_x, k_x, v_x = heads(x @ w_q.T + b_q), heads(x @ w_k.T + b_k), heads(x @ w_v.T + b_v)  # (B, H, N, D)
    q_i = heads(module.inducing @ module.inducing_q.weight.T + module.inducing_q.bias)  # (H, m, D)
    mask = keep[:, None, None, :].expand(b, h, m, n)
    a = full_attention(q_i[None].expand(b, h, m, d), k_x, v_x, mask)  # (B, H, m, D)
    a = a.transpose(1, 2).reshape(b, m, c) @ module.inducing_out.weight.T + module.inducing_out.bias
    h1 = F.layer_norm(module.inducing + a, (c,), module.inducing_norm.weight, module.inducing_norm.bias,
                      module.inducing_norm.eps)
    ff = torch.relu(h1 @ module.inducing_ff.weight.T + module.inducing_ff.bias)
    summary = F.layer_norm(h1 + ff, (c,), module.summary_norm.weight, module.summary_norm.bias,
                           module.summary_norm.eps)  # H (B, m, C)
    w_kh, w_vh = module.summary_kv.weight.chunk(2)
    b_kh, b_vh = module.summary_kv.bias.chunk(2)
    k_h, v_h = heads(summary @ w_kh.T + b_kh), heads(summary @ w_vh.T + b_vh)  # (B, H, m, D)
    o = full_attention(q_x, k_h, v_h, torch.ones(1, 1, n, m, dtype=torch.bool))
    o = o * keep.any(dim=1)[:, None, None, None]  # an example with no real token: zeros
    return o.transpose(1, 2).reshape(b, n, c) @ module.out.weight.T + module.out.bias


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n", [1, 7, 16])
def test_inducing_equals_the_isab_written_out(m, n):
    """No exact limit to full attention exists (H passes through LayerNorm and the rFF), so the module is
    checked against ISAB written from the paper here: outputs and every gradient, float64, padding,
    m below, equal to and above n."""
    module = build("inducing", num_inducing=m)
    x, keep = inputs(n), padding(n)
    params = dict(module.named_parameters())
    upstream = inputs(n, seed=9)
    y, gx, gp = run_with_grads(lambda t: module(t, attention_mask=keep), x, params, upstream)
    y_ref, gx_ref, gp_ref = run_with_grads(lambda t: isab_oracle(module, t, keep), x, params, upstream)
    assert_close(y, y_ref, msg="output")
    assert_close(gx, gx_ref, msg="grad x")
    for key in params:
        assert_close(gp[key], gp_ref[key], msg=key)


def test_inducing_sees_every_token_and_is_linear_in_n():
    module = build("inducing", num_inducing=4)
    x = inputs(12)
    y = module(x)
    bumped = x.clone()
    bumped[:, 11] += 1.0
    assert ((module(bumped) - y).abs().amax(dim=-1) > 0).all(), "token 11 reaches every token through H"
    big = lr.build_attention("inducing", dim=768, heads=12, num_inducing=32)
    assert big.macs(2048).pairs * 2 == big.macs(4096).pairs == 12 * 2 * 4096 * 32


@pytest.mark.parametrize(("name", "cfg"), [(n, c) for n in ("inducing", "memory_compressed")
                                           for c in ATTENTIONS.get(n)[1].test_configs()])
def test_lean_forward_equals_the_generic_project_attend_path(name, cfg):
    """`forward` projects in steps to hold less memory; `merge(attend(project(x)))` (the path the funnel's
    pooling step and other callers take) is the same function: outputs and gradients, float64."""
    from longrange.core.interface import Attention

    module = build(name, **cfg)
    for n in (1, 7, 13):
        x, keep = inputs(n), padding(n)
        params = dict(module.named_parameters())
        upstream = inputs(n, seed=4)
        y, gx, gp = run_with_grads(lambda t, keep=keep: module(t, attention_mask=keep), x, params, upstream)
        y_ref, gx_ref, gp_ref = run_with_grads(lambda t, keep=keep: Attention.forward(module, t, keep), x, params,
                                               upstream)
        assert_close(y, y_ref)
        assert_close(gx, gx_ref)
        for key in params:
            assert_close(gp[key], gp_ref[key], msg=key)


# -- causality ------------------------------------------------------------------------------------------------------
CAUSAL = [
    ("synthesizer", {"mode": "dense", "max_length": 32}),
    ("synthesizer", {"mode": "random", "max_length": 32}),
    ("synthesizer", {"mode": "factorized_dense", "max_length": 30}),
    ("synthesizer", {"mode": "factorized_random", "max_length": 32, "rank": 4}),
    ("synthesizer", {"mode": "dense", "max_length": 32, "dot_product": True}),
    ("synthesizer", {"mode": "random", "max_length": 32, "dot_product": True, "mixing": "sum"}),
    ("synthesizer", {"mode": "factorized_dense", "max_length": 30, "dot_product": True, "mixing": "fixed"}),
    ("synthesizer", {"mode": "factorized_random", "max_length": 32, "dot_product": True}),
    ("memory_compressed", {"compression": 3}),
    ("memory_compressed", {"compression": 2}),
    ("memory_compressed", {"compression": 3, "block_size": 6}),
    ("memory_compressed", {"compression": 1, "block_size": 4}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("name", "options"), CAUSAL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CAUSAL)])
def test_causal_outputs_do_not_see_later_tokens(name, options, padded, dtype):
    """Changing tokens t.. leaves every output before t bit-identical (and changes some output at or after t)."""
    n = 20
    module = build(name, dtype=dtype, causal=True, **options)
    x = inputs(n, dtype=dtype)
    keep = padding(n) if padded else None
    y = module(x, attention_mask=keep)
    for t in (1, 7, 12, 19):
        changed = x.clone()
        changed[:, t:] = inputs(n - t, dtype=dtype, seed=t)
        y2 = module(changed, attention_mask=keep)
        assert torch.equal(y2[:, :t], y[:, :t]), f"an output before {t} changed"
    assert not torch.equal(module(x * 1.5, attention_mask=keep), y)


def test_memory_compressed_causal_slot_rule():
    """Query i sees slot s only when the slot's last token s·c + c - 1 <= i; before its first complete slot
    a query has no key and gets zeros (bias off), as `dense_mask` says."""
    module = build("memory_compressed", compression=3, causal=True, bias=False)
    mask = module.dense_mask(10)
    assert mask.shape == (10, 4)
    expected = [[(s * 3 + 2) <= i for s in range(4)] for i in range(10)]
    assert mask.tolist() == expected
    y = module(inputs(10))
    assert (y[:, :2] == 0).all() and (y[:, 2:].abs().sum(-1) > 0).all()


def test_memory_compressed_blocks_are_local():
    module = build("memory_compressed", compression=2, block_size=4)
    x = inputs(16)
    y = module(x)
    bumped = x.clone()
    bumped[:, 9] += 1.0
    changed = (module(bumped) - y).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [8 <= i < 12 for i in range(16)], "only token 9's block sees it"


# -- padding, low precision ----------------------------------------------------------------------------------------
PADDING_CASES = [
    ("inducing", {"num_inducing": 5}),
    ("synthesizer", {"max_length": 32}),
    ("synthesizer", {"mode": "random", "max_length": 32, "dot_product": True}),
    ("synthesizer", {"mode": "factorized_dense", "max_length": 32, "causal": True}),
    ("synthesizer", {"mode": "factorized_random", "max_length": 32, "dot_product": True, "mixing": "sum"}),
    ("memory_compressed", {"compression": 3}),
    ("memory_compressed", {"compression": 2, "block_size": 6, "causal": True}),
]


@pytest.mark.parametrize(("name", "options"), PADDING_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PADDING_CASES)])
def test_padding_never_changes_real_tokens(name, options):
    """An example of 17 real tokens alone equals the same example padded to 24 beside another one."""
    module = build(name, **options)
    x = inputs(24)
    keep = lengths_mask([17, 24], 24)
    padded = module(x, attention_mask=keep)[0, :17]
    alone = module(x[:1, :17])[0]
    assert_close(padded, alone)
    junk = x.clone()
    junk[0, 17:] = 100.0  # what the padding holds does not matter either
    assert_close(module(junk, attention_mask=keep)[0, :17], alone)


LOW = [(name, cfg) for name in NEW for cfg in ATTENTIONS.get(name)[1].test_configs()]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(("name", "cfg"), LOW, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOW)])
def test_low_precision_is_finite_and_as_accurate_as_the_reference(name, cfg, dtype):
    """fp32/fp16/bf16 on tiny shapes: finite outputs and gradients, and the fast path's error against the
    float64 result within a small factor of the dense reference's own error in that dtype."""
    n = 12
    golden_module = build(name, **cfg)
    module = build(name, dtype=dtype, **cfg)
    x, keep = inputs(n), padding(n)
    golden = golden_module(x, attention_mask=keep)
    xl = x.to(dtype).requires_grad_(True)
    y = module(xl, attention_mask=keep)
    with torch.no_grad():
        ref = module.reference_forward(x.to(dtype), attention_mask=keep)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    assert_error_within_factor(y.detach(), ref, golden)
    y.float().square().sum().backward()
    assert torch.isfinite(xl.grad.float()).all()
    for key, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad.float()).all(), key


# -- bad options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("inducing", {"num_inducing": 0}, "num_inducing"),
        ("synthesizer", {"mode": "sparse"}, "mode must be one of"),
        ("synthesizer", {"max_length": 0}, "max_length"),
        ("synthesizer", {"rank": -1}, "rank"),
        ("synthesizer", {"mixing": "average"}, "mixing must be one of"),
        ("synthesizer", {"mix_weight": 1.0}, "mix_weight"),
        ("synthesizer", {"mix_weight": True}, "mix_weight"),
        ("memory_compressed", {"compression": 0}, "compression"),
        ("memory_compressed", {"compression": 3, "block_size": 8}, r"block_size=8 must be a multiple of compression=3"),
        ("memory_compressed", {"block_size": -3}, "block_size"),
        ("inducing", {"causal": True}, "'inducing' has no causal variant"),
    ],
)
def test_bad_options_name_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        lr.build_attention(name, dim=DIM, heads=HEADS, **options)


def test_synthesizer_input_longer_than_max_length_names_it():
    module = build("synthesizer", max_length=10)
    with pytest.raises(ValueError, match=r"max_length=10 .* length 11"):
        module(inputs(11))
    with pytest.raises(ValueError, match="max_length"):
        module.reference_forward(inputs(11))
    assert module(inputs(10)).shape == (BATCH, 10, DIM)


def test_synthesizer_length_option_follows_the_input_and_fixed_tables_are_buffers():
    from longrange.mechanisms import options_for_length

    assert options_for_length("synthesizer", {"mode": "random"}, 300) == {"mode": "random", "max_length": 300}
    fixed = build("synthesizer", mode="random", max_length=8, trainable=False)
    assert "random" in dict(fixed.named_buffers()) and "random" not in dict(fixed.named_parameters())
    assert "random" in fixed.state_dict()
    learned = build("synthesizer", mode="factorized_random", max_length=8, rank=2)
    assert learned.random_q.shape == (HEADS, 8, 2) and learned.random_q.requires_grad
    assert not hasattr(build("synthesizer"), "qkv"), "without the dot product only the values are projected"


# -- mixture of experts ---------------------------------------------------------------------------------------------
def switch(experts=2, dim=2, hidden=3, capacity_factor=1.0, jitter=0.0):
    torch.manual_seed(0)
    return SwitchFeedForward(dim, hidden, experts, capacity_factor, "relu", jitter).double()


def test_moe_aux_loss_matches_the_formula_by_hand():
    """Router = identity on 2-d inputs, so the logits are the inputs. Tokens [2,0], [0,1], [1,0], [0,3]:
    argmax experts 0, 1, 0, 1 -> f = (1/2, 1/2); P = mean softmax rows; aux = E · Σ f_i P_i = 2 · (P_0 + P_1)/2."""
    moe = switch(capacity_factor=2.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    moe(x)
    p0 = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(3))]
    p_mean = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    expected = 2 * (0.5 * p_mean[0] + 0.5 * p_mean[1])
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    # unbalanced: everything to expert 0 -> f = (1, 0), aux = 2 · P_0
    x = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [2.0, 1.0]]], dtype=torch.float64)
    moe(x)
    p = [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-1))]
    assert moe.aux_loss.item() == pytest.approx(2 * sum(p) / 3, rel=1e-6)
    assert moe.aux_loss.requires_grad, "the loss trains the router"


def test_moe_respects_capacity_and_dropped_tokens_pass_through():
    """All 6 tokens prefer expert 0; capacity ⌈1.0 · 6 / 2⌉ = 3: the first 3 are computed, the rest get 0
    from the layer, so the block's residual passes them through unchanged."""
    moe = switch(capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    x = torch.rand(1, 6, 2, dtype=torch.float64)
    x[..., 0] += 2.0  # first feature > 0 (and, after a LayerNorm, > the second): expert 0 wins
    routing = moe.route(x.view(6, 2))
    assert routing.capacity == 3 and routing.expert.tolist() == [0] * 6
    assert routing.kept.tolist() == [True, True, True, False, False, False]
    y = moe(x)
    assert (y[0, 3:] == 0).all()
    gate = torch.softmax(x[0, :3] @ moe.router.weight.T, dim=-1)[:, 0]
    assert_close(y[0, :3], gate[:, None] * (torch.relu(x[0, :3] @ moe.w1[0] + moe.b1[0]) @ moe.w2[0] + moe.b2[0]))
    # per expert never more than its capacity, whatever the routing
    for seed in range(5):
        xs = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        r = moe.route(xs.view(21, 2))
        counts = torch.bincount(r.expert[r.kept], minlength=2)
        assert (counts <= r.capacity).all() and r.capacity == math.ceil(21 / 2)
    # in a pre-norm block the dropped tokens' feed-forward branch is zero: x + g(x) = x
    attention = lr.build_attention("full", dim=2, heads=1).double()
    block = TransformerBlock(attention, moe, dropout=0.0, norm="pre").double()
    x1 = x + block.f(x)  # the stream entering the feed-forward branch
    kept = moe.route(block.ffn_norm(x1).view(6, 2)).kept
    assert not kept.all()
    assert torch.equal(block(x)[0][~kept], x1[0][~kept]), "a dropped token leaves the layer as it came"


def test_moe_expert_outputs_by_hand():
    """A kept token's output is gate · FFN_e(x) with its expert's own weights."""
    moe = switch(experts=3, dim=4, hidden=5, capacity_factor=3.0)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = moe(x)
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)
    gate, expert = probs.max(dim=-1)
    for b in range(2):
        for i in range(5):
            e = int(expert[b, i])
            ffn = torch.relu(x[b, i] @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
            assert_close(y[b, i], gate[b, i] * ffn)


def test_moe_padding_takes_no_capacity_and_routing_is_seeded():
    moe = switch(experts=2, dim=4, hidden=3, capacity_factor=1.0, jitter=0.1)
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = lengths_mask([5], 8)
    moe.eval()
    alone = moe(x[:, :5])
    padded = moe(x, attention_mask=keep)
    assert_close(padded[:, :5], alone)
    assert (padded[:, 5:] == 0).all()
    moe.train()  # jitter: drawn from the global RNG, like dropout
    torch.manual_seed(7)
    a = moe(x)
    torch.manual_seed(7)
    assert torch.equal(moe(x), a)
    torch.manual_seed(7)
    ra = moe.route(x.view(8, 4))
    torch.manual_seed(7)
    assert torch.equal(moe.route(x.view(8, 4)).gate, ra.gate)
    torch.manual_seed(8)
    assert not torch.equal(moe.route(x.view(8, 4)).gate, ra.gate), "another seed, another jitter"


# -- models: Funnel and MoE -----------------------------------------------------------------------------------------
VOCAB = 40


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=4, ffn_dim=32, max_length=64, dropout=0.0,
                attention="full", attention_options={})
    return ModelConfig(**{**base, **changes})


def ids_and_mask(b=2, n=24, lengths=(24, 15), seed=0):
    ids = torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))
    return ids, lengths_mask(list(lengths), n)


@pytest.mark.parametrize(("funnel", "stride"), [((4,), 2), ((1, 1, 2), 1), ((2, 2), 1)])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_funnel_without_pooling_is_the_plain_encoder(funnel, stride, norm):
    """One block, or stride 1 (pooling steps that pool nothing): the plain Encoder, with its weights."""
    plain = Encoder(tiny(norm=norm, head="token_classification")).double().eval()
    model = Encoder(tiny(norm=norm, head="token_classification", funnel=funnel, funnel_stride=stride)).double().eval()
    model.load_state_dict(plain.state_dict())
    ids, keep = ids_and_mask()
    a, b = plain(ids, attention_mask=keep), model(ids, attention_mask=keep)
    assert_close(b.last_hidden_state, a.last_hidden_state)
    assert_close(b.logits, a.logits)


@pytest.mark.parametrize("separate_cls", [True, False])
def test_pooling_step_with_full_attention_is_pool_query_attention(separate_cls):
    """softmax(pool(Q) Kᵀ / √D) V over the full-resolution keys, written out (float64, padding)."""
    module = build("full")
    n, stride = 11, 3
    x, keep = inputs(n), padding(n)
    pool = Pooling(n, stride, separate_cls, keep, x.device)
    y = pooled_query_attention(module, x, keep, pool)
    q, k, v = module.project(x)
    windows = ([[0]] + [list(range(i, min(i + stride, n))) for i in range(1, n, stride)]) if separate_cls \
        else [list(range(i, min(i + stride, n))) for i in range(0, n, stride)]
    assert pool.size == len(windows) and y.shape == (BATCH, len(windows), DIM)
    for b in range(BATCH):
        real = [[i for i in w if keep[b, i]] for w in windows]
        members = [r or w for r, w in zip(real, windows, strict=True)]  # a window with no real token: the mean of all
        q_pool = torch.stack([q[b, :, w].mean(dim=1) for w in members], dim=1)
        o = full_attention(q_pool, k[b], v[b], keep[b][None, None, :])
        assert_close(y[b], module.merge(o[None])[0])
        assert pool.keep[b].tolist() == [bool(w) for w in real]


@pytest.mark.parametrize("name", ["full", "local", "bigbird", "linformer", "performer", "nystrom", "inducing",
                                  "synthesizer", "memory_compressed", "dilated", "reformer"])
def test_funnel_runs_with_other_attentions(name):
    """Any mechanism in the blocks; those that cannot pool queries (synthesizer, reformer) with another
    attention in the pooling layers (2 and 3 here) through layer_options."""
    options = {"attention": name, **ATTENTIONS.get(name)[1].test_configs()[0]}
    pooling_ok = name not in ("synthesizer", "reformer")
    layers = [options, options, options if pooling_ok else {}, options if pooling_ok else {}]
    model = Encoder(tiny(attention="full", layer_options=layers, funnel=(2, 1, 1), head="masked_lm"))
    ids, keep = ids_and_mask()
    out = model(ids, attention_mask=keep, labels=ids.masked_fill(~keep, -100))
    assert out.logits.shape == (2, 24, VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.embeddings.word.weight.grad.abs().sum() > 0


def test_funnel_pooling_layer_needs_separate_queries():
    model = Encoder(tiny(attention="reformer", attention_options={"bucket_size": 4, "n_hashes": 1}, funnel=(2, 2)))
    with pytest.raises(ValueError, match=r"funnel: attention 'reformer' cannot be a pooling layer.*layer_options"):
        model(ids_and_mask()[0])
    synthesizer = Encoder(tiny(attention="synthesizer", funnel=(2, 2)))
    with pytest.raises(ValueError, match=r"funnel: attention 'synthesizer' cannot be a pooling layer"):
        synthesizer(ids_and_mask()[0])


def test_funnel_shapes_heads_and_masks():
    ids, keep = ids_and_mask()
    cls = Encoder(tiny(funnel=(2, 1, 1), head="classification", num_labels=3, pooling="mean")).eval()
    out = cls(ids, attention_mask=keep)
    # 24 tokens: CLS + 23 -> 1 + 12 = 13 -> 1 + 6 = 7
    assert out.last_hidden_state.shape == (2, 7, 16) and out.logits.shape == (2, 3)
    token = Encoder(tiny(funnel=(2, 1, 1), head="token_classification")).eval()
    assert token(ids, attention_mask=keep).logits.shape == (2, 24, 2)
    assert len(token.stack.decoder) == 2 and cls.stack.decoder is None
    pool = Pooling(24, 2, True, keep, "cpu")
    assert pool.keep[1].tolist() == [True] * 8 + [False] * 5  # 15 real tokens: CLS + 7 windows (the 7th half real)


def test_funnel_padding_and_checkpointing():
    model = Encoder(tiny(funnel=(2, 1, 1), moe_experts=2, head="token_classification")).double().eval()
    ids, _ = ids_and_mask(b=1, n=24, lengths=(24,))
    keep = lengths_mask([17], 24)
    padded = model(ids, attention_mask=keep).last_hidden_state[:, :17]
    alone = model(ids[:, :17]).last_hidden_state
    assert_close(padded, alone)
    model.train()
    ids, keep = ids_and_mask()
    grads = []
    for checkpointing in (False, True):
        model.config.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(0)
        out = model(ids, attention_mask=keep)
        (out.last_hidden_state.square().mean() + out.aux_loss).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert_close(grads[1][k], grads[0][k], msg=k)


def test_encoder_moe_aux_loss_and_layers():
    cfg = tiny(moe_experts=4, moe_every=2, head="masked_lm")
    model = Encoder(cfg)
    kinds = [type(b.ffn).__name__ for b in model.stack.blocks]
    assert kinds == ["FeedForward", "SwitchFeedForward", "FeedForward", "SwitchFeedForward"]
    ids, keep = ids_and_mask()
    out = model(ids, attention_mask=keep, labels=ids.masked_fill(~keep, -100))
    layers = [b.ffn.aux_loss for b in model.stack.blocks if isinstance(b.ffn, SwitchFeedForward)]
    assert_close(out.aux_loss, cfg.moe_aux_weight * (layers[0] + layers[1]))
    (out.loss + out.aux_loss).backward()
    assert model.stack.blocks[1].ffn.router.weight.grad.abs().sum() > 0
    assert Encoder(tiny())(ids).aux_loss is None
    assert isinstance(Encoder(tiny()).stack.blocks[0].ffn, FeedForward)


def test_checkpoint_round_trip_with_funnel_and_moe(tmp_path):
    synthesizer = {"attention": "synthesizer", "max_length": 64, "mode": "random", "trainable": False}
    cfg = tiny(funnel=(2, 2), moe_experts=3, moe_every=1, head="token_classification",
               layer_options=[synthesizer, synthesizer, {"attention": "inducing"}, synthesizer])
    model = Encoder(cfg).eval()
    ids, keep = ids_and_mask()
    before = model(ids, attention_mask=keep)
    model.save_pretrained(tmp_path / "m")
    loaded = Encoder.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg and loaded.config.funnel == (2, 2)
    after = loaded(ids, attention_mask=keep)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.aux_loss, before.aux_loss)
    assert ModelConfig.from_dict(__import__("json").loads(__import__("json").dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"funnel": (2, 1)}, r"funnel=\[2, 1\] has 3 layers; it must sum to layers=4"),
        ({"funnel": (2, 0, 2)}, "funnel"),
        ({"funnel": ()}, "funnel must be a list"),
        ({"funnel": (4,), "funnel_stride": 0}, "funnel_stride"),
        ({"funnel": (4,), "funnel_decoder_layers": -1}, "funnel_decoder_layers"),
        ({"funnel": (2, 2), "norm": "pre", "reversible": True}, "funnel cannot be used with reversible"),
        ({"moe_experts": 0}, "moe_experts"),
        ({"moe_experts": 2, "moe_capacity_factor": 0}, "moe_capacity_factor"),
        ({"moe_experts": 2, "moe_every": 0}, "moe_every"),
        ({"moe_experts": 2, "moe_jitter": 1.5}, "moe_jitter"),
        ({"moe_experts": 2, "moe_aux_weight": -1.0}, "moe_aux_weight"),
        ({"moe_experts": 2, "norm": "pre", "reversible": True}, "moe_experts cannot be used with reversible"),
    ],
)
def test_model_config_errors_name_the_option(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_funnel_and_moe_are_encoder_options():
    with pytest.raises(ValueError, match="moe_experts=2 is an option of lr.models.Encoder"):
        CausalLM(tiny(attention="local", attention_options={"window": 4}, moe_experts=2))
    with pytest.raises(ValueError, match=r"funnel=\(2, 2\) is an option of lr.models.Encoder"):
        CausalLM(tiny(attention="local", attention_options={"window": 4}, funnel=(2, 2)))


# -- bench peer, LRA ------------------------------------------------------------------------------------------------
def test_isab_peer_runs_through_the_same_point():
    pytest.importorskip("isab_pytorch")
    from longrange.bench import point as bench_point
    from longrange.bench import specs
    from longrange.bench.specs import layer_flops

    spec = {"mechanism": "lucid-isab", "n": 20, "mode": "fwd", "dim": 16, "heads": 2, "threads": 1, "repeats": 1,
            "warmup": 0, "options": {"num_inducing": 4}, "global_tokens": 0}
    r = bench_point.run_point(spec)
    assert r["error"] is None and r["time_ms"] > 0, r
    assert specs.PEERS["lucid-isab"][1] == "inducing"
    assert r["flops"] == layer_flops("inducing", 20, 16, 2, {"num_inducing": 4})["total"] > 0
    assert specs.point_options("lucid-isab", 64, {}) == {"num_inducing": 32}


def test_lra_synthesizer_settings():
    from longrange.lra import presets as P
    from longrange.lra.published import published_accuracy

    released = P.attention_options(P.get_preset("listops"), "synthesizer", 2001)
    assert released == {"mode": "random", "dot_product": True, "mixing": "sum", "max_length": 2001}
    tiny_ = P.attention_options(P.get_preset("image", "tiny"), "synthesizer", 1025)
    assert tiny_["mode"] == "factorized_random" and tiny_["dot_product"] and tiny_["max_length"] == 1025
    assert published_accuracy("synthesizer", "listops") == 36.99

