"""LRA training: presets, one step per task, checkpoints, bit-identical resume, accumulation, DDP, report, CLI.

Most tests train on a small deterministic stand-in dataset (`fake_split`, installed over
`longrange.lra.load_split`) so they stay fast and independent of the built-in data's sizes; one
test runs a step on the built-in tiny data itself.
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

import longrange as lr
import longrange.lra as lra
from longrange.cli import app
from longrange.lra import presets as P
from longrange.lra.tasks import TASKS, LRADataset
from longrange.lra.train import TrainConfig, evaluate, train
from workers import finish_worker, rendezvous, start_worker

TASK_NAMES = list(P.TASK_NAMES)


def fake_split(task, split, data_dir=None, *, max_length=None, length=40, **options):
    """A tiny learnable stand-in: label = first symbol mod classes; lengths vary (padding is exercised)."""
    spec = TASKS[task]
    n = {"train": 48, "val": 16, "test": 16}[split]
    rng = np.random.default_rng(zlib.crc32(f"{task}/{split}".encode()))  # the same in every process
    lengths = rng.integers(length // 2, length + 1, size=n)
    symbols = [rng.integers(0, spec.vocab_size - 2, size=int(k)).astype(np.uint8) for k in lengths]
    labels = [int(s[0]) % spec.num_classes for s in symbols]
    symbols2 = [rng.integers(0, spec.vocab_size - 2, size=int(k)).astype(np.uint8) for k in lengths] \
        if spec.dual else None
    return LRADataset(spec, symbols, labels, max_length=length + 1, synthetic=True, symbols2=symbols2, split=split)


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(lra, "load_split", fake_split)


def config(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(task="listops", attention="full", preset="tiny", steps=4, batch_size=8, eval_every=2,
                log_every=1, progress=False, tensorboard=False, out=str(tmp_path / name), threads=1)
    return TrainConfig(**{**base, **kw})


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def weights(run_dir):
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


# -- presets ------------------------------------------------------------------------------------------------------
def test_presets_follow_the_references():
    lo, lo_paper = P.get_preset("listops"), P.get_preset("listops", "paper")
    assert (lo.batch_size, lo.steps, lo.lr, lo.weight_decay, lo.warmup) == (32, 5000, 0.05, 0.1, 1000)
    assert (lo.dim, lo.heads, lo.layers, lo.mlp_dim, lo.pooling, lo.max_length) == (512, 8, 4, 1024, "cls", 2000)
    assert (lo_paper.layers, lo_paper.mlp_dim) == (6, 2048) and P.get_preset("listops", "listops-paper") == lo_paper
    assert P.get_preset("retrieval", "paper").lr == 0.5 and P.get_preset("text", "paper").max_length == 4000
    img, pf = P.get_preset("image"), P.get_preset("pathfinder")
    assert (img.batch_size, img.epochs, img.schedule, img.dropout, img.attention_dropout, img.layers) == \
        (256, 200, "cosine", 0.3, 0.2, 1)
    assert (pf.batch_size, pf.lr, pf.pooling, pf.dim) == (512, 1e-3, "mean", 32)
    assert pf.total_steps(160_000) == 200 * 312 and pf.warmup_steps(160_000) == 312  # one epoch of warm-up
    assert {f"{t}-tiny" for t in TASK_NAMES} <= set(P.list_presets())
    # rsqrt: lr · min(1, s/w) / sqrt(max(s, w)) peaks at lr / sqrt(w)
    assert P.schedule_factor("rsqrt", 999, 1000, 5000) * 0.05 == pytest.approx(0.05 / 1000 ** 0.5)
    assert P.schedule_factor("cosine", 99, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_preset_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown task 'lisops'"):
        P.get_preset("lisops")
    with pytest.raises(ValueError, match="unknown preset 'huge'.*released"):
        P.get_preset("listops", "huge")
    with pytest.raises(ValueError, match="is for task 'text'"):
        P.get_preset("listops", "text-paper")
    with pytest.raises(ValueError, match="'window' does not apply to 'bigbird'; its options"):
        P.attention_options(P.get_preset("listops"), "bigbird", 2000, {"window": 3})
    with pytest.raises(ValueError, match="unknown attention 'bigbrd'"):
        P.attention_options(P.get_preset("listops"), "bigbrd", 2000)


def test_lra_attention_defaults_use_real_option_names():
    for name, options in P.LRA_ATTENTION_DEFAULTS.items():
        assert set(options) <= set(lr.mechanisms.config_class(name).option_defaults()), name
    pre = P.get_preset("listops")
    assert P.attention_options(pre, "bigbird", 2000) == {}  # LRA's (64, 3) are BigBird's own defaults
    assert P.attention_options(pre, "local", 2000) == {"window": 20, "tile": 10}
    assert P.attention_options(pre, "linformer", 2001)["seq_len"] == 2001
    assert P.attention_options(P.get_preset("text"), "linformer", 1000)["k"] == 32
    assert P.attention_options(pre, "performer", 2000, {"nb_features": 128}) == {"nb_features": 128}


def test_every_attention_combines_with_a_preset():
    from longrange.lra.model import build_model
    from longrange.mechanisms import list_attentions

    pre, spec = P.get_preset("listops", "tiny"), TASKS["listops"]
    ids = torch.randint(2, spec.vocab_size, (2, 40))
    keep = torch.arange(40)[None, :] < torch.tensor([[40], [25]])
    for name in list_attentions():
        model = build_model(pre, name, num_classes=10, vocab_size=spec.vocab_size, max_length=41,
                            options=P.attention_options(pre, name, 41))
        logits = model(ids.masked_fill(~keep, 0), keep)
        logits.sum().backward()
        assert logits.shape == (2, 10) and torch.isfinite(logits).all(), name


def test_parameter_rule_is_computed_and_flagged():
    pre = P.get_preset("listops")
    ok = P.parameter_check(pre, "bigbird", num_classes=10, vocab_size=17, max_length=2000)
    assert ok.ok and ok.ratio == 1.0 and ok.params > 9_000_000
    with pytest.warns(UserWarning, match="OUTSIDE LRA's"):  # shared QK: a quarter of the attention weights fewer
        bad = P.parameter_check(pre, "reformer", num_classes=10, vocab_size=17, max_length=2000)
    assert not bad.ok and bad.ratio < 0.9 and bad.base_params == ok.base_params


# -- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_NAMES)
def test_one_step_per_task_two_mechanisms(task, tmp_path, fake_data):
    for attention in ("full", "bigbird"):
        summary = train(config(tmp_path, f"{task}-{attention}", task=task, attention=attention, steps=1))
        assert summary["steps"] == 1 and 0.0 <= summary["test_accuracy"] <= 1.0
        assert summary["params"] > 0 and summary["param_rule_ok"]
        assert np.isfinite(summary["test_loss"])


def test_builtin_tiny_data_trains_a_step(tmp_path):
    try:
        lra.load_split("listops", "train")
    except NotImplementedError:
        pytest.skip("built-in tiny ListOps not there yet")
    summary = train(config(tmp_path, task="listops", attention="bigbird", steps=1,
                           data_options={"variant": "short", "sizes": [64, 16, 16]}))
    assert summary["steps"] == 1 and "built-in" in summary["data"] and "short" in summary["data"]


def test_amp_bf16_on_cpu(tmp_path, fake_data):
    summary = train(config(tmp_path, amp=True, steps=2))
    assert summary["amp"] and np.isfinite(summary["test_loss"])


def test_checkpoint_is_atomic(tmp_path, fake_data, monkeypatch):
    """A failure while writing the second checkpoint leaves the first one whole and no temporary folder."""
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(str(path))
        if str(path).endswith("trainer.pt") and sum(c.endswith("trainer.pt") for c in calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config(tmp_path, steps=4, checkpoint_every=2))
    assert not (run / ".checkpoint.tmp").exists() and not (run / ".checkpoint.old").exists()
    state = torch.load(run / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["state"]["step"] == 2
    assert set(weights(run)) == set(load_file(str(run / "best" / "model.safetensors")))


def test_resume_after_kill_is_bit_identical(tmp_path, fake_data):
    """Dropout on and BigBird's random blocks: a run killed at step 5 (checkpoint at 4) and resumed
    ends with the same parameters, bit for bit, and the same metrics.csv as a straight run."""
    kw = dict(attention="bigbird", steps=6, checkpoint_every=2, eval_every=3, log_every=3, dropout=0.1,
              options={"block_size": 8})  # the checkpoint at step 4 falls inside a logging window (4..6)
    train(config(tmp_path, "straight", **kw))

    def kill(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "killed", **kw), on_step=kill)
    killed = tmp_path / "killed"
    assert torch.load(killed / "checkpoint" / "trainer.pt", weights_only=True)["state"]["step"] == 4
    summary = train(TrainConfig(out=str(killed), resume=True, progress=False, tensorboard=False))
    assert summary["steps"] == 6
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()


def test_resume_errors(tmp_path, fake_data):
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        train(config(tmp_path, resume=True))
    with pytest.raises(ValueError, match="--resume needs the run folder"):
        train(TrainConfig(resume=True))
    train(config(tmp_path, steps=1))
    with pytest.raises(FileExistsError, match="--resume to continue it or --overwrite"):
        train(config(tmp_path, steps=1))


def assert_same_training(a: dict, b: dict) -> None:
    """Two runs that differ only in how a batch's gradient was summed (accumulation, processes) end
    with the same parameters up to float32 rounding: a few ulps of their scale.

    The attention's key bias is left out: it adds q·b_k to every score of a row, which the softmax
    ignores, so its gradient is 0 in exact arithmetic and rounding noise in float32, which Adam
    (eps 1e-9) turns into steps of about ±lr whose signs follow the summation order. It never
    changes an output."""
    dim = P.get_preset("listops", "tiny").dim
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attention.qkv.bias"):
            x, y = torch.cat([x[:dim], x[2 * dim:]]), torch.cat([y[:dim], y[2 * dim:]])
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, fake_data):
    train(config(tmp_path, "one", steps=3))
    train(config(tmp_path, "two", steps=3, accumulate=2))
    assert_same_training(weights(tmp_path / "one"), weights(tmp_path / "two"))
    losses = [[float(r[2]) for r in read_rows(tmp_path / n / "metrics.csv")[1:]] for n in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def _ddp_worker(rank: int, world: int, init_method: str, out: str) -> None:
    torch.set_num_threads(1)
    start_worker(rank, world, init_method, Path(out).parent)
    lra.load_split = fake_split
    try:
        train(TrainConfig(task="listops", attention="bigbird", preset="tiny", steps=3, batch_size=8, eval_every=3,
                          log_every=1, progress=False, tensorboard=False, out=out, options={"block_size": 8}))
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()


def test_ddp_two_gloo_processes_match_one_process(tmp_path, fake_data):
    """2 processes × 4 examples == 1 process × 8 (the global batch): same parameters, same metrics."""
    train(config(tmp_path, "single", attention="bigbird", steps=3, eval_every=3, options={"block_size": 8}))
    mp.spawn(_ddp_worker, args=(2, rendezvous(), str(tmp_path / "ddp")), nprocs=2, join=True)
    assert_same_training(weights(tmp_path / "single"), weights(tmp_path / "ddp"))
    rows = [read_rows(tmp_path / n / "metrics.csv")[1:] for n in ("single", "ddp")]
    assert [r[:2] for r in rows[0]] == [r[:2] for r in rows[1]]
    np.testing.assert_allclose([float(r[2]) for r in rows[0]], [float(r[2]) for r in rows[1]], rtol=1e-4)
    assert (tmp_path / "ddp" / "checkpoint" / "rng-rank1.pt").is_file()
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["processes"] == 2


def test_evaluate_a_run_folder(tmp_path, fake_data):
    summary = train(config(tmp_path, steps=2))
    result = evaluate(tmp_path / "run" / "checkpoint", "test")
    assert result["examples"] == 16 and result["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert evaluate(tmp_path / "run", "val")["split"] == "val"
    with pytest.raises(FileNotFoundError, match="no trained model"):
        evaluate(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        evaluate(tmp_path / "run", "dev")


# -- time budget (--max-minutes) ----------------------------------------------------------------------------------
def test_max_minutes_stops_cleanly_and_resume_continues(tmp_path, fake_data, monkeypatch):
    """A run out of time after step 3 (checkpoints every 2) checkpoints step 3, evaluates val and test and
    writes a summary marked stopped_early; --resume then ends bit-identical to a straight run."""
    import longrange.lra.train as T

    kw = dict(steps=6, checkpoint_every=2, eval_every=2, log_every=1, dropout=0.1)
    train(config(tmp_path, "straight", **kw))
    real_exhausted = T.TimeBudget.exhausted
    monkeypatch.setattr(T.TimeBudget, "exhausted", lambda self, setup, clock: clock.steps >= 3)
    summary = train(config(tmp_path, "cut", max_minutes=60, **kw))
    cut = tmp_path / "cut"
    assert summary["stopped_early"] and summary["steps"] == 3 and summary["planned_steps"] == 6
    assert summary["max_minutes"] == 60 and summary["wall_seconds"] > 0 and np.isfinite(summary["train_loss"])
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["val_accuracy"] is not None
    assert json.loads((cut / "summary.json").read_text())["stopped_early"] is True
    assert torch.load(cut / "checkpoint" / "trainer.pt", weights_only=True)["state"]["step"] == 3
    assert ["3", "test"] == read_rows(cut / "metrics.csv")[-1][:2]
    monkeypatch.setattr(T.TimeBudget, "exhausted", real_exhausted)
    done = train(TrainConfig(out=str(cut), resume=True, progress=False, tensorboard=False))
    assert done["steps"] == 6 and not done["stopped_early"] and done["max_minutes"] is None
    a, b = weights(tmp_path / "straight"), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_max_minutes_on_the_real_clock_and_bad_values(tmp_path, fake_data):
    summary = train(config(tmp_path, steps=50, max_minutes=1e-9))  # out of time after the first step
    assert summary["stopped_early"] and summary["steps"] == 1 and summary["planned_steps"] == 50
    unlimited = train(config(tmp_path, "free", steps=2))
    assert not unlimited["stopped_early"] and unlimited["max_minutes"] is None
    for bad in (0, -1.0, "5"):
        with pytest.raises(ValueError, match="max_minutes"):
            train(config(tmp_path, f"bad{bad}", max_minutes=bad))


def test_cli_max_minutes(tmp_path, fake_data):
    out = tmp_path / "cli-cut"
    res = CliRunner().invoke(app, ["lra", "train", "--steps", "40", "--batch-size", "8", "--max-minutes", "1e-9",
                                   "--out", str(out), "--no-progress", "--no-tensorboard"])
    assert res.exit_code == 0, res.output
    assert "stopped early by --max-minutes at step 1 of 40" in res.output
    res = CliRunner().invoke(app, ["lra", "train", "--max-minutes", "0", "--out", str(tmp_path / "x"),
                                   "--no-progress", "--no-tensorboard"])
    assert res.exit_code == 2 and "max_minutes" in res.output


def test_report_reads_stopped_and_killed_runs(tmp_path, fake_data):
    from longrange.lra.report import collect_runs, write_report

    train(config(tmp_path / "runs", "cut", steps=30, max_minutes=1e-9))

    def kill(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "runs", "killed", attention="bigbird", steps=6, eval_every=2, checkpoint_every=2,
                      options={"block_size": 8}), on_step=kill)
    runs = {r["attention"]: r for r in collect_runs([tmp_path / "runs"])}
    assert runs["full"]["stopped_early"] and not runs["full"].get("killed")
    killed = runs["bigbird"]
    assert killed["killed"] and killed["steps"] == 3 and killed["planned_steps"] == 6
    assert killed["test_accuracy"] is None and killed["val_accuracy"] is not None
    assert killed["max_length"] == 41 and killed["train_loss"] > 0  # fake data: 40 tokens + CLS
    assert collect_runs([tmp_path / "runs" / "killed"])[0]["killed"]  # the run folder itself
    md = write_report(list(runs.values()), tmp_path / "report")["md"].read_text()
    assert "| 1 of 30, stopped early (--max-minutes) |" in md
    assert f"| 3 of 6, killed: no summary, last logged step | – (val {100 * killed['val_accuracy']:.2f}) |" in md


# -- report -------------------------------------------------------------------------------------------------------
def _fake_run(folder, task, attention, acc, sps):
    folder.mkdir(parents=True)
    summary = {"task": task, "attention": attention, "preset": f"{task}-tiny", "data": "built-in", "synthetic": False,
               "steps": 100, "batch_size": 32, "max_length": 1001, "device": "cpu", "test_accuracy": acc,
               "test_majority": 0.2, "steps_per_s": sps, "peak_memory_mb": 300.0, "memory_kind": "cpu_peak_rss",
               "params": 1000, "param_ratio": 1.0, "param_rule_ok": attention != "reformer"}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_from_fake_run_folders(tmp_path):
    from longrange.lra.report import collect_runs, write_report

    _fake_run(tmp_path / "runs" / "a", "listops", "full", 0.37, 2.0)
    _fake_run(tmp_path / "runs" / "b", "listops", "bigbird", 0.36, 3.0)
    _fake_run(tmp_path / "runs" / "c", "text", "reformer", 0.55, 1.0)
    paths = write_report(collect_runs([tmp_path / "runs"]), tmp_path / "report")
    md = paths["md"].read_text()
    assert "36.37" in md and "36.05" in md and "56.10" in md  # Table 1: Transformer, BigBird ListOps; Reformer text
    assert "| 1.50 |" in md and "7.4 steps/s, 0.77 GB" in md  # ours ×full; Table 2 BigBird at 1K
    assert "outside ±10%" in md and "Tay et al." in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        collect_runs([tmp_path / "report"])


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_train_eval_report(tmp_path, fake_data):
    runner = CliRunner()
    out = tmp_path / "cli-run"
    res = runner.invoke(app, ["lra", "train", "--attention", "bigbird", "--opt", "block_size=8", "--steps", "2",
                              "--batch-size", "8", "--out", str(out), "--no-progress", "--no-tensorboard"])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output and (out / "summary.json").is_file()
    assert json.loads((out / "run.json").read_text())["options"] == {"block_size": 8}
    res = runner.invoke(app, ["lra", "eval", "--run", str(out), "--split", "val"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["examples"] == 16
    res = runner.invoke(app, ["lra", "report", str(out), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output and (tmp_path / "rep" / "report.md").is_file()


def test_cli_errors_name_the_argument(tmp_path, fake_data):
    runner = CliRunner()
    res = runner.invoke(app, ["lra", "train", "--resume"])
    assert res.exit_code != 0 and "--resume" in res.output
    res = runner.invoke(app, ["lra", "train", "--task", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
    res = runner.invoke(app, ["lra", "train", "--attention", "bigbird", "--opt", "window=4", "--out",
                              str(tmp_path / "y"), "--no-progress"])
    assert res.exit_code == 2 and "'window' does not apply to 'bigbird'" in res.output
    res = runner.invoke(app, ["lra", "train", "--opt", "window", "--out", str(tmp_path / "z")])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output


def test_cli_generate_passes_its_options(tmp_path, monkeypatch):
    import longrange.lra.generate as gen

    seen = {}

    def fake_generate(task, out_dir, **kw):
        seen.update(task=task, out=out_dir, **kw)
        return [out_dir / "a.tsv"]

    monkeypatch.setattr(gen, "generate", fake_generate)
    res = CliRunner().invoke(app, ["lra", "generate", "pathfinder", "--out", str(tmp_path), "--train", "10",
                                   "--val", "2", "--test", "2", "--seed", "3", "--resolution", "128"])
    assert res.exit_code == 0, res.output
    assert callable(seen.pop("progress"))  # the progress bar's callback
    assert seen == {"task": "pathfinder", "out": tmp_path, "train": 10, "val": 2, "test": 2, "seed": 3,
                    "paper_sizes": False, "resolution": 128, "workers": 1}


def test_default_preset_and_optional_tensorboard(tmp_path):
    from longrange.lra.train import tensorboard_writer

    assert TrainConfig().resolved_preset().name == "listops-tiny"
    assert TrainConfig(data_dir="lra_release/listops-1000").resolved_preset().name == "listops"
    assert TrainConfig(task="text", preset="paper", dropout=0.0).resolved_preset().dropout == 0.0
    assert tensorboard_writer(False, tmp_path) is None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert tensorboard_writer(None, tmp_path / "tb") is None  # skipped quietly when not asked for
        with pytest.raises(ImportError, match=r"longrange\[lra\]"):
            tensorboard_writer(True, tmp_path / "tb")


def test_tensorboard_logs_when_installed(tmp_path, fake_data):
    """With the `lra` extra installed, a run writes TensorBoard event files holding its scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(tmp_path, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any("loss" in t for t in tags), tags
    assert any("accuracy" in t for t in tags), tags


_KILLED_RUN = """
import json, os, signal, sys
from longrange.lra.train import TrainConfig, train

def kill(step, metrics):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler: a real kill

train(TrainConfig(**json.loads(sys.argv[1])), on_step=kill)
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_in_another_process_is_bit_identical(tmp_path):
    """The process is SIGKILLed at step 5 (checkpoint at 4) on the built-in data; `--resume` from a
    fresh process ends with the same parameters and metrics.csv as a run never stopped."""
    import subprocess
    import sys

    kw = dict(task="listops", attention="bigbird", preset="tiny", steps=6, batch_size=8, checkpoint_every=2,
              eval_every=3, log_every=3, dropout=0.1, options={"block_size": 8}, threads=1, progress=False,
              tensorboard=False, data_options={"variant": "short", "sizes": [64, 16, 16]})
    train(TrainConfig(**kw, out=str(tmp_path / "straight")))
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps({**kw, "out": str(killed)})],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(killed / "checkpoint" / "trainer.pt", weights_only=True)["state"]["step"] == 4
    train(TrainConfig(out=str(killed), resume=True, progress=False, tensorboard=False))
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()
