"""`longrange advise` / `lr.analysis.advise`: the cost model, its calibration by `longrange bench`, the
rules that rule candidates out, and the command."""

from __future__ import annotations

import importlib
import io
import json
import math

import pytest
from rich.console import Console
from typer.testing import CliRunner

import longrange as lr
from longrange.bench import harness, make_settings, run_bench
from longrange.bench.point import run_point
from longrange.cli import app
from longrange.core.config import ConfigError

adv = importlib.import_module("longrange.analysis.advise")  # the module (lr.analysis.advise is its function)
DIM, HEADS = 32, 2
SMALL = {"dim": DIM, "heads": HEADS}
FOUR = ("full", "local", "bigbird", "performer")


def calibration(times: dict[tuple[str, int], float], mem_mb=8.0, mode: str = "fwd") -> dict:
    """A calibration dict as `longrange bench` writes it, with given times (and memory: MiB, or
    {mechanism: MiB}) and the analytic flops."""
    points = []
    for (name, n), t in times.items():
        macs = adv.forward_macs(name, n, DIM, HEADS, {}, 1) * (3 if mode == "fwdbwd" else 1)
        points.append({"mechanism": name, "options": {}, "mode": mode, "n": n, "dim": DIM, "heads": HEADS, "batch": 1,
                       "dtype": "fp32", "device": "cpu", "threads": 2, "global_tokens": 0, "time_ms": t,
                       "mem_mb": mem_mb[name] if isinstance(mem_mb, dict) else mem_mb, "flops": 2 * macs})
    return {"format": adv.CALIBRATION_FORMAT, "machine": {"probe_gflops": 100.0}, "points": points}


def test_parse_bytes():
    assert adv.parse_bytes("2GiB") == 2 * 2**30 and adv.parse_bytes("512 MiB") == 512 * 2**20
    assert adv.parse_bytes("1.5G") == int(1.5 * 2**30) and adv.parse_bytes("3GB") == 3 * 10**9
    assert adv.parse_bytes(1000) == 1000 and adv.parse_bytes(None) is None
    with pytest.raises(ConfigError, match="memory budget") as err:
        adv.parse_bytes("lots")
    assert err.value.option == "memory_budget"


def test_interpolate_in_log_length_and_flat_beyond():
    pts = [(1024, 10.0), (4096, 40.0)]
    assert adv.interpolate(pts, 2048) == pytest.approx(20.0)  # a power law between two points is exact
    assert adv.interpolate(pts, 512) == pytest.approx(10.0) and adv.interpolate(pts, 16384) == pytest.approx(40.0)
    assert adv.interpolate([], 100) is None


def test_calibrated_times_reproduce_the_measured_points_and_follow_the_macs_between():
    calib = calibration({("full", 1024): 50.0, ("full", 4096): 400.0})
    at = {n: adv.predict("full", n, calibration=calib, **SMALL) for n in (1024, 2048, 4096, 16384)}
    assert at[1024].time_ms == pytest.approx(50.0) and at[4096].time_ms == pytest.approx(400.0)
    assert "calibrated fwd at n=1K,4K" in at[2048].basis
    rate = {n: at[n].macs / at[n].time_ms for n in at}
    assert rate[1024] < rate[2048] < rate[4096] == pytest.approx(rate[16384])  # interpolated, then held
    # memory: activation bytes x the measured ratio, which reproduces the measured memory
    assert at[1024].memory_mb == pytest.approx(8.0) and at[4096].memory_mb == pytest.approx(8.0)


def test_training_counts_forward_and_backward():
    fwd = adv.predict("local", 2048, job="inference", probe_gflops=10.0, **SMALL)
    train = adv.predict("local", 2048, job="training", probe_gflops=10.0, **SMALL)
    assert train.macs == 3 * fwd.macs and train.time_ms == pytest.approx(3 * fwd.time_ms)
    assert "probe" in fwd.basis


def test_rules_rank_and_reasons():
    calib = calibration({(m, n): t * (1 if m != "full" else 4) for m in FOUR for n, t in ((1024, 10.0), (4096, 50.0))})
    a = adv.advise(4096, job="inference", causal=True, exact=True, calibration=calib, **SMALL)
    why = {c.mechanism: c.ruled_out for c in a.candidates}
    assert why["bigbird"] == "no causal variant"
    assert why["performer"].startswith("not exact softmax attention")
    assert why["full"] is None and why["local"] is None
    assert [c.rank for c in a.candidates if c.rank] == [1, 2]
    assert a.choice.mechanism == "local" and a.choice.options["causal"] is True  # the causal variant
    assert a.choice.time_ms <= a.candidates[1].time_ms
    approx = adv.advise(4096, exact=False, calibration=calib, **SMALL)
    assert {c.mechanism for c in approx.candidates if c.ruled_out is None} == set(FOUR)
    table = approx.table()
    assert "| 1 |" in table and "approximate allowed" in table


def test_the_choice_fits_the_memory_budget():
    calib = calibration({(m, n): 10.0 * (4 if m == "full" else 1) * n / 1024 for m in ("full", "local")
                         for n in (1024, 4096)}, mem_mb={"full": 4.0, "local": 16.0})
    free = adv.advise(8192, calibration=calib, **SMALL)
    memories = sorted(c.memory_mb for c in free.candidates)
    budget = (memories[0] + memories[1]) / 2 * 2**20  # room for the smaller one only
    tight = adv.advise(8192, calibration=calib, memory_budget=budget, **SMALL)
    assert tight.choice.memory_mb * 2**20 <= budget
    assert sum(c.ruled_out is not None and "budget" in c.ruled_out for c in tight.candidates) == 1
    none = adv.advise(8192, calibration=calib, memory_budget=1, **SMALL)
    assert none.choice is None


def test_exactness_is_asked_of_the_mechanism():
    assert adv.is_exact("full") and adv.is_exact("local") and adv.is_exact("bigbird") and adv.is_exact("longformer")
    assert not adv.is_exact("performer") and not adv.is_exact("linformer") and not adv.is_exact("reformer")


def test_bench_writes_the_calibration_advise_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "run_point_subprocess", lambda spec, timeout=None: run_point(spec))
    s = make_settings(mechanisms="full,local", lengths="64,128", repeats=1, warmup=0, threads=1, out=tmp_path,
                      plot=False, options={"local": {"window": 32}}, **SMALL)
    run_bench(s, console=Console(file=io.StringIO()), show_progress=False)
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["format"] == adv.CALIBRATION_FORMAT and data["machine"]["probe_gflops"] > 0
    assert {(p["mechanism"], p["n"]) for p in data["points"]} == {(m, n) for m in ("full", "local") for n in (64, 128)}
    a = lr.analysis.advise(128, calibration=tmp_path, **SMALL)
    assert {c.mechanism for c in a.candidates} == {"full", "local"}
    local = next(c for c in a.candidates if c.mechanism == "local")
    assert local.options == {"window": 32} and local.basis.startswith("calibrated fwd")
    measured = next(p["time_ms"] for p in data["points"] if p["mechanism"] == "local" and p["n"] == 128)
    assert math.isclose(local.time_ms, measured, rel_tol=1e-9)
    with pytest.raises(ConfigError, match="no calibration file"):
        lr.analysis.advise(128, calibration=tmp_path / "missing", **SMALL)


def test_cli_advise(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration({(m, n): 10.0 * n / 1024 * (8 if m == "full" else 1)
                                            for m in ("full", "local", "performer") for n in (1024, 4096)})))
    runner = CliRunner()
    r = runner.invoke(app, ["advise", "-n", "4k", "--dim", str(DIM), "--heads", str(HEADS), "--calibration", str(path),
                            "--memory", "1GiB", "--causal"])
    assert r.exit_code == 0, r.output
    assert "choice: local" in r.output and "not exact softmax attention" in r.output
    r = runner.invoke(app, ["advise", "-n", "4k", "--dim", str(DIM), "--heads", str(HEADS), "--calibration", str(path),
                            "--format", "json", "--approximate"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["n"] == 4096 and {c["mechanism"] for c in data["candidates"]} == {"full", "local", "performer"}
    r = runner.invoke(app, ["advise", "-n", "4k", "--memory", "lots", "--calibration", str(path)])
    assert r.exit_code == 2 and "--memory" in r.output
