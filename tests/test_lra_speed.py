"""`longrange lra speed`: LRA's Table 2 measurement (one fresh process per point), its outputs, the report, the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from longrange.cli import app
from longrange.core.config import ConfigError
from longrange.lra import speed
from longrange.lra.speed import FIELDS, SpeedSettings, check_settings, speed_sweep

REAL_RUNNER = speed.run_point_subprocess  # before any test replaces it
TINY = dict(lengths=(32, 64), batch_size=2, steps=1, warmup=1, task="text", preset="tiny", device="cpu", threads=1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real sweep: 2 mechanisms × 2 tiny lengths, every point in its own process."""
    out = tmp_path_factory.mktemp("speed")
    rows = speed_sweep(SpeedSettings(attentions=("full", "performer"), out=out, **TINY), show_progress=False)
    return out, rows


@pytest.fixture
def in_process(monkeypatch):
    """Points measured in this process (fast) instead of a fresh interpreter each."""
    monkeypatch.setattr(speed, "run_point_subprocess", lambda spec, timeout=None: speed.measure(spec))


def test_tiny_sweep_writes_csv_and_json(sweep):
    out, rows = sweep
    assert [(r["attention"], r["length"]) for r in rows] == [("full", 32), ("performer", 32), ("full", 64),
                                                             ("performer", 64)]
    with (out / "speed.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == FIELDS and len(table) == 4
    data = json.loads((out / "speed.json").read_text())
    assert data["meta"]["settings"]["batch_size"] == 2 and len(data["rows"]) == 4
    for r in data["rows"]:
        assert r["error"] is None, r["error"]
        assert r["steps_per_s"] > 0 and r["examples_per_s"] == pytest.approx(2 * r["steps_per_s"])
        assert r["peak_memory_mb"] >= 0 and r["memory_kind"] == "cpu_rss_growth" and r["params"] > 10_000
        assert r["threads_used"] == 1 and r["wall_s"] > 0 and r["flush_denormal"] is True
        assert r["paper_ratio"] is None  # 32 and 64 are not Table 2 lengths
    full = [r for r in data["rows"] if r["attention"] == "full"]
    assert all(r["ratio_full"] == 1.0 for r in full)
    assert (out / "speed.md").read_text().count("| performer |") == 2


def test_model_is_built_as_lra_train_builds_it(in_process):
    row = speed.speed_point({"attention": "linformer", "length": 48, "batch_size": 2, "task": "text",
                             "preset": "tiny", "device": "cpu", "threads": 1, "amp": True, "steps": 1, "warmup": 0})
    assert row["attention_options"] == {"k": 16, "seq_len": 48}  # tiny preset's k, the length as seq_len
    point = speed.build_point({"attention": "full", "length": 40, "batch_size": 3, "task": "retrieval",
                                         "preset": "tiny", "amp": False, "steps": 1, "warmup": 0})
    batch = point.batch
    assert batch["input_ids"].shape == batch["input_ids2"].shape == (3, 40) and batch["attention_mask"].all()
    assert (batch["input_ids"][:, 0] == 1).all() and point.model.dual  # CLS first; two towers


def test_failing_points_become_error_rows(tmp_path, in_process):
    rows = speed_sweep(attentions=("full", "local"), options={"local": {"no_such_option": 1}}, out=tmp_path,
                       show_progress=False, **{**TINY, "lengths": (32,)})
    assert rows[0]["error"] is None and "no_such_option" in rows[1]["error"]
    data = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert data[1]["ratio_full"] is None and "ValueError" in data[1]["error"]
    assert "error: ValueError" in (tmp_path / "speed.md").read_text()
    spec = speed.plan_points(check_settings(SpeedSettings(attentions=("full",), **TINY)))[0]
    timed_out = REAL_RUNNER(spec, timeout=0.05)  # a real process, stopped
    assert "timed out after 0.05 s" in timed_out["error"]


def test_report_includes_the_speed_rows(sweep, tmp_path):
    from longrange.lra.report import add_speed_ratios, collect_speed, write_report

    out, _ = sweep
    paths = write_report([], tmp_path / "rep", speed=collect_speed([out]))
    md = paths["md"].read_text()
    assert "Table 2 measurement" in md and md.count("| performer | ") == 2 and "## Accuracy" not in md
    assert paths["speed_png"].read_bytes()[:4] == b"\x89PNG"
    rows = [{"attention": a, "length": 1024, "batch_size": 32, "task": "text", "preset": "text", "device": "cuda",
             "amp": False, "steps_per_s": sps, "peak_memory_mb": mb, "error": None}
            for a, sps, mb in (("full", 2.0, 800.0), ("bigbird", 3.0, 400.0))]
    bigbird = add_speed_ratios(rows)[1]
    assert bigbird["ratio_full"] == 1.5 and bigbird["memory_ratio_full"] == 0.5
    assert bigbird["paper_ratio"] == pytest.approx(7.4 / 8.1) and bigbird["paper_gb"] == 0.77


def test_cli_speed_and_report(tmp_path, in_process):
    runner = CliRunner()
    out = tmp_path / "sp"
    res = runner.invoke(app, ["lra", "speed", "--attention", "full,bigbird", "--lengths", "64", "--preset", "tiny",
                              "--batch-size", "2", "--steps", "1", "--threads", "1", "--out", str(out),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 point(s) measured, 0 failed" in res.output and "LRA speed" in res.output
    assert (out / "speed.csv").is_file()
    res = runner.invoke(app, ["lra", "report", "--speed", str(out), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "| bigbird | 64 |" in (tmp_path / "rep" / "report.md").read_text()
    res = runner.invoke(app, ["lra", "report", str(out), "--out", str(tmp_path / "rep2")])  # detected as a speed dir
    assert res.exit_code == 0 and "| bigbird | 64 |" in (tmp_path / "rep2" / "report.md").read_text()


@pytest.mark.parametrize("args, named", [
    (["--attention", "full,nope"], "--attention"),
    (["--lengths", "1024,abc"], "--lengths"),
    (["--lengths", "0"], "--lengths"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--device", "tpu"], "--device"),
    (["--task", "nope"], "--task"),
    (["--preset", "huge"], "--preset"),
    (["--threads", "0"], "--threads"),
    (["--timeout", "0"], "--timeout"),
])
def test_cli_bad_arguments_name_them(tmp_path, args, named):
    res = CliRunner().invoke(app, ["lra", "speed", *args, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and named in res.output, res.output
    assert not (tmp_path / "x").exists()


def test_python_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="not in the sweep") as e:
        check_settings(SpeedSettings(attentions=("full",), options={"bigbird": {}}, **TINY))
    assert e.value.option == "options"
    res = CliRunner().invoke(app, ["lra", "report", "--speed", str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--speed: no speed.json" in res.output
