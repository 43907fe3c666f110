"""Backends of the pattern mechanisms: `backend="engine" | "flex" | "auto"` on every mechanism that
runs a block layout, the same output on both (flex's eager path here; its compiled kernel in
tests/test_flex.py), named errors where flex cannot run, `explain()`, and attention dropout."""

from __future__ import annotations

import logging

import pytest
import torch

import longrange as lr
import longrange.sparse.backends as backends
from longrange.core.config import ConfigError
from longrange.mechanisms import backends as backends_of

DIM, HEADS = 32, 4

CASES = {
    "local": ({"window": 8, "tile": 4}, {}),
    "local_causal_sinks": ({"window": 8, "tile": 4, "causal": True, "sink_tokens": 2}, {}),
    "dilated": ({"window": 8, "tile": 2, "dilation": [1, 2, 1, 3]}, {}),
    "longformer": ({"window": 8, "tile": 4}, {"global_mask": "first2"}),
    "bigbird": ({"block_size": 4, "num_random_blocks": 1}, {}),
    "bigbird_globals": ({"block_size": 4, "num_random_blocks": 1}, {"global_mask": "first2"}),
    "sparse_transformer_strided": ({"mode": "strided", "stride": 4, "tile": 4}, {}),
    "sparse_transformer_fixed": ({"mode": "fixed", "stride": 8, "c": 2, "tile": 4}, {}),
    "etc": ({"radius": 4, "max_distance": 3, "tile": 4}, {"num_global": 3}),
    "routing": ({"window": 8, "tile": 4, "num_clusters": 4, "cluster_size": 8, "routed_heads": 2}, {}),
    "xl": ({"tile": 4}, {"memory": "memory6"}),  # a rectangular layout: 6 memory slots before the segment
    "xl_bidirectional_span": ({"tile": 4, "causal": False, "span": 9, "clamp_len": 7}, {"memory": "memory6"}),
    "compressive": ({"tile": 4, "compression": "max", "compression_rate": 2, "mem_len": 4},
                    {"memory": "memory6", "compressed_memory": "memory3"}),
}


def _build(case, backend, **extra):
    name = case.split("_")[0] if case.split("_")[0] in lr.list_attentions() else case.rsplit("_", 1)[0]
    name = {"local_causal_sinks": "local", "sparse_transformer_strided": "sparse_transformer",
            "sparse_transformer_fixed": "sparse_transformer", "bigbird_globals": "bigbird",
            "xl_bidirectional_span": "xl"}.get(case, name)
    options, inputs = CASES[case]
    torch.manual_seed(0)
    return lr.build_attention(name, dim=DIM, heads=HEADS, backend=backend, **options, **extra), dict(inputs)


def _inputs(inputs, b, n, dtype=torch.float32):
    out = {}
    for key, value in inputs.items():
        if value == "first2":
            g = torch.zeros(b, n, dtype=torch.bool)
            g[:, :2] = True
            out[key] = g
        elif isinstance(value, str) and value.startswith("memory"):  # past inputs [B, M, C]
            gen = torch.Generator().manual_seed(1)
            out[key] = torch.randn(b, int(value.removeprefix("memory")), DIM, generator=gen, dtype=dtype)
        else:
            out[key] = value
    return out


@pytest.fixture
def eager_flex(monkeypatch):
    monkeypatch.setattr(backends, "FLEX_COMPILED", False)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [23, 32])
def test_flex_equals_engine_for_every_pattern_mechanism(case, n, eager_flex):
    engine, inputs = _build(case, "engine")
    flex, _ = _build(case, "flex")
    flex.load_state_dict(engine.state_dict())
    engine.eval(), flex.eval()
    x = torch.randn(2, n, DIM)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, n - 5:] = False
    kw = _inputs(inputs, 2, n)
    with torch.no_grad():
        a = engine(x, attention_mask=keep, **kw)
        b = flex(x, attention_mask=keep, **kw)
        assert "flex (asked for)" in flex.explain(x, **{k: v for k, v in kw.items() if k == "num_global"})
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_every_layout_mechanism_offers_both_backends():
    on_layouts = {"local", "dilated", "longformer", "bigbird", "sparse_transformer", "etc", "routing", "xl",
                  "compressive"}
    for name in lr.list_attentions():
        expected = ("engine", "flex") if name in on_layouts else ()
        assert backends_of(name) == expected, name


def test_explicit_flex_that_cannot_run_is_a_named_error():
    attn, _ = _build("local", "flex")
    x = torch.randn(1, 16, DIM, requires_grad=True)
    with pytest.raises(ValueError, match="backend='flex' cannot run this call: FlexAttention has no backward on CPU"):
        attn(x)
    attn.train()
    drop, _ = _build("local", "flex", dropout=0.1)
    drop.train()
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        drop(torch.randn(1, 16, DIM))
    with pytest.raises(ValueError, match="backend must be one of"):
        lr.build_attention("local", dim=DIM, heads=HEADS, backend="triton")


def test_auto_says_what_it_runs_and_why(caplog):
    attn, _ = _build("bigbird", "auto")
    x = torch.randn(1, 40, DIM)
    assert "engine (auto: flex cannot run: FlexAttention has no backward on CPU" in attn.explain(x)
    with torch.no_grad():
        text = attn.explain(x)
        assert "inference" in text and "engine (auto: CPU: the engine" in text
        with caplog.at_level(logging.DEBUG, logger="longrange.backend"):
            attn(x)
    assert any("bigbird n=40 cpu float32 grad=False: engine (auto" in r.getMessage() for r in caplog.records)
    etc, _ = _build("etc", "auto")
    assert "relative-position bias trains its inputs" in etc.explain(torch.randn(1, 40, DIM), num_global=3)
    perf = lr.build_attention("performer", dim=DIM, heads=HEADS)
    assert "its own kernel" in perf.explain(x)


@pytest.mark.parametrize("case", ["local", "bigbird_globals", "sparse_transformer_strided", "etc", "xl"])
def test_attention_dropout_train_only_seeded_and_unbiased(case):
    attn, inputs = _build(case, "engine", dropout=0.3)
    ref, _ = _build(case, "engine")
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(1, 24, DIM, dtype=torch.float64)
    attn.double(), ref.double()
    kw = _inputs(inputs, 1, 24, torch.float64)
    with torch.no_grad():
        attn.eval(), ref.eval()
        torch.testing.assert_close(attn(x, **kw), ref(x, **kw))  # eval: no dropout, bit for bit
        attn.train()
        torch.manual_seed(5)
        a = attn(x, **kw)
        torch.manual_seed(5)
        assert torch.equal(a, attn(x, **kw))  # seeded: reproducible
        assert not torch.allclose(a, ref(x, **kw))
        mean = sum(attn(x, **kw) for _ in range(400)) / 400  # E[output] is the output without dropout
    err = (mean - ref(x, **kw)).abs().max() / ref(x, **kw).abs().max()
    assert err < 0.08, float(err)


def test_attention_dropout_in_full_and_refused_where_undefined():
    full = lr.build_attention("full", dim=DIM, heads=HEADS, dropout=0.2)
    x = torch.randn(1, 10, DIM)
    full.train()
    torch.manual_seed(1)
    a = full(x)
    full.eval()
    assert not torch.allclose(a, full(x))
    for name in ("performer", "linformer", "reformer"):
        with pytest.raises(ConfigError, match="dropout=0.1 is attention-probability dropout"):
            lr.build_attention(name, dim=DIM, heads=HEADS, dropout=0.1)


def test_bench_runs_each_layout_mechanism_once_per_backend():
    from longrange.bench import make_settings

    s = make_settings("quick", mechanisms="full,bigbird,performer,hf-bigbird", lengths="256", backend="engine,flex",
                      options={"bigbird": {"block_size": 32}})
    assert s.mechanisms == ("full", "bigbird@engine", "bigbird@flex", "performer", "hf-bigbird")
    assert s.options["bigbird@flex"] == {"backend": "flex", "block_size": 32}
    with pytest.raises(ConfigError, match="backend takes engine, flex and/or auto") as err:
        make_settings("quick", mechanisms="local", lengths="256", backend="cuda")
    assert err.value.option == "backend"
    with pytest.raises(ConfigError, match="performer runs on its own kernel only"):
        make_settings("quick", mechanisms="performer@flex", lengths="256")


def test_auto_on_cpu_takes_flex_only_when_asked_to(monkeypatch, eager_flex):
    import longrange.sparse.flex as flex

    attn, _ = _build("local", "auto")
    x = torch.randn(1, 64, DIM)
    with torch.no_grad():
        assert "engine (auto: CPU" in attn.explain(x)
        monkeypatch.setattr(flex, "AUTO_CPU_FLEX_MIN_TOKENS", 32)
        assert "flex (auto: CPU inference at n=64 >= AUTO_CPU_FLEX_MIN_TOKENS=32)" in attn.explain(x)
        ref, _ = _build("local", "engine")
        ref.load_state_dict(attn.state_dict())
        torch.testing.assert_close(attn(x), ref(x), atol=2e-5, rtol=1e-4)

