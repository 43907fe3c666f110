"""HF transformers models on longrange attention (`lr.hf.register()`), with tiny random configs built here.

Exactness: a pattern covering the input equals HF's own `sdpa` (prefill and greedy generation, fp32,
1e-5); the model's own sliding window (Mistral, Qwen2, ModernBERT) equals HF's sliding-window result;
a narrower pattern equals HF's sdpa fed the pattern as a dense 4-D mask (the oracle); cached decoding
with `LongrangeCache` equals recomputing the full masked forward at every step.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import longrange as lr
from longrange.hf.backend import layer_setup

transformers = pytest.importorskip("transformers")
T = transformers
lr.hf.register()

VOCAB = 50
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ATOL = 1e-5


def _quiet(cfg):
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id"):
        if getattr(cfg, key, None) is not None and getattr(cfg, key) >= VOCAB:
            setattr(cfg, key, 0)
    return cfg


def llama(**kw):
    return T.LlamaForCausalLM(_quiet(T.LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=256, **kw)))


def mistral(window=5):
    return T.MistralForCausalLM(_quiet(T.MistralConfig(**SMALL, num_key_value_heads=1, max_position_embeddings=256,
                                                       sliding_window=window)))


def qwen2():  # layer 0 full, layer 1 a sliding window of 4
    return T.Qwen2ForCausalLM(_quiet(T.Qwen2Config(**SMALL, num_key_value_heads=1, max_position_embeddings=256,
                                                   use_sliding_window=True, sliding_window=4, max_window_layers=1)))


def gpt2():
    return T.GPT2LMHeadModel(_quiet(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)))


def bert():
    return T.BertModel(_quiet(T.BertConfig(**SMALL, max_position_embeddings=128)))


def roberta():
    return T.RobertaModel(_quiet(T.RobertaConfig(**SMALL, max_position_embeddings=130)))


def modernbert():  # layers 0 and 2 global, layer 1 a window of radius 2
    return T.ModernBertModel(_quiet(T.ModernBertConfig(**{**SMALL, "num_hidden_layers": 3}, max_position_embeddings=128,
                                                       local_attention=4, pad_token_id=0)))


DECODERS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "gpt2": gpt2}
ENCODERS = {"bert": bert, "roberta": roberta}
if hasattr(T, "ModernBertModel"):
    ENCODERS["modernbert"] = modernbert


def ours(ref, name="local", **options):
    """A copy of `ref` on longrange-NAME with model.config.longrange = options."""
    model = copy.deepcopy(ref)
    model.set_attn_implementation(f"longrange-{name}")
    model.config.longrange = options
    return model


def batch(n, b=2, pad=0, left=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if pad:
        mask[-1, :pad] = 0 if left else 1
        if not left:
            mask[-1, n - pad :] = 0
    return ids, mask


def out(model, ids, mask):
    o = model(ids, attention_mask=mask)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def assert_close_on_real(a, b, mask, atol=ATOL):
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=atol, rtol=1e-5)


def greedy(model, ids, mask, steps, **kw):
    g = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=0, **kw)
    return g.sequences, torch.stack(g.logits, 1)


# -- registration -----------------------------------------------------------------------------------------------
def test_register_names_every_pattern_mechanism_with_its_mask_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    names = lr.hf.register()
    for expected in ("local", "bigbird", "longformer", "sparse_transformer", "dilated"):
        assert f"longrange-{expected}" in names
    for name in names:  # never HF's silent `mask = None` for an unknown implementation
        assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="cannot be an HF attention backend"):
        lr.hf.register(["performer"])


def test_register_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install longrange\[hf\]"):
        lr.hf.register()


# -- exactness against HF's sdpa ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DECODERS)
def test_decoders_with_a_covering_pattern_equal_sdpa_prefill_and_generation(family):
    """Left-padded batch; the model's own sliding window (mistral, qwen2) applies on both sides."""
    torch.manual_seed(0)
    ref = DECODERS[family]().eval()
    model = ours(ref, window=1024)
    ids, mask = batch(13, pad=0 if family == "gpt2" else 4)  # GPT-2 numbers positions by index: no left padding
    assert_close_on_real(out(model, ids, mask), out(ref, ids, mask), mask)
    seq_ref, logits_ref = greedy(ref, ids, mask, 12)
    seq, logits = greedy(model, ids, mask, 12)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=1e-5)
    seq, logits = greedy(model, ids, mask, 12, cache=lr.hf.LongrangeCache())
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize(("name", "options"), [("local", {"window": 1024}), ("longformer", {"window": 1024}),
                                               ("bigbird", {"block_size": 64, "num_random_blocks": 0}),
                                               ("dilated", {"window": 1024, "dilation": 1})])
def test_encoders_with_a_covering_pattern_equal_sdpa(family, name, options):
    torch.manual_seed(0)
    ref = ENCODERS[family]().eval()
    ids, mask = batch(21, pad=6, left=False)
    assert_close_on_real(out(ours(ref, name, **options), ids, mask), out(ref, ids, mask), mask)


def test_mistral_sliding_window_equals_hf_sliding_window():
    """Mistral's own window of 5 keys, inside a wider longrange window: HF's sliding-window result, for
    a prompt longer than the window, left padding, and generation with HF's and our cache."""
    torch.manual_seed(0)
    ref = mistral(window=5).eval()
    model = ours(ref, window=64)
    ids, mask = batch(20, pad=6)
    assert_close_on_real(out(model, ids, mask), out(ref, ids, mask), mask)
    seq_ref, logits_ref = greedy(ref, ids, mask, 15)
    for cache in (None, lr.hf.LongrangeCache()):
        seq, logits = greedy(model, ids, mask, 15, **({} if cache is None else {"cache": cache}))
        assert torch.equal(seq, seq_ref)
        torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=1e-5)
    assert cache.memory_tokens() == 4  # the window's 5 keys, the query's own included


# -- a narrower pattern: HF's sdpa fed the pattern as a dense mask is the oracle -----------------------------------
def dense_oracle_mask(pattern, mask):
    """[B, 1, N, N] bool: the pattern on each example's real-token positions, padding keys masked."""
    keep = mask.bool()
    pos = (keep.long().cumsum(1) - 1).clamp(min=0)
    dense = pattern.to_dense(mask.shape[1])
    dense = dense if dense.dim() == 2 else dense.any(0)
    allowed = dense[pos[:, :, None], pos[:, None, :]] & keep[:, None, :]
    allowed |= torch.eye(mask.shape[1], dtype=torch.bool)[None] & ~keep[:, :, None]  # padded rows: no NaN
    return allowed[:, None]


DECODER_PATTERNS = [
    ("local", {"window": 6, "sink_tokens": 2}),
    ("local", {"window": 4}),
    ("longformer", {"window": 4, "global_tokens": 2}),
    ("longformer", {"window": 4, "global_tokens": [1, 14]}),  # 14: a generated token is global
    ("sparse_transformer", {"mode": "fixed", "stride": 4, "c": 1, "tile": 2}),
    ("sparse_transformer", {"mode": "strided", "stride": 3, "tile": 2}),
    ("dilated", {"window": 4, "dilation": 2, "tile": 2}),
]


@pytest.mark.parametrize(("name", "options"), DECODER_PATTERNS, ids=lambda v: str(v))
def test_decoder_pattern_equals_dense_oracle_and_cached_decoding_equals_recompute(name, options):
    """Llama (grouped-query heads, RoPE), left-padded batch: prefill equals sdpa with the pattern as a
    dense mask; then 24 greedy steps (more than any window here holds) give, at every step, the logits
    of recomputing the full masked forward (use_cache=False), with HF's DynamicCache and with ours."""
    torch.manual_seed(0)
    ref = llama().eval()
    model = ours(ref, name, **options)
    ids, mask = batch(11, pad=3)
    pattern = layer_setup(name, options, 4, True, None, False).pattern
    oracle = ref(ids, attention_mask=dense_oracle_mask(pattern, mask)).logits
    assert_close_on_real(out(model, ids, mask), oracle, mask)
    seq_ref, logits_ref = greedy(model, ids, mask, 24, use_cache=False)
    seq, logits = greedy(model, ids, mask, 24)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=1e-5)
    cache = lr.hf.LongrangeCache()
    seq, logits = greedy(model, ids, mask, 24, cache=cache)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=1e-5)
    spec = layer_setup(name, options, 4, True, None, False).cache_spec
    if spec.window is not None and spec.keep is None:  # constant memory: the window and the fixed slots
        assert cache.memory_tokens() <= spec.window + spec.sinks


@pytest.mark.parametrize(("name", "options"), [("local", {"window": 4, "sink_tokens": 1}),
                                               ("longformer", {"window": 4, "global_tokens": [0, 5]}),
                                               ("bigbird", {"block_size": 2, "num_random_blocks": 1})])
def test_encoder_pattern_equals_dense_oracle(name, options):
    torch.manual_seed(0)
    ref = bert().eval()
    ids, mask = batch(14, pad=3, left=False)
    pattern = layer_setup(name, options, 4, False, None, False).pattern
    dense = pattern.to_dense(14)
    if dense.dim() == 3:  # heads differ (bigbird's random blocks): the dense mask per head
        allowed = dense[None] & mask.bool()[:, None, None, :]
        allowed |= torch.eye(14, dtype=torch.bool) & ~mask.bool()[:, None, :, None]
    else:
        allowed = dense_oracle_mask(pattern, mask)
    assert_close_on_real(out(ours(ref, name, **options), ids, mask), out(ref, ids, allowed), mask)


def test_the_pattern_matters():
    torch.manual_seed(0)
    ref = llama().eval()
    ids, mask = batch(16)
    assert not torch.allclose(out(ours(ref, window=4), ids, mask), out(ref, ids, mask), atol=1e-3)


# -- the cache's memory -----------------------------------------------------------------------------------------
def test_longrange_cache_memory_is_constant_with_window_and_sinks():
    torch.manual_seed(0)
    model = ours(llama().eval(), window=8, sink_tokens=2)
    ids, mask = batch(6, pad=2)
    sizes = []
    for steps in (10, 40):
        cache = lr.hf.LongrangeCache()
        greedy(model, ids, mask, steps, cache=cache)
        sizes.append(cache.nbytes())
        assert cache.memory_tokens() == 4 + 2
    assert sizes[0] == sizes[1]
    positions = cache.layers[0].core.positions()
    assert positions[0] == [0, 1, 41, 42, 43, 44] and positions[1] == [0, 1, 39, 40, 41, 42]  # left padding: 2 fewer


def test_longrange_cache_needs_a_longrange_backend():
    torch.manual_seed(0)
    ref = llama().eval()
    ids, mask = batch(6)
    cache = lr.hf.LongrangeCache()
    ref(ids, attention_mask=mask, cache=cache)  # sdpa: this call's keys are never stored
    with pytest.raises(RuntimeError, match="needs a longrange attention implementation"):
        ref(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)


# -- training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_training_through_hf_gives_sdpa_gradients(family):
    torch.manual_seed(0)
    if family == "llama":
        ref = llama().train()
    else:
        ref = T.BertForMaskedLM(_quiet(T.BertConfig(**SMALL, max_position_embeddings=64,
                                                    attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))).train()
    ids, mask = batch(12, pad=3, left=False)  # (left padding: HF's shifted loss reads a padded position's logits)
    for name, options in (("local", {"window": 1024}), ("bigbird", {"block_size": 64, "num_random_blocks": 0})):
        model = ours(ref, name, **options)
        labels = ids.masked_fill(mask == 0, -100)
        grads = []
        for m in (ref, model):
            m.zero_grad()
            loss = m(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        assert torch.isfinite(grads[1]).all()
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


# -- refusals ---------------------------------------------------------------------------------------------------
def test_output_attentions_is_an_error_naming_why():
    model = ours(llama().eval(), window=8)
    ids, mask = batch(6)
    with pytest.raises(ValueError, match="never builds the dense"):
        model(ids, attention_mask=mask, output_attentions=True)


def test_attention_dropout_applies_in_training_only():
    ref = T.BertModel(_quiet(T.BertConfig(**SMALL, max_position_embeddings=128, hidden_dropout_prob=0.0)))
    assert ref.config.attention_probs_dropout_prob == 0.1  # BERT's: the only dropout left on
    model = ours(ref, window=64)  # covers the input: eval equals sdpa
    ids, mask = batch(6)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state,
                               ref(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
    model.train()
    model(ids, attention_mask=mask)  # the first training call sets up its layers (drawing from the RNG)
    torch.manual_seed(3)
    a = model(ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(3)
    assert torch.equal(a, model(ids, attention_mask=mask).last_hidden_state)  # seeded
    assert not torch.allclose(a, ref(ids, attention_mask=mask).last_hidden_state, atol=1e-4)


def test_bigbird_cannot_decode_incrementally_but_can_recompute():
    torch.manual_seed(0)
    model = ours(llama().eval(), "bigbird", block_size=2, num_random_blocks=1)
    ids, mask = batch(8)
    with pytest.raises(ValueError, match="depends on the whole length"):
        greedy(model, ids, mask, 2)
    with pytest.raises(ValueError, match="depends on the whole length"):
        greedy(model, ids, mask, 2, cache=lr.hf.LongrangeCache())
    assert greedy(model, ids, mask, 2, use_cache=False)[0].shape == (2, 10)


@pytest.mark.parametrize(("options", "match"), [({"windw": 8}, "windw"), ({"causal": False}, "causal"),
                                                ({"window": 7}, "window"), ({"dim": 8}, "dim")])
def test_bad_options_name_the_option(options, match):
    model = ours(llama().eval(), **options)
    ids, mask = batch(6)
    with pytest.raises(ValueError, match=match) as err:
        model(ids, attention_mask=mask)
    assert "model.config.longrange" in str(err.value)


def test_a_prepared_4d_mask_is_refused():
    model = ours(llama().eval(), window=8)
    ids, _ = batch(6)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))


# -- BigBird eval parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("r", "n"), [(1, 30), (3, 64)])  # n > (5 + 2r)·block_size: HF stays block-sparse
def test_bigbird_encoder_from_hf_in_eval_equals_hf_eval_with_random_in_eval_hf(r, n):
    """HF BigBird in eval points every random slot at block 0; our random_in_eval="hf" does the same,
    so no alignment of random draws is needed. ("same", the paper's, and "none" differ from it.)"""
    torch.manual_seed(0)
    cfg = T.BigBirdConfig(**{**SMALL, "vocab_size": VOCAB}, block_size=4, num_random_blocks=r,
                          attention_type="block_sparse", max_position_embeddings=128, hidden_act="gelu_new",
                          bos_token_id=2, eos_token_id=3, sep_token_id=4, pad_token_id=0)
    hf = T.BigBirdModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids, mask = batch(n, pad=5, left=False)
    ids = ids.masked_fill(mask == 0, 0)
    expected = hf(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    ours_hf = lr.hf.encoder_from_hf(hf, random_in_eval="hf")
    assert_close_on_real(ours_hf(ids, attention_mask=keep).last_hidden_state, expected, mask)
    for other in ("same", "none"):
        got = lr.hf.encoder_from_hf(hf, random_in_eval=other)(ids, attention_mask=keep).last_hidden_state
        assert not torch.allclose(got[keep], expected[keep], atol=1e-4)


def test_cli_generate_runs_a_hf_folder_on_longrange_local(tmp_path):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from typer.testing import CliRunner

    from longrange.cli import app

    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    llama().save_pretrained(tmp_path / "m")
    (tmp_path / "p.txt").write_text("w3 w4 w5 w6")
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "p.txt"),
                                 "--max-new-tokens", "20", "--opt", "window=4", "--opt", "sink_tokens=1",
                                 "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 20 and result["cache_keys_per_layer"] == 2 + 1


def test_beam_search_and_repeated_sequences_reorder_the_cache():
    torch.manual_seed(0)
    model = ours(llama().eval(), window=6, sink_tokens=1)
    ids, mask = batch(7, pad=2)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3, num_return_sequences=2,
              pad_token_id=0)
    cached = model.generate(ids, cache=lr.hf.LongrangeCache(), **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))


def test_bigbird_random_in_eval_hf_equals_its_dense_oracle():
    """In eval, r copies of block 0 for the non-global query blocks == + log(1 + r) on block 0's scores."""
    torch.manual_seed(0)
    att = lr.build_attention("bigbird", dim=16, heads=2, block_size=2, num_random_blocks=2, random_in_eval="hf")
    att = att.double().eval()
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[1, 11:] = False
    torch.testing.assert_close(att(x, attention_mask=keep), att.reference_forward(x, attention_mask=keep))
    same = lr.build_attention("bigbird", dim=16, heads=2, block_size=2, num_random_blocks=2).double().eval()
    same.load_state_dict(att.state_dict())
    assert not torch.allclose(att(x), same(x))
    att.train()
    assert torch.equal(att(x), same.train()(x))  # training: the seeded random blocks, whatever the eval policy
    with pytest.raises(ValueError, match="no global_mask"):
        att.eval()(x, global_mask=keep)
    with pytest.raises(ValueError, match="global_blocks_first"):
        lr.build_attention("bigbird", dim=16, heads=2, random_in_eval="hf", global_blocks_first=0)
