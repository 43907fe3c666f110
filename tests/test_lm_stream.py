"""`longrange lm train` and `longrange lm stream` on a small temporary text file (typer's CliRunner),
and the streaming helpers underneath (chunked reading, segment windows, segment-recurrent training)."""

from __future__ import annotations

import json
import re

import torch
from typer.testing import CliRunner

from longrange.cli import app
from longrange.models import CausalLM
from longrange.models.memory import iter_windows, train_segments

runner = CliRunner()
TEXT = ("the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. " * 40)


def flat(text: str) -> str:
    """Output with rich's box drawing removed and whitespace collapsed (panels wrap long lines)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_windows_overlap_by_one_and_cover_every_token_from_any_chunking():
    tokens = torch.arange(23)
    for source in (tokens, tokens.tolist(), [tokens[:5], bytes(range(5, 12)), list(range(12, 23))]):
        windows = list(iter_windows(source, 5))
        assert [w.tolist() for w in windows][:2] == [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10]]
        assert torch.equal(torch.cat([w[1:] for w in windows]), tokens[1:])  # each target once
    assert list(iter_windows(torch.arange(1), 4)) == []


def test_stream_without_a_model_says_it_is_untrained(tmp_path):
    path = corpus(tmp_path)
    r = runner.invoke(app, ["lm", "stream", str(path), "--segment", "32", "--limit", "600", "--threads", "1",
                            "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "untrained xl" in r.output and "bits/byte" in r.output and "tokens/s" in r.output
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["tokens"] == 599 and row["segments"] == 19 and row["max_memory_tokens"] == 32
    assert 7.0 < row["bits_per_token"] < 9.0  # about log2(257) untrained


def test_train_then_stream_reports_a_lower_bits_per_byte(tmp_path):
    path = corpus(tmp_path)
    out = tmp_path / "lm"
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(out), "--steps", "40", "--segment", "32",
                            "--mem-len", "32", "--batch-size", "4", "--dim", "32", "--heads", "2", "--layers", "1",
                            "--ffn-dim", "64", "--eval-bytes", "512", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "held-out 512 bytes" in r.output and (out / "model.safetensors").exists()
    model = CausalLM.from_pretrained(out)
    assert model.uses_memory and model.config.max_length == 32
    r = runner.invoke(app, ["lm", "stream", str(path), "--model", str(out), "--segment", "32", "--mem-len", "64",
                            "--json", str(tmp_path / "t.json"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    trained = json.loads((tmp_path / "t.json").read_text())
    assert trained["max_memory_tokens"] == 64  # evaluated with a longer memory than trained with
    assert trained["bits_per_token"] < 6.0  # the untrained model is at ~8
    r = runner.invoke(app, ["lm", "stream", str(path), "--model", str(out), "--segment", "64"])
    assert r.exit_code == 2 and "exceeds the model's max_length=32" in flat(r.output)


def test_train_compressive_with_options(tmp_path):
    path = corpus(tmp_path)
    r = runner.invoke(app, ["lm", "train", str(path), "--out", str(tmp_path / "c"), "--attention", "compressive",
                            "--opt", "compression=mean", "--opt", "cmem_len=8", "--opt", "compression_rate=2",
                            "--steps", "3", "--segment", "16", "--mem-len", "16", "--dim", "16", "--heads", "2",
                            "--layers", "1", "--eval-bytes", "0", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert CausalLM.from_pretrained(tmp_path / "c").config.attention_options["compression"] == "mean"


def test_cli_errors_name_the_option(tmp_path):
    path = corpus(tmp_path)
    for args, needle in (
        (["stream", str(tmp_path / "missing.txt")], "is not a file"),
        (["stream", str(path), "--model", str(tmp_path / "nope")], "--model"),
        (["stream", str(path), "--attention", "bigbird"], "--attention"),
        (["train", str(path), "--out", str(tmp_path / "o"), "--opt", "compression"], "KEY=VALUE"),
        (["train", str(path), "--out", str(tmp_path / "o"), "--attention", "compressive", "--mem-len", "10"],
         "compression_rate=4 must divide mem_len=10"),
        (["train", str(path), "--out", str(tmp_path / "o"), "--batch-size", "1000", "--eval-bytes", "0"],
         "batch_size=1000"),
    ):
        r = runner.invoke(app, ["lm", *args])
        assert r.exit_code == 2 and needle in flat(r.output), (args, r.output)


def test_train_segments_carries_memory_and_learns():
    from longrange.models.memory import byte_lm_config

    torch.manual_seed(0)
    model = CausalLM(byte_lm_config("xl", dim=16, heads=2, layers=1, ffn_dim=32, segment=16, mem_len=16))
    tokens = torch.tensor(list(TEXT.encode()))
    losses = train_segments(model, tokens, segment_len=16, batch_size=4, steps=30, lr=1e-2)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
