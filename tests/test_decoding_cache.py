"""The decoding cache that follows the pattern (`longrange.nn.decoding.KVCache`): cached attention equals
the dense masked oracle at every step, over more steps than the window holds, with sinks, batch and
left padding; it keeps exactly what a later query can reach; its memory is flat."""

from __future__ import annotations

import pytest
import torch

from longrange.core.interface import CacheSpec
from longrange.core.reference import reference_attention
from longrange.mechanisms import build_attention
from longrange.models import CausalLM, ModelConfig
from longrange.nn import decoding
from longrange.nn.decoding import KVCache, real_positions
from longrange.sparse import sparse_attention

H, D = 2, 4
SPECS = {  # name -> (mechanism, options) whose cache_spec() is a "kv" cache
    "local": ("local", {"window": 6, "causal": True}),
    "local+sinks": ("local", {"window": 6, "causal": True, "sink_tokens": 2}),
    "dilated": ("dilated", {"window": 4, "dilation": (1, 3), "causal": True}),
    "fixed": ("sparse_transformer", {"mode": "fixed", "stride": 4, "c": 1}),
    "strided": ("sparse_transformer", {"mode": "strided", "stride": 3}),
    "full": ("full", {"causal": True}),
}


def spec_of(name) -> CacheSpec:
    if name == "longformer+globals":
        return build_attention("longformer", dim=H * D, heads=H, window=4).cache_spec(global_tokens=2)
    mech, options = SPECS[name]
    return build_attention(mech, dim=H * D, heads=H, **options).cache_spec()


ALL = [*SPECS, "longformer+globals"]


def pattern_of(spec):
    from longrange.patterns import Causal

    return Causal() if spec.pattern is None else spec.pattern


def qkv(b, n, seed=0, kv_heads=H):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, n, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, n, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def oracle(spec, q, k, v, keep):
    """Each example alone: its real tokens numbered 0.., softmax over the dense pattern."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        real = keep[b]
        m = int(real.sum())
        dense = pattern_of(spec).to_dense(m)
        mask = dense[None] if dense.dim() == 3 else dense[None, None]
        kk, vv = (decoding.repeat_heads(t[b : b + 1, :, real], q.shape[1]) for t in (k, v))
        out[b : b + 1, :, real] = reference_attention(q[b : b + 1, :, real], kk, vv, mask)
    return out


def left_padded(b, n, pads=(0, 3, 7)):
    keep = torch.ones(b, n, dtype=torch.bool)
    for i, p in enumerate(pads[:b]):
        keep[i, :p] = False
    return keep


CHUNKS = [(0, 9), (9, 10), (10, 13)] + [(i, i + 1) for i in range(13, 40)]


@pytest.mark.parametrize("engine_prefill", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_cached_attention_equals_the_dense_oracle_at_every_step(name, engine_prefill):
    """A prompt of 9, then 1, 3 and 27 single tokens (more than any window here holds), a batch of 3
    left-padded by 0, 3 and 7, grouped-query heads (1 key head for 2 query heads)."""
    spec = spec_of(name)
    q, k, v = qkv(3, 40, kv_heads=1)
    keep = left_padded(3, 40)
    pos = real_positions(keep)
    expected = oracle(spec, q, k, v, keep)
    cache = KVCache(spec)

    def engine(q_, k_, v_, keep_):  # the block engine on the pattern, tokens numbered 0..
        return sparse_attention(q_, decoding.repeat_heads(k_, H), decoding.repeat_heads(v_, H), pattern_of(spec),
                                tile=2, key_padding_mask=keep_)

    for a, b in CHUNKS:
        got = cache.attend_positions(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pos[:, a:b], keep[:, a:b],
                                     prefill=engine if engine_prefill else None)
        real = keep[:, a:b]
        torch.testing.assert_close(got.transpose(1, 2)[real], expected[:, :, a:b].transpose(1, 2)[real],
                                   atol=1e-12, rtol=1e-12)


def reachable(spec, t, horizon=120) -> list[int]:
    """Positions j < t that some query i in [t, horizon) may attend (any head)."""
    dense = pattern_of(spec).to_dense(horizon)
    dense = dense.any(0) if dense.dim() == 3 else dense
    return [j for j in range(t) if bool(dense[t:, j].any())]


@pytest.mark.parametrize("name", ALL)
def test_the_cache_keeps_exactly_what_a_later_query_can_reach(name):
    spec = spec_of(name)
    q, k, v = qkv(1, 60)
    cache = KVCache(spec)
    for t in range(60):
        cache.attend_positions(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], torch.tensor([[t]]))
        stored, needed = cache.positions()[0], reachable(spec, t + 1)
        if name == "fixed":  # the ring holds the last stride - 1 tokens; at a chunk's start some are done with
            assert set(needed) <= set(stored) and len(stored) <= len(needed) + spec.window
        else:
            assert stored == needed, (t, stored, needed)


@pytest.mark.parametrize("name", ["local", "local+sinks", "longformer+globals", "dilated"])
def test_memory_is_flat_once_the_window_is_full(name):
    spec = spec_of(name)
    q, k, v = qkv(2, 300)
    cache = KVCache(spec)
    sizes = []
    for t in range(300):
        pos = torch.full((2, 1), t)
        cache.attend_positions(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], pos)
        sizes.append(cache.nbytes())
    assert len(set(sizes[spec.window + spec.sinks :])) == 1
    assert cache.memory_tokens() == spec.window + spec.sinks


def test_growing_caches_grow_by_doubling_and_stay_exact():
    spec = spec_of("fixed")  # summary columns: one kept forever per chunk of 4
    q, k, v = qkv(1, 200)
    cache = KVCache(spec)
    for t in range(200):
        cache.attend_positions(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], torch.tensor([[t]]))
    assert cache.memory_tokens() <= 200 // 4 + spec.window
    assert cache.fixed_pos.shape[1] - 1 in (64, 128)  # 16 slots doubled as needed, plus the discard slot


def test_masked_attention_runs_in_query_chunks(monkeypatch):
    spec = spec_of("local+sinks")
    q, k, v = qkv(2, 30)
    keep = left_padded(2, 30)
    expected = oracle(spec, q, k, v, keep)
    monkeypatch.setattr(decoding, "MASK_ELEMENTS", 40)  # a few query rows per call
    got = KVCache(spec).attend_positions(q, k, v, real_positions(keep), keep)
    torch.testing.assert_close(got.transpose(1, 2)[keep], expected.transpose(1, 2)[keep], atol=1e-12, rtol=1e-12)


def test_a_cache_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="'kv' CacheSpec"):
        KVCache(CacheSpec("state"))


# -- CausalLM ------------------------------------------------------------------------------------------------------
def test_causal_lm_generation_with_sinks_equals_recomputing_every_step():
    """A window of 3 keys and 2 sinks over 30 generated tokens: every step's logits equal one full
    forward over the prefix (recomputed), memory stays at 3 + 2 keys per layer."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=16, heads=2, layers=2, ffn_dim=32, max_length=64, dropout=0.0,
                      attention="local", attention_options={"window": 6, "sink_tokens": 2})
    lm = CausalLM(cfg).eval()
    prompt = torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = lm.generate(prompt, max_new_tokens=30)
    cache = lm.new_cache()
    logits = [lm(tokens[:, :5], cache=cache).logits[:, -1]]
    sizes = []
    for i in range(5, tokens.shape[1] - 1):
        logits.append(lm(tokens[:, i : i + 1], cache=cache).logits[:, -1])
        sizes.append(sum(layer["self"].nbytes() for layer in cache.layers))
    for i, step in enumerate(logits):
        full = lm(tokens[:, : 5 + i]).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert cache.memory_tokens() == 3 + 2 and len(set(sizes[5:])) == 1
    assert torch.equal(tokens, lm.generate(prompt, max_new_tokens=30, use_cache=False))


def test_cli_generate_streams_and_reports_the_cache(tmp_path):
    import json

    from typer.testing import CliRunner

    from longrange.cli import app
    from longrange.models.memory import byte_lm_config

    torch.manual_seed(0)
    CausalLM(byte_lm_config("full")).save_pretrained(tmp_path / "lm")
    (tmp_path / "prompt.txt").write_bytes(b"a prompt of some bytes")
    args = ["generate", str(tmp_path / "lm"), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "40",
            "--attention", "local", "--opt", "window=8", "--opt", "sink_tokens=2", "--json", str(tmp_path / "r.json")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 40 and result["cache_keys_per_layer"] == 4 + 2 and result["cache_bytes"] > 0
    assert "tokens/s" in r.output and "decoding cache" in r.output
    r = CliRunner().invoke(app, args[:2] + ["--prompt-file", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "--prompt-file" in r.output
