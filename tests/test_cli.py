"""The `longrange` command line: version, list, bench errors, and one tiny bench run."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import longrange as lr
from longrange.cli import app

runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's box drawing removed and whitespace collapsed (panels wrap long lines)."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛┡┩┠┨╇╈┳┻╋]", " ", text).split())


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.output.strip() == f"longrange {lr.__version__}"


def test_list_shows_every_attention_with_fields_and_the_peers():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    for name in lr.list_attentions():
        assert name in out
    assert "num_random_blocks=3" in out and "random_in_eval='same'" in out
    assert "hf-longformer" in out and "hf-bigbird" in out
    assert "dim=768" in out  # the shared fields


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "full,nope"], ["Invalid value for --mechanisms", "unknown mechanism 'nope'", "bigbird",
                               "sparse_transformer", "hf-bigbird"]),
        (["--opt", "bigbird.block_size"], ["--opt", "expected MECHANISM.KEY=VALUE"]),
        (["--opt", "bigbird.blok=3"], ["unknown config key(s) ['blok']", "known keys"]),
        (["--mode", "sideways"], ["--mode", "fwd, fwdbwd or both"]),
        (["--lengths", "1k,x"], ["--lengths", "positive integers"]),
        (["--preset", "nope"], ["unknown preset 'nope'"]),
        (["--baseline", "nope"], ["unknown mechanism 'nope'"]),
    ],
)
def test_bench_bad_options_are_clear_errors(args, expected, tmp_path):
    r = runner.invoke(app, ["bench", "--out", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    out = flat(r.output)
    for piece in expected:
        assert piece in out, out
    assert not (tmp_path / "results.json").exists()


def test_bench_one_tiny_point(tmp_path):
    r = runner.invoke(app, ["bench", "-m", "full", "-n", "32", "--dim", "16", "--heads", "2", "--repeats", "1",
                            "--warmup", "0", "--threads", "1", "--no-plot", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "results.json").read_text())
    (point,) = data["points"]
    assert point["mechanism"] == "full" and point["n"] == 32 and point["error"] is None
    assert (tmp_path / "results.csv").exists() and not (tmp_path / "scaling.png").exists()
    out = flat(r.output)
    assert "time ms" in out and "matmul probe" in out
