"""Transformer-XL and Compressive Transformer (`xl`, `compressive`): the attention against a dense
reference written out here, the memory state of `CausalLM` (explicit, detached, bounded), compression
and its reconstruction loss, padding, errors, save/load and MAC counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import longrange as lr
from conftest import assert_close
from longrange.mechanisms.memory import Compression, allowed_keys
from longrange.models import CausalLM, MemoryState, ModelConfig, stream_perplexity

DIM, HEADS, B = 8, 2, 2
VOCAB = 30


def attention(name="xl", dtype=torch.float64, seed=0, **options):
    torch.manual_seed(seed)
    return lr.build_attention(name, dim=DIM, heads=HEADS, **options).to(dtype)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# -- the dense reference, written out ------------------------------------------------------------------------
def sinusoid_by_hand(d: torch.Tensor, dim: int) -> torch.Tensor:
    """[...] distances -> [..., dim]: sin(d / 10000^(2t/dim)) for t < dim/2, then the cosines."""
    t = torch.arange(dim // 2, dtype=torch.float64)
    angle = d.double()[..., None] / 10000 ** (2 * t / dim)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def dense_xl(module, x, memory=None, keep=None, causal=True, span=None):
    """score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r r_{M+i-j} over keys [memory ; x], / √D, softmax over
    the allowed keys (causal, span, keep [B, M + n]), rows with no key = 0; then the output projection."""
    c, h = DIM, HEADS
    d = c // h
    ctx = x if memory is None else torch.cat([memory, x], dim=1)  # (B, L, C)
    m, n, length = ctx.shape[1] - x.shape[1], x.shape[1], ctx.shape[1]
    w = module.qkv.weight
    bias = module.qkv.bias if module.qkv.bias is not None else torch.zeros(3 * c, dtype=w.dtype)
    q = (x @ w[:c].T + bias[:c]).view(B, n, h, d)
    k = (ctx @ w[c : 2 * c].T + bias[c : 2 * c]).view(B, length, h, d)
    v = (ctx @ w[2 * c :].T + bias[2 * c :]).view(B, length, h, d)
    dist = torch.tensor([[m + i - j for j in range(length)] for i in range(n)])  # (n, L)
    rk = (sinusoid_by_hand(dist, c) @ module.r_net.weight.T).view(n, length, h, d)  # W_r r_{M+i-j}
    u, pv = module.content_bias, module.position_bias  # (H, D)
    scores = torch.einsum("bihd,bjhd->bhij", q + u, k) + torch.einsum("bihd,ijhd->bhij", q + pv, rk)
    allowed = torch.ones(n, length, dtype=torch.bool)
    if causal:
        allowed &= dist >= 0
    if span is not None:
        allowed &= dist.abs() <= span
    allowed = allowed[None, None] if keep is None else allowed[None, None] & keep[:, None, None, :]
    scores = (scores / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(B, n, c)
    return module.out(o)


def grads_of(fn, module, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    module.zero_grad(set_to_none=True)
    y = fn(*inputs)
    y.backward(randn(*y.shape, seed=7))
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in inputs]
    return y.detach(), grads, {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{}, {"causal": False}, {"span": 3}, {"span": 4, "causal": False}],
                         ids=["causal", "bidirectional", "span", "span-bidirectional"])
@pytest.mark.parametrize("m", [0, 1, 6])
def test_xl_with_memory_equals_the_dense_reference(options, m):
    module = attention(**options)
    n = 5
    x, memory = randn(B, n, DIM, seed=1), randn(B, m, DIM, seed=2)
    causal, span = options.get("causal", True), options.get("span")
    got = grads_of(lambda a, mem: module(a, memory=mem), module, x, memory)
    ref = grads_of(lambda a, mem: dense_xl(module, a, mem, causal=causal, span=span), module, x, memory)
    oracle = grads_of(lambda a, mem: module.reference_forward(a, memory=mem), module, x, memory)
    for other in (ref, oracle):
        assert_close(got[0], other[0], msg="output")
        for g, r in zip(got[1], other[1], strict=True):
            assert_close(g, r, msg="grad of x / memory")
        assert got[2].keys() == other[2].keys()
        for key in got[2]:
            assert_close(got[2][key], other[2][key], msg=f"grad {key}")
    assert {"r_net.weight", "content_bias", "position_bias"} <= got[2].keys()


def test_memory_is_the_past_of_one_longer_causal_pass():
    """Causal XL: a segment with memory M gives the last rows of one pass over [memory ; segment]."""
    module = attention()
    x, memory = randn(B, 4, DIM, seed=1), randn(B, 7, DIM, seed=2)
    assert_close(module(x, memory=memory), module(torch.cat([memory, x], dim=1))[:, 7:])


def test_span_limits_what_a_query_sees():
    module = attention(span=2)
    x, memory = randn(B, 6, DIM, seed=1), randn(B, 4, DIM, seed=2)
    base = module(x, memory=memory)
    bumped = memory.clone()
    bumped[:, 1] += 1.0  # position 1: within span 2 of no segment query (positions 4..9)
    assert torch.equal(module(x, memory=bumped), base)
    bumped[:, 3] += 1.0  # position 3: seen by queries at 4 and 5 only
    changed = (module(x, memory=bumped) - base).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [True, True, False, False, False, False]


def test_memory_padding_and_fully_padded_rows():
    module = attention(bias=False)
    n, m = 5, 4
    x, memory = randn(B, n, DIM, seed=1), randn(B, m, DIM, seed=2)
    mem_keep = torch.tensor([[True] * m, [False, True, False, True]])
    keep = torch.tensor([[True] * n, [True, True, True, False, False]])
    y = module(x, keep, memory=memory, memory_mask=mem_keep)
    assert_close(y, dense_xl(module, x, memory, torch.cat([mem_keep, keep], dim=1)))
    changed = memory.clone()
    changed[1, 0] += 5.0  # a padded memory slot: nothing changes
    assert torch.equal(module(x, keep, memory=changed, memory_mask=mem_keep), y)
    # every key padded (memory and segment): zeros, finite gradients, in every dtype
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        mod = module.to(dtype)
        xx = x.detach().to(dtype).clone().requires_grad_(True)
        none = torch.zeros(B, m, dtype=torch.bool)
        out = mod(xx, torch.zeros(B, n, dtype=torch.bool), memory=memory.to(dtype), memory_mask=none)
        assert (out == 0).all() and not out.isnan().any()
        out.float().sum().backward()
        assert torch.isfinite(xx.grad.float()).all()
        assert all(p.grad is None or torch.isfinite(p.grad.float()).all() for p in mod.parameters())
        mod.zero_grad()


def test_attention_memory_errors_name_the_argument():
    module = attention()
    x = randn(B, 3, DIM)
    with pytest.raises(ValueError, match=r"memory must be \[B, M, C\] = \[2, M, 8\].*\[1, 4, 8\]"):
        module(x, memory=randn(1, 4, DIM))
    with pytest.raises(ValueError, match=r"memory_mask must have shape \[B, N\] = \[2, 4\]"):
        module(x, memory=randn(B, 4, DIM), memory_mask=torch.ones(B, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory_mask was given without memory"):
        module(x, memory_mask=torch.ones(B, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="compressed_memory"):
        module(x, compressed_memory=randn(B, 2, DIM))  # xl has no compressed memory
    with pytest.raises(ValueError, match="compression_rate=4 must divide mem_len=10"):
        lr.build_attention("compressive", dim=DIM, heads=HEADS, mem_len=10, compression_rate=4)
    with pytest.raises(ValueError, match="compression must be one of"):
        lr.build_attention("compressive", dim=DIM, heads=HEADS, compression="median")
    with pytest.raises(ValueError, match="even dim"):
        lr.build_attention("xl", dim=9, heads=3)


# -- compression ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["max", "mean", "conv", "dilated_conv"])
@pytest.mark.parametrize("rate", [1, 2, 3])
def test_compression_shapes_and_values(kind, rate):
    comp = Compression(kind, rate, DIM).double()
    old = randn(B, 6 * rate, DIM)
    out = comp(old)
    assert out.shape == (B, 6, DIM)
    groups = old.view(B, 6, rate, DIM)
    if kind == "max":
        assert torch.equal(out, groups.amax(dim=2))
    elif kind == "mean":
        assert_close(out, groups.mean(dim=2))
    elif kind == "conv":  # starts as mean pooling (weights 1/c, rounded to float32 at init)
        torch.testing.assert_close(out, groups.mean(dim=2), atol=1e-6, rtol=1e-6)
    else:  # dilated: slot k sees every second memory of k·c - c + 1 .. k·c + c - 1 (zeros before 0)
        padded = torch.cat([torch.zeros(B, rate - 1, DIM, dtype=old.dtype), old], dim=1)
        taps = torch.stack([padded[:, k * rate : k * rate + 2 * rate - 1 : 2] for k in range(6)], dim=1)
        torch.testing.assert_close(out, taps.mean(dim=2), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=f"compression_rate={rate} must divide"):
        if rate > 1:
            comp(old[:, 1:])
        else:
            raise ValueError("compression_rate=1 must divide")


@pytest.mark.parametrize("kind", ["conv", "dilated_conv", "mean"])
def test_reconstruction_loss_trains_only_the_compression(kind):
    module = attention("compressive", compression=kind, compression_rate=2, mem_len=4)
    h, old = randn(B, 4, DIM, seed=1).requires_grad_(True), randn(B, 6, DIM, seed=2).requires_grad_(True)
    loss = module.reconstruction_loss(h, old)
    assert loss.ndim == 0 and loss > 0
    if kind == "mean":
        assert not loss.requires_grad  # no parameters to train
        return
    loss.backward()
    assert h.grad is None and old.grad is None
    trained = {k for k, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"compression.conv.weight", "compression.conv.bias"}


def test_compressed_memory_comes_first_in_the_attention():
    module = attention("compressive", compression="max", compression_rate=2, mem_len=4)
    x, mem, cmem = randn(B, 3, DIM, seed=1), randn(B, 4, DIM, seed=2), randn(B, 2, DIM, seed=3)
    got = module(x, memory=mem, compressed_memory=cmem)
    assert_close(got, dense_xl(module, x, torch.cat([cmem, mem], dim=1)))
    assert_close(got, module.reference_forward(x, memory=mem, compressed_memory=cmem))


# -- the model ----------------------------------------------------------------------------------------------------
def lm(attention_name="xl", dtype=torch.float64, seed=0, **changes):
    options = changes.pop("attention_options", {"mem_len": 64})
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=2, ffn_dim=32, max_length=32, dropout=0.0,
                attention=attention_name, attention_options=options, position_style="none")
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**base, **changes})).to(dtype).eval()


def text(n=48, b=1, seed=0):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def logits_in_segments(model, ids, sizes, **kwargs):
    state, out, start = None, [], 0
    for size in sizes:
        o = model(ids[:, start : start + size], memory=state, **kwargs)
        out.append(o.logits)
        state, start = o.memory, start + size
    assert start == ids.shape[1]
    return torch.cat(out, dim=1), state


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("name", ["xl", "compressive"])
def test_segment_size_does_not_matter_when_the_memory_covers_everything(name, norm):
    model = lm(name, norm=norm)  # mem_len 64 >= 48 tokens
    ids = text(48, b=2)
    one, _ = logits_in_segments(model, ids, [32, 16])
    for sizes in ([8] * 6, [5, 11, 16, 16], [1] * 8 + [20, 20]):
        got, state = logits_in_segments(model, ids, sizes)
        assert_close(got, one)
        assert state.tokens == 48 and state.mem[0].shape == (2, 48, 16)
    a = stream_perplexity(model, ids[0], segment_len=8)
    b = stream_perplexity(model, ids[0].tolist(), segment_len=24)
    c = stream_perplexity(model, [bytes(ids[0, :10].tolist()), ids[0, 10:]], segment_len=16)
    assert a.tokens == b.tokens == c.tokens == 47 and (a.segments, b.segments) == (6, 2)
    assert math.isclose(a.nll, b.nll, rel_tol=1e-9) and math.isclose(a.nll, c.nll, rel_tol=1e-9)


def test_model_memory_equals_the_attention_over_the_concatenation():
    """Layer by layer: with memory = that layer's inputs from the previous segment, the model's
    segment-2 hidden states equal the last rows of one pass over both segments."""
    model = lm()
    ids = text(20)
    whole = model(ids).last_hidden_state
    first = model(ids[:, :12])
    second = model(ids[:, 12:], memory=first.memory)
    assert_close(second.last_hidden_state, whole[:, 12:])
    inputs = model.embeddings(ids[:, :12])
    assert_close(first.memory.mem[0], inputs)  # layer 0's memory: its input, the embeddings


def test_bounded_memory_and_eval_with_a_longer_memory():
    model = lm(attention_options={"mem_len": 8})
    ids = text(40)
    _, state = logits_in_segments(model, ids, [10] * 4)
    assert [m.shape[1] for m in state.mem] == [8, 8] and state.memory_tokens() == 8
    _, longer = logits_in_segments(model, ids, [10] * 4, mem_len=24)
    assert longer.mem[0].shape[1] == 24
    via_state = model.new_memory(1, mem_len=24)
    for s in range(0, 40, 10):
        via_state = model(ids[:, s : s + 10], memory=via_state).memory
    assert torch.equal(via_state.mem[1], longer.mem[1])
    # a longer memory sees further back: the last segment changes
    short = model(ids[:, 30:], memory=logits_in_segments(model, ids[:, :30], [10] * 3)[1]).logits
    long_ = model(ids[:, 30:], memory=logits_in_segments(model, ids[:, :30], [10] * 3, mem_len=24)[1]).logits
    assert not torch.allclose(short, long_)


@pytest.mark.parametrize("kind", ["mean", "max"])
def test_compression_rate_one_identity_equals_xl_with_the_longer_memory(kind):
    xl = lm("xl", attention_options={"mem_len": 24})
    comp = lm("compressive", attention_options={"mem_len": 8, "cmem_len": 16, "compression_rate": 1,
                                                "compression": kind})
    comp.load_state_dict(xl.state_dict())
    ids = text(56)
    sizes = [8, 5, 11, 8, 8, 16]
    a, sa = logits_in_segments(xl, ids, sizes)
    b, sb = logits_in_segments(comp, ids, sizes)
    assert_close(b, a)
    assert [t.shape[1] for t in sb.mem] == [8, 8] and [t.shape[1] for t in sb.cmem] == [16, 16]
    assert_close(torch.cat([sb.cmem[1], sb.mem[1]], dim=1), sa.mem[1])


def test_compressive_memory_keeps_every_slot_until_a_group_can_leave():
    model = lm("compressive", attention_options={"mem_len": 4, "cmem_len": 100, "compression_rate": 2})
    ids = text(31)
    state, seen = None, 0
    for size in (3, 3, 1, 5, 7, 2, 9, 1):
        out = model(ids[:, seen : seen + size], memory=state)
        state, seen = out.memory, seen + size
        m, cm = state.mem[0].shape[1], state.cmem[0].shape[1]
        assert m + 2 * cm == seen and m <= 4 + 1  # every position is in mem or in one compressed slot
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


def test_no_gradient_reaches_the_memory():
    model = lm("compressive", dtype=torch.float32,
               attention_options={"mem_len": 8, "cmem_len": 8, "compression_rate": 2}).train()
    ids = text(40)
    state = None
    for s in range(0, 40, 8):
        out = model(ids[:, s : s + 8], labels=ids[:, s : s + 8], memory=state)
        (out.loss + out.aux_loss).backward()  # a second backward through an old segment would raise
        state = out.memory
        for t in state.mem + state.cmem:
            assert not t.requires_grad and t.grad_fn is None
    assert state.cmem[0].shape[1] > 0


def test_aux_loss_trains_only_the_compression_networks():
    model = lm("compressive", dtype=torch.float32,
               attention_options={"mem_len": 4, "cmem_len": 4, "compression_rate": 2, "compression": "conv"})
    ids = text(16)
    out = model(ids[:, 8:], memory=model(ids[:, :8]).memory)
    model.zero_grad(set_to_none=True)
    out.aux_loss.backward()
    trained = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".compression." in k for k in trained)


def test_padding_in_a_segment_reaches_no_real_token():
    model = lm(attention_options={"mem_len": 16})
    ids = text(24, b=2)
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[1, 5:8] = False  # three padded tokens in the first segment of example 1
    other = ids.clone()
    other[1, 5:8] = (other[1, 5:8] + 3) % VOCAB
    for changed in (ids, other):
        first = model(changed[:, :12], keep[:, :12])
        second = model(changed[:, 12:], memory=first.memory)
        if changed is ids:
            ref = (first.logits, second.logits)
        else:
            real = keep[:, :12]
            assert_close(first.logits[real], ref[0][real])
            assert_close(second.logits, ref[1])
    assert first.memory.layers[0].mem_mask is not None and not first.memory.layers[0].mem_mask[1, 5:8].any()
    empty = model(ids[:, :6], torch.zeros(2, 6, dtype=torch.bool))
    assert torch.isfinite(empty.logits).all()


def test_memory_state_errors_name_what_is_expected():
    model = lm(attention_options={"mem_len": 8})
    state = model(text(8, b=2)).memory
    with pytest.raises(ValueError, match=r"memory layer 0 mem must be \[B, M, C\] = \[1, M, 16\].*\[2, 8, 16\]"):
        model(text(8), memory=state)
    three = lm(layers=3)
    with pytest.raises(ValueError, match="memory has 3 layers, the model has 2"):
        model(text(8, b=2), memory=three(text(8, b=2)).memory)
    with pytest.raises(ValueError, match=r"input_ids has 33 tokens, more than max_length=32"):
        model(text(33))
    with pytest.raises(TypeError, match="memory must be a MemoryState"):
        model(text(8), memory=[torch.zeros(1, 0, 16)] * 2)
    comp = lm("compressive", attention_options={"mem_len": 8, "compression_rate": 4})
    with pytest.raises(ValueError, match="compression_rate=4 must divide mem_len=6"):
        comp(text(8), mem_len=6)
    with pytest.raises(ValueError, match="mem_len must be a non-negative int"):
        model(text(8), mem_len=-1)
    plain = lm("full", attention_options={}, position_style="absolute")
    with pytest.raises(ValueError, match="memory needs xl / compressive attention and position_style='none'"):
        plain(text(8), memory=state)
    with pytest.raises(ValueError, match="memory needs"):
        plain.new_memory(1)
    with pytest.raises(ValueError, match="its memory is the cache"):
        model(text(8), cache=object())
    with pytest.raises(ValueError, match="segment_len=64 exceeds the model's max_length=32"):
        stream_perplexity(model, text(80)[0], segment_len=64)
    with pytest.raises(ValueError, match="position_style 'absolute'.*or 'none'"):
        lm(position_style="padding_offset")


def test_generate_with_memory_as_the_cache():
    model = lm()  # mem_len 64, max_length 32: the memory covers all 20 tokens
    p = text(9, b=2)
    with_memory = model.generate(p, max_new_tokens=11)
    assert with_memory.shape == (2, 20) and torch.equal(with_memory[:, :9], p)
    assert torch.equal(with_memory, model.generate(p, max_new_tokens=11, use_cache=False))
    long_prompt = text(70, b=1)  # longer than max_length: fed in segments
    assert model.generate(long_prompt, max_new_tokens=3).shape == (1, 73)
    comp = lm("compressive", attention_options={"mem_len": 4, "cmem_len": 4, "compression_rate": 2})
    assert comp.generate(p, max_new_tokens=5).shape == (2, 14)


@pytest.mark.parametrize("name", ["xl", "compressive"])
def test_save_and_load_are_bit_identical(name, tmp_path):
    options = {"mem_len": 8, "cmem_len": 4, "compression_rate": 2} if name == "compressive" else {"mem_len": 8}
    model = lm(name, dtype=torch.float32, attention_options=options)
    ids = text(30)
    before, state = logits_in_segments(model, ids, [10, 10, 10])
    model.save_pretrained(tmp_path / "m")
    loaded = CausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.uses_memory
    after, state2 = logits_in_segments(loaded, ids, [10, 10, 10])
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(state.mem + state.cmem, state2.mem + state2.cmem, strict=True))


def test_new_memory_is_empty_and_typed():
    model = lm(dtype=torch.float32)
    state = model.new_memory(3)
    assert isinstance(state, MemoryState) and state.batch_size == 3 and state.memory_tokens() == 0
    assert state.mem[0].shape == (3, 0, 16) and state.mem[0].dtype == torch.float32
    out = model(text(5, b=3), memory=state)
    assert out.memory.mem[0].shape == (3, 5, 16) and out.aux_loss is None
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.new_memory(0)


# -- MAC counts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"causal": False}, {"span": 3}])
@pytest.mark.parametrize(("n", "m"), [(7, 0), (5, 9), (1, 4)])
def test_macs_with_memory_equal_counted_flops(options, n, m):
    module = attention(dtype=torch.float32, **options).eval()
    x, memory = torch.randn(1, n, DIM), torch.randn(1, m, DIM)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x, memory=memory)
    count = module.macs(n, memory_len=m)
    assert counter.get_total_flops() == 2 * count.total
    length = m + n
    # the pairs of the segment layout's tiles: whole tiles, the causal ones past the diagonal skipped
    assert count.pairs == HEADS * module.segment_layout(n, length, "cpu").computed_pairs()
    tiled = attention(dtype=torch.float32, tile=2, **options)  # small tiles: close to the allowed pairs
    allowed = int(allowed_keys(n, length, options.get("causal", True), options.get("span"), "cpu").sum())
    pairs = tiled.macs(n, memory_len=m).pairs // HEADS
    assert allowed <= pairs <= min(allowed + 4 * (n + length), (n + 1) * (length + 1))
    assert count.projections == (4 * n + 2 * m + length + (0 if options.get("causal", True) else n - 1)) * DIM**2
    with pytest.raises(TypeError, match="unknown argument"):
        module.macs(n, memory_length=m)


def test_compressive_macs_count_the_compressed_memory():
    module = attention("compressive", dtype=torch.float32, compression_rate=2, mem_len=4)
    x, mem, cmem = torch.randn(1, 5, DIM), torch.randn(1, 4, DIM), torch.randn(1, 3, DIM)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x, memory=mem, compressed_memory=cmem)
    assert counter.get_total_flops() == 2 * module.macs(5, memory_len=4, compressed_len=3).total


def test_compression_macs_equal_counted_flops():
    module = attention("compressive", dtype=torch.float32, compression="conv", compression_rate=2, mem_len=4)
    h, old = torch.randn(1, 3, DIM), torch.randn(1, 6, DIM)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module.reconstruction_loss(h, old)
    assert counter.get_total_flops() == 2 * module.compression_macs(3, 6)
