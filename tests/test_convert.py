"""Pretrained conversion (`lr.hf.convert_to_long`, `lr.hf.encoder_from_hf`, `longrange convert`).

Tiny random HF models are built here (nothing is downloaded), their weights perturbed away from
HF's init (LayerNorm 1/0, zero biases) so every copied tensor matters. Parity is in float32 eval
mode at 1e-5, on real tokens only (padding rows are unspecified)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import longrange as lr
from longrange.models import Encoder

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BigBirdConfig,
    BigBirdModel,
    LongformerConfig,
    LongformerModel,
    RobertaConfig,
    RobertaModel,
)

VOCAB, DIM, HEADS = 60, 16, 2
TOL = {"atol": 1e-5, "rtol": 1e-5}


def perturbed(model):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def small(**extra):
    return dict(vocab_size=VOCAB, hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2, intermediate_size=32,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


def bert(mlm=False):
    torch.manual_seed(0)
    cls = BertForMaskedLM if mlm else BertModel
    return perturbed(cls(BertConfig(**small(max_position_embeddings=32, type_vocab_size=2))))


def roberta():
    torch.manual_seed(0)
    cfg = RobertaConfig(**small(max_position_embeddings=34, type_vocab_size=1, pad_token_id=1))
    return perturbed(RobertaModel(cfg))


def batch(n, lengths, pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=gen)
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~keep, pad), keep


def assert_real_close(actual, expected, keep):
    torch.testing.assert_close(actual[keep], expected[keep], **TOL)


# -- BERT / RoBERTa -> long ---------------------------------------------------------------------------------------
CASES = [("longformer", {"window": 64}), ("bigbird", {"block_size": 8, "num_random_blocks": 1})]


@pytest.mark.parametrize(("attention", "options"), CASES)
@pytest.mark.parametrize("n", [32, 19])  # the original max length, and shorter with padding
def test_bert_converted_matches_hf(attention, options, n):
    hf = bert()
    ours = lr.hf.convert_to_long(hf, attention=attention, max_length=128, **options)
    ids, keep = batch(n, [n, n - 6], pad=0)
    types = (torch.arange(n)[None, :] >= n // 2).long().expand(2, n)
    expected = hf(ids, attention_mask=keep.long(), token_type_ids=types).last_hidden_state
    actual = ours(ids, attention_mask=keep, token_type_ids=types).last_hidden_state
    assert_real_close(actual, expected, keep)
    assert ours.config.max_length == 128 and ours.embeddings.position.num_embeddings == 128


@pytest.mark.parametrize(("attention", "options"), CASES)
def test_roberta_converted_matches_hf(attention, options):
    hf = roberta()
    ours = lr.hf.convert_to_long(hf, attention=attention, max_length=100, **options)
    assert ours.embeddings.position.num_embeddings == 102  # two reserved rows on top
    n = 32
    ids, keep = batch(n, [n, 20], pad=1)
    expected = hf(ids, attention_mask=keep.long()).last_hidden_state
    assert_real_close(ours(ids, attention_mask=keep).last_hidden_state, expected, keep)


def test_longformer_global_tokens_do_not_change_a_full_window():
    hf = bert()
    ours = lr.hf.convert_to_long(hf, max_length=64, window=64)
    ids, keep = batch(30, [30, 22], pad=0)
    glob = torch.zeros_like(keep)
    glob[:, 0] = True
    glob[0, 9] = True
    expected = hf(ids, attention_mask=keep.long()).last_hidden_state
    assert_real_close(ours(ids, attention_mask=keep, global_mask=glob).last_hidden_state, expected, keep)
    block = ours.stack.blocks[0].attention
    torch.testing.assert_close(block.qkv_global.weight, block.qkv.weight)


def test_mlm_head_is_converted():
    hf = bert(mlm=True)
    ours = lr.hf.convert_to_long(hf, max_length=64, window=64)
    assert ours.config.head == "masked_lm" and ours.head.decoder.weight is ours.embeddings.word.weight
    ids, keep = batch(25, [25, 11], pad=0)
    assert_real_close(ours(ids, attention_mask=keep).logits, hf(ids, attention_mask=keep.long()).logits, keep)


def test_position_table_is_tiled():
    table = torch.arange(7.0)[:, None].expand(7, 3)
    bert_like = lr.hf.extend_positions(table, 0, 16)
    assert bert_like[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6] * 2 + [0, 1]
    roberta_like = lr.hf.extend_positions(table, 2, 12)
    assert roberta_like[:, 0].tolist() == [0, 1] + [2, 3, 4, 5, 6] * 2 + [2, 3]


def test_converted_model_runs_past_the_original_length():
    hf = roberta()
    ours = lr.hf.convert_to_long(hf, max_length=200, window=8)
    ids, keep = batch(150, [150, 90], pad=1)
    out = ours(ids, attention_mask=keep).last_hidden_state
    assert out.shape == (2, 150, DIM) and torch.isfinite(out[keep]).all()
    # the first 32 positions still see what the original model saw, up to the window
    short = lr.hf.convert_to_long(hf, max_length=200, window=8)(ids[:, :32]).last_hidden_state
    assert short.shape == (2, 32, DIM)


def test_folder_to_folder_with_tokenizer(tmp_path):
    hf = bert()
    src = tmp_path / "bert"
    hf.save_pretrained(src)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=32).save_pretrained(src)
    ours = lr.hf.convert_to_long(src, max_length=96, output_dir=tmp_path / "long", window=64)
    assert json.loads((tmp_path / "long" / "tokenizer_config.json").read_text())["model_max_length"] == 96
    assert (tmp_path / "long" / "tokenizer.json").is_file() or (tmp_path / "long" / "vocab.txt").is_file()
    loaded = Encoder.from_pretrained(tmp_path / "long")
    ids, keep = batch(32, [32, 12], pad=0)
    expected = hf(ids, attention_mask=keep.long()).last_hidden_state
    assert_real_close(loaded(ids, attention_mask=keep).last_hidden_state, expected, keep)
    assert_real_close(ours(ids, attention_mask=keep).last_hidden_state, expected, keep)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "long")
    assert tok.model_max_length == 96


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors(tmp_path):
    hf = bert()
    with pytest.raises(ValueError, match="max_length=16 is below the model's original max length 32"):
        lr.hf.convert_to_long(hf, max_length=16)
    with pytest.raises(ValueError, match="window must be a positive even int"):
        lr.hf.convert_to_long(hf, max_length=64, window=7)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['windw'\]"):
        lr.hf.convert_to_long(hf, max_length=64, windw=8)
    with pytest.raises(ValueError, match="unsupported architecture .*GPT2Model"):
        lr.hf.convert_to_long(transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lr.hf.convert_to_long(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        lr.hf.convert_to_long(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        lr.hf.convert_to_long(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        lr.hf.convert_to_long(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture .*BertModel"):
        lr.hf.encoder_from_hf(hf)


def test_nothing_half_written(tmp_path, monkeypatch):
    hf = bert()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        lr.hf.convert_to_long(hf, max_length=64, output_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lr.hf.convert_to_long(hf, max_length=64, output_dir=tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- HF Longformer / BigBird -> ours ---------------------------------------------------------------------------------
def test_longformer_model_matches_hf():
    torch.manual_seed(0)
    hf = perturbed(LongformerModel(LongformerConfig(**small(attention_window=[4, 8], max_position_embeddings=66,
                                                            pad_token_id=1, type_vocab_size=1))))
    ours = lr.hf.encoder_from_hf(hf)
    assert [b.attention.config.window for b in ours.stack.blocks] == [4, 8]
    ids, keep = batch(21, [21, 14], pad=1)
    glob = torch.zeros_like(keep)
    glob[:, 0] = True
    glob[0, 12] = True
    expected = hf(ids, attention_mask=keep.long(), global_attention_mask=glob.long()).last_hidden_state
    assert_real_close(ours(ids, attention_mask=keep, global_mask=glob).last_hidden_state, expected, keep)
    expected = hf(ids, attention_mask=keep.long()).last_hidden_state  # no global tokens
    assert_real_close(ours(ids, attention_mask=keep).last_hidden_state, expected, keep)


def bigbird(r):
    torch.manual_seed(0)
    cfg = BigBirdConfig(**small(block_size=4, num_random_blocks=r, attention_type="block_sparse",
                                max_position_embeddings=64, hidden_act="gelu_new",
                                bos_token_id=2, eos_token_id=3, sep_token_id=4))
    return perturbed(BigBirdModel(cfg))


@pytest.mark.parametrize(("r", "n"), [(1, 30), (2, 41)])  # n > (5 + 2r)·b: HF stays block-sparse
def test_bigbird_model_matches_hf_with_aligned_random_blocks(r, n):
    """HF BigBirdModel cannot run without random blocks, and in eval mode it repeats block 0 in
    their place (see longrange.hf.attention): compare with HF drawing our random blocks."""
    hf = bigbird(r)
    ours = lr.hf.encoder_from_hf(hf, random_in_eval="same")
    assert ours.config.pad_to_multiple_of == 4 and ours.config.activation == "gelu_tanh"
    assert [b.attention.config.seed for b in ours.stack.blocks] == [0, 1]  # HF's seed = layer index
    ids, keep = batch(n, [n, n - 5], pad=0)  # HF pads to a multiple of 4, and so do we
    with contextlib.ExitStack() as stack:
        for layer, block in zip(hf.encoder.layer, ours.stack.blocks, strict=True):
            stack.enter_context(lr.hf.aligned_random_blocks(layer.attention, block.attention))
        expected = hf(ids, attention_mask=keep.long()).last_hidden_state
    assert_real_close(ours(ids, attention_mask=keep).last_hidden_state, expected, keep)


def test_encoder_from_hf_saves_and_reloads(tmp_path):
    hf = bigbird(1)
    ours = lr.hf.encoder_from_hf(hf)
    ours.save_pretrained(tmp_path)
    ids, keep = batch(30, [30, 23], pad=0)
    assert_real_close(Encoder.from_pretrained(tmp_path)(ids, attention_mask=keep).last_hidden_state,
                      ours(ids, attention_mask=keep).last_hidden_state, keep)


# -- the command ------------------------------------------------------------------------------------------------------
def test_cli_convert(tmp_path):
    from typer.testing import CliRunner

    from longrange.cli import app

    runner = CliRunner()
    hf = roberta()
    hf.save_pretrained(tmp_path / "src")
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--attention", "longformer",
                            "--max-length", "128", "--opt", "window=64"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "max_length 128" in r.output
    ours = Encoder.from_pretrained(tmp_path / "dst")
    assert ours.config.attention_options == {"window": 64}
    ids, keep = batch(32, [32, 20], pad=1)
    assert_real_close(ours(ids, attention_mask=keep).last_hidden_state,
                      hf(ids, attention_mask=keep.long()).last_hidden_state, keep)
    # bad input: clear errors, exit code 1 (2 for malformed options), nothing written
    cases = [
        (["--max-length", "8"], "below the model's original max length 32"),
        (["--attention", "nope"], "unknown attention 'nope'"),
        (["--opt", "window=5"], "window must be a positive even int"),
        (["--opt", "window"], "expected KEY=VALUE"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "bad"), *args])
        assert r.exit_code in (1, 2) and message in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "bad")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert r.exit_code == 1 and "not empty" in r.output
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
