"""scripts/lra_gpu.py, the one-call device run of issue 17: its plan, budgets, commands and folders.

The whole rehearsal (`scripts/lra_gpu.sh --device cpu --tiny`, minutes) is not run here; these tests
check what decides it: the phase order, the time shares, that every command's options exist in the
CLI, that a second call resumes instead of deleting, and that the bundle fits the device tool's limits.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import typer

from longrange.cli import app

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lra_gpu.py"


@pytest.fixture(scope="module")
def g():
    spec = importlib.util.spec_from_file_location("lra_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lra_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_phase_order_required_runs_then_speed_then_optional(g):
    names = g.phase_names(g.REQUIRED + g.OPTIONAL, g.PROFILES["paper"].speed_lengths)
    assert names == ["data", "train:full", "train:bigbird", "speed:4096", "speed:1024", "speed:2048", "speed:3072",
                     "train:longformer", "train:performer", "train:linformer", "train:local", "report"]
    assert g.runs_left("train:bigbird", names) == (1, 4) and g.runs_left("train:linformer", names) == (0, 2)
    assert g.reserve_after("train:full", names, g.PROFILES["paper"]) == pytest.approx(200 + 25)
    assert g.reserve_after("train:local", names, g.PROFILES["paper"]) == pytest.approx(25)


def test_allocator_shares(g):
    p = g.PROFILES["paper"]
    a = g.Allocator(p)
    assert a.share("full", 240.0, 2, 4) == pytest.approx(0.7 * 240 / 2)  # 70% for full and bigbird
    a.used("full", 50.0)  # full finished early: bigbird gets the rest of the 70%
    assert a.share("bigbird", 190.0, 1, 4) == pytest.approx(0.7 * 240 - 50)
    a.used("bigbird", 118.0)
    assert a.share("longformer", 72.0, 0, 4) == pytest.approx(60.0)  # at least min_run_s
    assert a.share("performer", 12.0, 0, 3) is None  # too little to start one
    assert g.Allocator(p).share("full", 100.0, 2, 0) == pytest.approx(50.0)  # no optional runs: all of it
    assert g.Allocator(p).share("longformer", 600.0, 0, 4) == pytest.approx(150.0)


@pytest.mark.parametrize("profile", ["paper", "tiny"])
def test_nominal_plan_fits_the_budget(g, profile):
    p = g.PROFILES[profile]
    budget = 60 * p.budget_minutes
    plan = g.nominal_plan(p, budget, g.REQUIRED + g.OPTIONAL)
    assert plan[0]["phase"] == "data" and plan[-1]["phase"] == "report"
    assert plan[-1]["start_s"] + plan[-1]["budget_s"] <= budget + 1e-6
    trains = {r["phase"]: r["budget_s"] for r in plan if r["phase"].startswith("train:")}
    assert trains["train:full"] >= p.min_run_s and trains["train:bigbird"] >= p.min_run_s
    assert sum(r["budget_s"] for r in plan if r["phase"].startswith("speed:")) == \
        pytest.approx(p.sweep_s * len(p.speed_lengths))


def _options(command_path: list[str]) -> set[str]:
    cmd = typer.main.get_command(app)
    for name in command_path:
        cmd = cmd.commands[name]
    return {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}


def _check_options(cmd: list[str], sub: list[str]) -> None:
    assert cmd[1:3] == ["-m", "longrange.cli"] and cmd[3:3 + len(sub)] == sub
    used = {w for w in cmd if w.startswith("--")}
    assert used <= _options(sub), used - _options(sub)


def test_every_command_uses_existing_cli_options(g, tmp_path):
    for p in g.PROFILES.values():
        data = tmp_path / "data"
        _check_options(g.generate_command("python", p, data, 16, 0), ["lra", "generate"])
        for resume in (False, True):
            _check_options(g.train_command("python", p, "bigbird", data, tmp_path / "run", "cuda", 1.5, resume),
                           ["lra", "train"])
        _check_options(g.speed_command("python", p, 4096, "cuda", tmp_path / "s"), ["lra", "speed"])
        _check_options(g.report_command("python", [tmp_path / "r"], [tmp_path / "s"], tmp_path / "o"),
                       ["lra", "report"])
    train = g.train_command("python", g.PROFILES["paper"], "full", data, tmp_path / "run", "cuda", 1.5, False)
    assert {"--amp", "--preset", "listops", "--max-minutes", "1.500"} <= set(train)
    speed = g.speed_command("python", g.PROFILES["paper"], 4096, "cuda", tmp_path / "s")
    assert speed[speed.index("--attention") + 1] == "full,local,linformer,reformer,bigbird,linear,performer"
    assert [speed[speed.index(k) + 1] for k in ("--batch-size", "--steps", "--warmup")] == ["32", "3", "1"]
    assert "--paper-sizes" in g.generate_command("python", g.PROFILES["paper"], data, 16, 0)


def test_plan_only_prints_every_phase(g, capsys, tmp_path):
    assert g.main(["--plan-only", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "profile paper, budget 8 min" in out and "--paper-sizes" in out and "--lengths 4096" in out
    assert out.count("lra train") == 3 and "skipped: too little time left" in out  # full, bigbird, longformer
    assert g.main(["--plan-only", "--tiny", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.count("lra train") == 6
    assert g.main(["--plan-only", "--mechanisms", "full,bigbird", "--speed-lengths", "",
                   "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "lra speed" not in out and out.count("lra train") == 2
    full = float(re.search(r"train:full +(\d+) s", out).group(1))
    assert full > 150  # without sweeps and optional runs, full and bigbird share the training time
    assert not (tmp_path / "o").exists()  # planning writes nothing
    with pytest.raises(SystemExit):
        g.main(["--plan-only", "--mechanisms", "full,bigbrid"])


def test_the_paper_digest_is_the_tests(g):
    from test_lra_data import PAPER_SEED0_FIRST_1K

    assert g.PAPER_SEED0_FIRST_1K == PAPER_SEED0_FIRST_1K


def test_second_call_resumes_and_never_deletes(g, tmp_path):
    ctx = type("Ctx", (), {"out": tmp_path})()
    assert g.run_folder(ctx, "full") == (tmp_path / "runs" / "listops-full", "new")
    run = tmp_path / "runs" / "listops-full"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "trainer.pt").write_bytes(b"x")
    (run / "summary.json").write_text(json.dumps({"stopped_early": True}))
    assert g.run_folder(ctx, "full") == (run, "resume")
    (run / "summary.json").write_text(json.dumps({"stopped_early": False}))
    assert g.run_folder(ctx, "full") == (run, "done")
    killed = tmp_path / "runs" / "listops-bigbird"
    killed.mkdir()
    (killed / "metrics.csv").write_text("step,split\n")  # killed before its first checkpoint: kept
    assert g.run_folder(ctx, "bigbird") == (killed.with_name("listops-bigbird.2"), "new")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="not written by this script"):
        g.check_folders(foreign, None, g.PROFILES["paper"])
    with pytest.raises(SystemExit, match="does not write"):
        g.check_folders(tmp_path / "new", str(foreign), g.PROFILES["paper"])


def test_bundle_fits_the_device_tool(g, tmp_path):
    """At most 8 files, names of letters, digits, '.', '_' and '-', no heavy files in results.tar.gz."""
    out, dest = tmp_path / "lra-gpu", tmp_path / "OUT"
    for rel in ("log.txt", "status.json", "data/listops/basic_train.tsv", "data/listops/manifest.json",
                "runs/listops-full/summary.json", "runs/listops-full/checkpoint/model.safetensors",
                "runs/listops-full/best/model.json", "speed/n4096/speed.json", "report/report.png",
                "report/speed.png"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("{}")
    (out / "report" / "report.md").write_text("![a](report.png)\n![b](speed.png)\n")
    args = type("Args", (), {"bundle": str(dest)})()
    ctx = type("Ctx", (), {"args": args, "out": out, "profile": g.PROFILES["paper"]})()
    g.bundle(ctx)
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["log.txt", "lra-gpu-listops-speed.png", "lra-gpu-listops.md", "lra-gpu-listops.png",
                     "results.tar.gz", "status.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files) and all((dest / f).is_file() for f in files)
    md = (dest / "lra-gpu-listops.md").read_text()
    assert "](lra-gpu-listops.png)" in md and "](lra-gpu-listops-speed.png)" in md
    import tarfile

    with tarfile.open(dest / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "lra-gpu/runs/listops-full/summary.json" in names and "lra-gpu/data/listops/manifest.json" in names
    assert not [n for n in names if n.endswith((".tsv", ".safetensors")) or "/best/" in n]
    g.check_folders(out, str(dest), g.PROFILES["paper"])  # a second call accepts its own folders
