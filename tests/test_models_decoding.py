"""CausalLM and EncoderDecoder: cached decoding equals the uncached forward; generate; bounded caches."""

from __future__ import annotations

import pytest
import torch

from longrange.mechanisms import ATTENTIONS
from longrange.models import CausalLM, EncoderDecoder, ModelConfig, causal_attentions

VOCAB = 40


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=2, ffn_dim=32, max_length=64, dropout=0.0,
                attention="full", attention_options={})
    return ModelConfig(**{**base, **changes})


def causal_options(name: str) -> dict:
    """The registry's last test setting with causal=True (dropping it: the model sets it); the last
    one, since for reformer only a fixed n_buckets makes outputs independent of later tokens."""
    configs = ATTENTIONS.get(name)[1].test_configs()
    options = next((c for c in reversed(configs) if c.get("causal")), configs[0])
    return {k: v for k, v in options.items() if k != "causal"}


def prompt(b=2, n=7, seed=0):
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", causal_attentions())
def test_cached_decoding_equals_the_full_forward(name):
    """Feeding the sequence in pieces (a prompt, then one token at a time, then three) through the
    cache gives the logits of one causal forward over all of it."""
    model = CausalLM(tiny(attention=name, attention_options=causal_options(name))).eval()
    ids = prompt(n=14)
    full = model(ids).logits
    cache = model.new_cache()
    pieces = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 6), (6, 7), (7, 8), (8, 11), (11, 14))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)
    assert cache.length == 14


def test_cache_kinds_and_bounds():
    local = CausalLM(tiny(attention="local", attention_options={"window": 6})).eval()
    cache = local.new_cache()
    local(prompt(n=20), cache=cache)
    assert type(cache.layers[0]["self"]).__name__ == "KVCache" and cache.memory_tokens() == 3  # window // 2
    full = CausalLM(tiny()).eval()
    cache = full.new_cache()
    full(prompt(n=20), cache=cache)
    assert cache.memory_tokens() == 20
    if "linear" in causal_attentions():
        lin = CausalLM(tiny(attention="linear")).eval()
        cache = lin.new_cache()
        lin(prompt(n=20), cache=cache)
        assert type(cache.layers[0]["self"]).__name__ == "StateCache" and cache.memory_tokens() == 0


def test_causal_lm_loss_and_padding():
    model = CausalLM(tiny(attention="local", attention_options={"window": 4}))
    ids = prompt(n=10)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 10, VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    with pytest.raises(ValueError, match="attention_mask with padding cannot be used with a decoding cache"):
        model(ids, attention_mask=torch.zeros(2, 10, dtype=torch.bool), cache=model.new_cache())


@pytest.mark.parametrize("name", ["full", "local"])
def test_generate_greedy_with_and_without_cache(name):
    options = {"window": 4} if name == "local" else {}
    model = CausalLM(tiny(attention=name, attention_options=options)).eval()
    p = prompt()
    with_cache = model.generate(p, max_new_tokens=8)
    assert with_cache.shape == (2, 15) and torch.equal(with_cache[:, :7], p)
    assert torch.equal(with_cache, model.generate(p, max_new_tokens=8, use_cache=False))


def test_generate_sampling_is_reproducible_and_stops_at_eos():
    model = CausalLM(tiny()).eval()
    p = prompt()
    a = model.generate(p, max_new_tokens=6, do_sample=True, top_k=5, temperature=0.8,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(p, max_new_tokens=6, do_sample=True, top_k=5, temperature=0.8,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = model.generate(p, max_new_tokens=6)
    eos = int(greedy[0, 7])
    stopped = model.generate(p, max_new_tokens=6, eos_token_id=eos)
    assert stopped[0, 7] == eos and (stopped[0, 8:] == 0).all()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(p, do_sample=True, temperature=0.0)


# -- EncoderDecoder --------------------------------------------------------------------------------------------------
def seq2seq(**changes):
    return EncoderDecoder(tiny(attention="longformer", attention_options={"window": 4, "tile": 2},
                               decoder_layers=1, decoder_max_length=32, decoder_start_token_id=2, **changes)).eval()


def test_encoder_decoder_cached_decoding_equals_the_full_forward():
    model = seq2seq()
    src = prompt(n=20)
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, 15:] = False
    tgt = prompt(n=9, seed=1)
    full = model(src, attention_mask=keep, decoder_input_ids=tgt).logits
    cache = model.new_cache()
    pieces = [model(src, attention_mask=keep, decoder_input_ids=tgt[:, a:b], cache=cache).logits
              for a, b in ((0, 4), (4, 5), (5, 9))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_encoder_decoder_loss_generate_and_padding():
    model = seq2seq()
    src, tgt = prompt(n=20), prompt(n=6, seed=1)
    out = model(src, labels=tgt)
    assert out.logits.shape == (2, 6, VOCAB) and out.encoder_last_hidden_state.shape == (2, 20, 16)
    assert torch.equal(model.shift_right(tgt)[:, 0], torch.full((2,), 2))
    model.train()
    model(src, labels=tgt).loss.backward()
    model.eval()
    gen = model.generate(src, max_new_tokens=5)
    assert gen.shape == (2, 6) and (gen[:, 0] == 2).all()
    assert torch.equal(gen, model.generate(src, max_new_tokens=5, use_cache=False))
    # padding of the source does not reach real tokens of the output
    keep = torch.ones(2, 24, dtype=torch.bool)
    keep[:, 20:] = False
    padded = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=keep, decoder_input_ids=tgt).logits,
                               model(src, decoder_input_ids=tgt).logits, atol=1e-5, rtol=1e-5)
