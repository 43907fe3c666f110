"""Models (`lr.models`): config round-trip, the Encoder with every registered attention, heads,
save/load, and the errors on bad input. Tiny random configs only."""

from __future__ import annotations

import json

import pytest
import torch

import longrange as lr
from longrange.mechanisms import ATTENTIONS
from longrange.models import CausalLM, Encoder, EncoderDecoder, ModelConfig

VOCAB, N = 50, 24


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=16, heads=2, layers=2, ffn_dim=32, max_length=64, dropout=0.0,
                attention="longformer", attention_options={"window": 4, "tile": 2})
    return ModelConfig(**{**base, **changes})


def ids_and_mask(b=2, n=N, lengths=(N, N - 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, n), generator=gen)
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~keep, 0), keep


# -- config ---------------------------------------------------------------------------------------------------------
def test_config_json_round_trip_with_per_layer_overrides():
    cfg = tiny(layers=3, layer_options=[{"window": 4}, {"window": 8}, {"attention": "dilated", "window": 4,
                                                                       "dilation": 2}])
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    model = Encoder(cfg)
    windows = [b.attention.config.window for b in model.stack.blocks]
    assert windows == [4, 8, 4]
    assert type(model.stack.blocks[2].attention).__name__ == "DilatedAttention"
    assert model.stack.blocks[2].attention.config.dilation == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"attention": "nope"}, "unknown attention 'nope'"),
    ({"attention_options": {"window": 5}}, "window must be a positive even int"),
    ({"attention_options": {"windw": 4}}, "unknown config key(s) ['windw']"),
    ({"attention_options": {"dim": 8}}, "set by the model"),
    ({"layer_options": [{}]}, "layer_options must be a list of 2 dicts"),
    ({"reversible": True}, "reversible=True needs norm='pre'"),
    ({"heads": 3}, "heads=3 must divide dim=16"),
    ({"head": "regression"}, "head must be one of"),
])
def test_config_errors_name_the_problem(changes, message):
    with pytest.raises((TypeError, ValueError)) as err:
        tiny(**changes)
    assert message in str(err.value)


def test_unknown_config_key_is_named():
    with pytest.raises(TypeError, match=r"unknown model config key\(s\) \['layer'\]"):
        ModelConfig.from_dict({**tiny().to_dict(), "layer": 3})


def test_causal_models_need_a_causal_attention():
    with pytest.raises(ValueError, match="attention 'bigbird' has no causal variant"):
        CausalLM(tiny(attention="bigbird", attention_options={"block_size": 2}))
    with pytest.raises(ValueError, match="attention 'longformer' has no causal variant"):
        CausalLM(tiny())


# -- the Encoder with every registered attention -----------------------------------------------------------------------
@pytest.mark.parametrize("name", lr.list_attentions())
def test_encoder_runs_with_every_attention(name):
    options = ATTENTIONS.get(name)[1].test_configs()[0]
    model = Encoder(tiny(attention=name, attention_options=options, head="masked_lm"))
    ids, keep = ids_and_mask()
    out = model(ids, attention_mask=keep, labels=ids.masked_fill(~keep, -100))
    assert out.last_hidden_state.shape == (2, N, 16) and out.logits.shape == (2, N, VOCAB)
    assert torch.isfinite(out.last_hidden_state[keep]).all()
    out.loss.backward()
    assert model.embeddings.word.weight.grad.abs().sum() > 0


def test_padding_does_not_change_real_tokens():
    model = Encoder(tiny()).eval()
    ids, keep = ids_and_mask(b=1, lengths=(17,))
    padded = model(ids, attention_mask=keep).last_hidden_state[:, :17]
    alone = model(ids[:, :17]).last_hidden_state
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_int_attention_mask_is_accepted_and_bad_shapes_are_named():
    model = Encoder(tiny()).eval()
    ids, keep = ids_and_mask()
    torch.testing.assert_close(model(ids, attention_mask=keep.long()).last_hidden_state,
                               model(ids, attention_mask=keep).last_hidden_state)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of shape \[B, N\] = \[2, 24\]"):
        model(ids, attention_mask=keep[:, :5])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.randn(2, N))
    with pytest.raises(ValueError, match="exceed max_length=64"):
        model(torch.ones(1, 65, dtype=torch.long))


# -- heads ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sequence_classification(pooling):
    model = Encoder(tiny(head="classification", num_labels=3, pooling=pooling))
    ids, keep = ids_and_mask()
    out = model(ids, attention_mask=keep, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    out.loss.backward()


def test_classification_makes_cls_global_for_longformer():
    model = Encoder(tiny(head="classification")).eval()
    ids, keep = ids_and_mask()
    glob = torch.zeros_like(keep)
    glob[:, 0] = True
    torch.testing.assert_close(model(ids, attention_mask=keep).logits,
                               model(ids, attention_mask=keep, global_mask=glob).logits)
    assert not torch.allclose(model(ids, attention_mask=keep).logits,
                              model(ids, attention_mask=keep, global_mask=torch.zeros_like(keep)).logits)


def test_mean_pooling_ignores_padding():
    model = Encoder(tiny(head="classification", pooling="mean", global_cls=False)).eval()
    ids, keep = ids_and_mask(b=1, lengths=(15,))
    torch.testing.assert_close(model(ids, attention_mask=keep).logits, model(ids[:, :15]).logits,
                               atol=1e-5, rtol=1e-5)


def test_token_classification_and_regression():
    model = Encoder(tiny(head="token_classification", num_labels=5))
    ids, keep = ids_and_mask()
    labels = torch.randint(0, 5, (2, N)).masked_fill(~keep, -100)
    out = model(ids, attention_mask=keep, labels=labels)
    assert out.logits.shape == (2, N, 5) and torch.isfinite(out.loss)
    reg = Encoder(tiny(head="classification", num_labels=1))
    assert torch.isfinite(reg(ids, attention_mask=keep, labels=torch.tensor([0.5, -1.0])).loss)


def test_question_answering_never_points_at_padding():
    model = Encoder(tiny(head="question_answering"))
    ids, keep = ids_and_mask()
    out = model(ids, attention_mask=keep, start_positions=torch.tensor([3, 4]), end_positions=torch.tensor([5, 9]))
    assert out.start_logits.shape == (2, N) and out.end_logits.shape == (2, N)
    assert torch.isfinite(out.loss)
    assert int(out.start_logits[1].argmax()) < N - 7


def test_masked_lm_decoder_is_tied():
    model = Encoder(tiny(head="masked_lm"))
    assert model.head.decoder.weight is model.embeddings.word.weight


# -- save / load ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Encoder, CausalLM, EncoderDecoder])
def test_save_and_load_round_trip(cls, tmp_path):
    cfg = tiny(head="masked_lm") if cls is Encoder else tiny(attention="local", attention_options={"window": 4})
    model = cls(cfg).eval()
    ids, _ = ids_and_mask()
    kwargs = {"decoder_input_ids": ids[:, :5]} if cls is EncoderDecoder else {}
    before = model(ids, **kwargs).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = cls.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded(ids, **kwargs).logits, before, atol=0, rtol=0)
    if cls is not EncoderDecoder:
        assert loaded.embeddings.word.weight is (loaded.head.decoder if cls is Encoder else loaded.lm_head).weight
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_load_with_a_new_head(tmp_path):
    Encoder(tiny(head="masked_lm")).save_pretrained(tmp_path)
    clf = Encoder.from_pretrained(tmp_path, head="classification", num_labels=4)
    assert clf.config.head == "classification" and clf.head.out.out_features == 4


def test_load_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Encoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Encoder.from_pretrained(tmp_path)
    Encoder(tiny()).save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="holds a Encoder checkpoint"):
        CausalLM.from_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match=r"shape mismatch .*embeddings.word.weight"):
        Encoder.from_pretrained(tmp_path / "enc", vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match=r"missing \['stack.blocks.2"):
        Encoder.from_pretrained(tmp_path / "enc", layers=3)
    (tmp_path / "enc" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        Encoder.from_pretrained(tmp_path / "enc")


def test_failed_save_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    Encoder(tiny()).save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "config.json").read_text()
    from longrange.core.files import staged_folder

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        Encoder(tiny(layers=1)).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="not empty"):
        with staged_folder(tmp_path / "out", overwrite=False):
            pass


# -- memory options ------------------------------------------------------------------------------------------------
def test_chunked_ffn_and_checkpointing_give_the_same_outputs_and_grads():
    ids, keep = ids_and_mask()
    results = []
    for changes in ({}, {"ffn_chunk_size": 5}, {"gradient_checkpointing": True}):
        torch.manual_seed(0)
        model = Encoder(tiny(head="masked_lm", **changes)).train()
        out = model(ids, attention_mask=keep, labels=ids.masked_fill(~keep, -100))
        out.loss.backward()
        results.append((out.loss.detach(), model.embeddings.word.weight.grad.clone()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model = Encoder(tiny(head="classification")).eval()
    ids, keep = ids_and_mask()
    ref = model(ids, attention_mask=keep).logits
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, attention_mask=keep).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


# -- the fine-tuning example ----------------------------------------------------------------------------------------
def test_finetune_example_runs_a_few_steps(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "finetune_classification.py"
    spec = importlib.util.spec_from_file_location("finetune_classification", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "2", "--length", "48", "--batch-size", "4", "--dim", "16", "--threads", "1",
                           "--out", str(tmp_path / "ft")])
    assert result["steps"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert Encoder.from_pretrained(tmp_path / "ft").config.head == "classification"
