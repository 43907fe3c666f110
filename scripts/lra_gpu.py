"""The Long Range Arena device run (issue 17) as one command with one time budget.

    scripts/lra_gpu.sh                              # on a lent GPU: 8 minutes of work, see docs/lra-gpu.md
    scripts/lra_gpu.sh --device cpu --tiny          # the CPU rehearsal: the same phases at tiny sizes
    scripts/lra_gpu.sh --plan-only                  # print the phases, budgets and commands, run nothing

Phases, in order (each a `longrange` CLI command in a child process, its output in log.txt):

1. data: `lra generate listops --paper-sizes --workers N` (96,000/2,000/2,000 drawn on every core; the
   files equal a one-process draw), then the first 1,000 examples' SHA-256 against a one-process draw
   here and against the digest measured on the CPU (tests/test_lra_data.py);
2. train full, train bigbird: `lra train --preset listops --amp` (the released ListOps config: 5K
   steps, batch 32, length 2000), each with `--max-minutes` from the budget;
3. speed: `lra speed --device cuda` (Table 2's mechanisms, batch 32), one sweep per length: 4K first;
4. train longformer, performer, linformer, local, as far as the time allows;
5. report: `lra report` (Markdown + PNG) with this run's commands and wall times appended.

Budget: the phases share `--budget-minutes` counted from the start. Speed and report keep fixed
reserves (`Profile`); training time is shared by `Allocator`: full and bigbird get 70% of it while
optional runs remain, the optional runs what is left, each at least `min_run_s` or skipped. A run
out of time stops cleanly (`--max-minutes`: checkpoint, val + test evaluation, summary marked
stopped_early); a child past its share plus a grace period is killed, and `lra report` still reads
its metrics.csv. A sweep past its share is killed; its speed.json keeps the points measured.

Everything goes under `--out` (default lra-gpu/, ignored by git); a second call with the same --out
reuses the data, skips finished runs and sweeps, resumes cut runs (`lra train --resume`) and puts a
cut sweep's new try in a numbered folder: nothing is deleted. After every phase at most 6 files go
to `--bundle` (default $OUT: the folder the device tool brings back): the report named for docs/
(lra-gpu-listops.md, lra-gpu-listops.png, lra-gpu-listops-speed.png), results.tar.gz (every file of
--out but the data, weights and optimizer state), log.txt and status.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("full", "bigbird")
OPTIONAL = ("longformer", "performer", "linformer", "local")
#: the mechanisms of the paper's Table 2 that longrange has (`lra speed`'s default)
TABLE2 = ("full", "local", "linformer", "reformer", "bigbird", "linear", "performer")
#: the part of the training time full and bigbird share while optional runs remain
REQUIRED_SHARE = 0.7
#: seconds a child needs before `lra train` starts its clock (interpreter, torch, CUDA)
STARTUP_S = 8.0
#: seconds past its --max-minutes before a training child is killed
GRACE_S = 45.0
#: SHA-256 of the first 1,000 ListOps examples for seed 0 under the paper's rules, one process, on the
#: CPU (tests/test_lra_data.py::PAPER_SEED0_FIRST_1K)
PAPER_SEED0_FIRST_1K = "1e630a6634c916fbf725dea6fb1b9faf9eccf4b68bd0a58087c29688eb75fc14"
#: what --bundle receives besides {prefix}.md, {prefix}.png and {prefix}-speed.png (the report, named for docs/)
BUNDLE_FILES = ("results.tar.gz", "log.txt", "status.json")
#: files of --out that results.tar.gz leaves out (the data, model weights, optimizer state, TensorBoard)
HEAVY_SUFFIXES = (".tsv", ".safetensors", ".pt")
HEAVY_FOLDERS = ("checkpoint", "best", "tb", ".checkpoint.tmp", ".best.tmp")


@dataclasses.dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run: `paper` (the device run) or `tiny` (the CPU rehearsal)."""

    name: str
    data_args: tuple[str, ...]  # `lra generate listops` size options
    preset: str
    train_args: tuple[str, ...]  # over the preset (tiny: fewer steps, smaller batches)
    speed_lengths: tuple[int, ...]  # one sweep each, in this order (default --speed-lengths)
    speed_args: tuple[str, ...]
    data_s: float  # expected seconds of the data phase (plan only)
    sweep_s: float  # reserve for one speed sweep (7 points)
    report_s: float  # reserve for the report and the last bundle
    min_run_s: float  # an optional run with less than this is skipped
    budget_minutes: float  # default --budget-minutes
    point_timeout_s: float  # `lra speed --timeout`
    report_prefix: str  # the bundle's report files: {prefix}.md, {prefix}.png, {prefix}-speed.png


PROFILES = {
    "paper": Profile(
        name="paper", data_args=("--paper-sizes",), preset="listops", train_args=(),
        speed_lengths=(4096, 1024, 2048, 3072),
        speed_args=("--batch-size", "32", "--steps", "3", "--warmup", "1"),
        data_s=45.0, sweep_s=50.0, report_s=25.0, min_run_s=60.0, budget_minutes=8.0, point_timeout_s=120.0,
        report_prefix="lra-gpu-listops"),
    "tiny": Profile(
        name="tiny", data_args=("--train", "160", "--val", "32", "--test", "32"), preset="listops-tiny",
        train_args=("--steps", "16", "--batch-size", "8", "--eval-every", "4"),
        speed_lengths=(256, 128),
        speed_args=("--batch-size", "2", "--steps", "1", "--warmup", "0", "--preset", "tiny"),
        data_s=15.0, sweep_s=55.0, report_s=25.0, min_run_s=20.0, budget_minutes=7.0, point_timeout_s=120.0,
        report_prefix="lra-gpu-rehearsal"),
}


# -- the plan (pure functions: tested without running anything) ----------------------------------------------------
def phase_names(mechanisms: tuple[str, ...], lengths: tuple[int, ...]) -> list[str]:
    """data, the required runs, the speed sweeps, the optional runs, report."""
    required = [m for m in mechanisms if m in REQUIRED]
    optional = [m for m in mechanisms if m not in REQUIRED]
    return (["data"] + [f"train:{m}" for m in required] + [f"speed:{n}" for n in lengths]
            + [f"train:{m}" for m in optional] + ["report"])


def reserve_after(phase: str, names: list[str], profile: Profile) -> float:
    """Seconds kept for the speed sweeps and the report still to come after `phase`."""
    later = names[names.index(phase) + 1:]
    sweeps = [n for n in later if n.startswith("speed:")]
    return profile.sweep_s * len(sweeps) + profile.report_s


class Allocator:
    """Training time. When the first run starts, full and bigbird are given REQUIRED_SHARE of the
    time left for training (all of it when no optional run follows); each takes an equal part of
    what they have not used yet, so time one leaves goes to the next. Optional runs, in order, take
    an equal part of what is left, at least `min_run_s`, until too little is left to start one."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.pool: float | None = None  # seconds for the required runs
        self.required_used = 0.0

    def share(self, name: str, left_s: float, required_left: int, optional_left: int) -> float | None:
        """Seconds for run `name` when `left_s` remain for all training still to do (this run included);
        None: skip it."""
        if self.pool is None:
            self.pool = max(left_s, 0.0) * (REQUIRED_SHARE if optional_left else 1.0)
        if name in REQUIRED:
            return max(min(self.pool - self.required_used, left_s), 0.0) / max(required_left, 1)
        if left_s < self.profile.min_run_s:
            return None
        return max(left_s / max(optional_left, 1), self.profile.min_run_s)

    def used(self, name: str, seconds: float) -> None:
        if name in REQUIRED:
            self.required_used += seconds


def speed_share(left_s: float, sweeps_left: int) -> float:
    """Seconds for the next sweep: an equal part of what the sweeps' reserve has left."""
    return max(left_s / max(sweeps_left, 1), 0.0)


def nominal_plan(profile: Profile, budget_s: float, mechanisms: tuple[str, ...],
                 lengths: tuple[int, ...] | None = None) -> list[dict]:
    """The budgets each phase would get if every phase used exactly its share (the data phase its
    expected time): what --plan-only prints."""
    names = phase_names(mechanisms, profile.speed_lengths if lengths is None else lengths)
    clock, plan, allocator = 0.0, [], Allocator(profile)
    for name in names:
        if name == "data":
            seconds = profile.data_s
        elif name.startswith("speed:"):
            seconds = profile.sweep_s
        elif name == "report":
            seconds = profile.report_s
        else:
            left = budget_s - clock - reserve_after(name, names, profile)
            seconds = allocator.share(name.split(":")[1], left, *runs_left(name, names)) or 0.0
            allocator.used(name.split(":")[1], seconds)
        plan.append({"phase": name, "start_s": round(clock, 1), "budget_s": round(seconds, 1)})
        clock += seconds
    return plan


def runs_left(phase: str, names: list[str]) -> tuple[int, int]:
    """(required, optional) training runs from `phase` on, `phase` included."""
    later = [n.split(":")[1] for n in names[names.index(phase):] if n.startswith("train:")]
    return sum(m in REQUIRED for m in later), sum(m not in REQUIRED for m in later)


# -- commands ------------------------------------------------------------------------------------------------------
def cli(python: str) -> list[str]:
    return [python, "-m", "longrange.cli"]


def generate_command(python: str, profile: Profile, data: Path, workers: int, seed: int) -> list[str]:
    return [*cli(python), "lra", "generate", "listops", "--out", str(data), *profile.data_args,
            "--workers", str(workers), "--seed", str(seed)]


def train_command(python: str, profile: Profile, attention: str, data: Path, run: Path, device: str,
                  minutes: float, resume: bool) -> list[str]:
    common = ["--out", str(run), "--device", device, "--max-minutes", f"{minutes:.3f}", "--no-progress",
              "--no-tensorboard"]
    if resume:
        return [*cli(python), "lra", "train", "--resume", *common]
    return [*cli(python), "lra", "train", "--task", "listops", "--data", str(data), "--preset", profile.preset,
            "--attention", attention, "--amp", *profile.train_args, *common]


def speed_command(python: str, profile: Profile, length: int, device: str, out: Path) -> list[str]:
    return [*cli(python), "lra", "speed", "--device", device, "--attention", ",".join(TABLE2), "--lengths",
            str(length), *profile.speed_args, "--timeout", str(profile.point_timeout_s), "--out", str(out),
            "--no-progress"]


def report_command(python: str, runs: list[Path], speeds: list[Path], out: Path) -> list[str]:
    return [*cli(python), "lra", "report", *map(str, runs), *[a for s in speeds for a in ("--speed", str(s))],
            "--out", str(out)]


def shell(cmd: list[str]) -> str:
    """The command as one shell line, paths under the repository shortened (what the report quotes)."""
    import shlex

    words = [w.replace(str(REPO) + os.sep, "") for w in cmd]
    if words[:3] == [cmd[0], "-m", "longrange.cli"]:
        words = ["longrange", *words[3:]]
    return " ".join(shlex.quote(w) for w in words)


# -- running children ----------------------------------------------------------------------------------------------
class Log:
    """Lines to stdout and to log.txt."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()


CURRENT: dict = {}  # the child running now, killed with the driver


def run_child(cmd: list[str], log: Log, limit_s: float | None) -> tuple[int | None, bool]:
    """Run `cmd` (its output into the log); past `limit_s` its process group is killed.
    Returns (exit code or None when killed, killed)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    log(f"$ {shell(cmd)}")
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            **group)
    CURRENT["proc"] = proc
    pump = threading.Thread(target=lambda: [log(f"  | {line.rstrip()}") for line in proc.stdout], daemon=True)
    pump.start()
    killed = False
    try:
        proc.wait(timeout=None if limit_s is None else max(limit_s, 1.0))
    except subprocess.TimeoutExpired:
        killed = True
        log(f"  ! past its limit of {limit_s:.0f} s: stopping it")
        kill_group(proc)
    finally:
        CURRENT.pop("proc", None)
    pump.join(timeout=10)
    return (None if killed else proc.returncode), killed


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL 10 s later if it still runs."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the phases ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    profile: Profile
    out: Path
    log: Log
    start: float
    budget_s: float
    names: list[str]
    status: dict
    allocator: Allocator

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    @property
    def data(self) -> Path:
        return self.out / "data" / "listops"


def record(ctx: Context, phase: str, t0: float, status: str, cmd: list[str] | None = None, **extra) -> dict:
    entry = {"phase": phase, "status": status, "start_s": round(t0 - ctx.start, 1),
             "seconds": round(time.perf_counter() - t0, 1), "command": shell(cmd) if cmd else None, **extra}
    ctx.status["phases"].append(entry)
    ctx.log(f"== {phase}: {status} after {entry['seconds']:.0f} s (elapsed {ctx.elapsed():.0f} of "
            f"{ctx.budget_s:.0f} s){' · ' + extra['note'] if extra.get('note') else ''}")
    save_status(ctx)
    bundle(ctx)
    return entry


def phase_data(ctx: Context) -> bool:
    """Generate the ListOps files (or reuse them) and check the first 1K examples' digest."""
    t0 = time.perf_counter()
    manifest = ctx.data / "manifest.json"
    cmd = generate_command(ctx.args.python, ctx.profile, ctx.data, ctx.args.workers, ctx.args.seed)
    if manifest.is_file() and json.loads(manifest.read_text()).get("args") == list(cmd[5:]):
        record(ctx, "data", t0, "reused", cmd, note=f"{manifest} matches")
        return True
    rc, killed = run_child(cmd, ctx.log, max(ctx.left() - ctx.profile.report_s, 60.0))
    if rc != 0:
        record(ctx, "data", t0, "failed", cmd, note=f"exit {rc}{' (killed)' if killed else ''}")
        return False
    seconds = time.perf_counter() - t0
    info = check_data(ctx, cmd, seconds)
    ok = info["first_1k_serial_match"]
    record(ctx, "data", t0, "ok" if ok else "mismatch", cmd, note=f"sha256 of the first {info['first_n']} "
           f"{info['first_1k_sha256'][:16]}…, one-process draw {'matches' if ok else 'DIFFERS'}"
           + (f", CPU digest {'matches' if info['paper_digest_match'] else 'DIFFERS'}"
              if info["paper_digest_match"] is not None else ""))
    return True


def check_data(ctx: Context, cmd: list[str], seconds: float) -> dict:
    """manifest.json: the command, sizes, file digests and the first-1K check."""
    from longrange.lra import listops

    train = ctx.data / "basic_train.tsv"
    with train.open(encoding="utf-8") as f:
        f.readline()
        first = [tuple(line.rstrip("\n").split("\t")) for _, line in zip(range(1000), f, strict=False)]
    digest = listops.examples_digest(first)
    serial = listops.examples_digest(listops.generate_examples(len(first), seed=ctx.args.seed))
    paper = ctx.profile.name == "paper" and ctx.args.seed == 0 and len(first) == 1000
    info = {"args": list(cmd[5:]), "command": shell(cmd), "seconds": round(seconds, 1), "workers": ctx.args.workers,
            "first_n": len(first), "first_1k_sha256": digest, "first_1k_serial_sha256": serial,
            "first_1k_serial_match": digest == serial,
            "paper_digest_match": (digest == PAPER_SEED0_FIRST_1K) if paper else None,
            "files": {p.name: {"bytes": p.stat().st_size, "lines": count_lines(p) - 1, "sha256": file_sha256(p)}
                      for p in sorted(ctx.data.glob("basic_*.tsv"))}}
    (ctx.data / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    ctx.status["data"] = info
    return info


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))


def run_folder(ctx: Context, attention: str) -> tuple[Path, str]:
    """(folder, what to do): done (a finished summary), resume (a checkpoint), new (a fresh folder;
    an earlier try without a checkpoint is kept and a numbered folder is used)."""
    base = ctx.out / "runs" / f"listops-{attention}"
    tries = [base] + [base.with_name(f"{base.name}.{k}") for k in range(2, 100)]
    for folder in tries:
        summary = folder / "summary.json"
        if summary.is_file() and not json.loads(summary.read_text()).get("stopped_early"):
            return folder, "done"
        if (folder / "checkpoint" / "trainer.pt").is_file():
            return folder, "resume"
        if not folder.exists() or not any(folder.iterdir()):
            return folder, "new"
    raise RuntimeError(f"{base}: 99 earlier tries; pass another --out")


def phase_train(ctx: Context, phase: str, data_ok: bool) -> None:
    t0 = time.perf_counter()
    attention = phase.split(":")[1]
    folder, action = run_folder(ctx, attention)
    ctx.status["runs"][attention] = str(folder)
    if action == "done":
        record(ctx, phase, t0, "done earlier", note=str(folder))
        return
    if not data_ok:
        record(ctx, phase, t0, "skipped", note="no data")
        return
    left = ctx.left() - reserve_after(phase, ctx.names, ctx.profile)
    share = ctx.allocator.share(attention, left, *runs_left(phase, ctx.names))
    if share is None or share - STARTUP_S < 10.0:
        record(ctx, phase, t0, "skipped", note=f"{max(left, 0):.0f} s left for training, a run needs "
               f"{ctx.profile.min_run_s:.0f} s")
        return
    minutes = (share - STARTUP_S) / 60
    cmd = train_command(ctx.args.python, ctx.profile, attention, ctx.data, folder, ctx.args.device, minutes,
                        resume=action == "resume")
    rc, killed = run_child(cmd, ctx.log, share + GRACE_S)
    ctx.allocator.used(attention, time.perf_counter() - t0)
    summary = folder / "summary.json"
    result = json.loads(summary.read_text()) if summary.is_file() and rc == 0 else {}
    status = ("killed" if killed else f"failed (exit {rc})" if rc != 0
              else "stopped early" if result.get("stopped_early") else "ok")
    record(ctx, phase, t0, status, cmd, budget_s=round(share, 1), run=str(folder),
           note=describe_run(result) if result else None)


def describe_run(s: dict) -> str:
    return (f"step {s['steps']} of {s.get('planned_steps')}, train loss {s.get('train_loss') or float('nan'):.3f}, "
            f"val {100 * s['val_accuracy']:.2f}%, test {100 * s['test_accuracy']:.2f}%, "
            f"{s.get('steps_per_s') or 0:.2f} steps/s")


def phase_speed(ctx: Context, phase: str) -> None:
    t0 = time.perf_counter()
    length = int(phase.split(":")[1])
    base = ctx.out / "speed" / f"n{length}"
    folder = next(f for f in [base] + [base.with_name(f"{base.name}.{k}") for k in range(2, 100)]
                  if not f.exists())
    done = [f for f in sorted(base.parent.glob(f"{base.name}*")) if speed_complete(f)]
    if done:
        ctx.status["speed"][str(length)] = str(done[-1])
        record(ctx, phase, t0, "done earlier", note=str(done[-1]))
        return
    sweeps_left = sum(n.startswith("speed:") for n in ctx.names[ctx.names.index(phase):])
    used = sum(p["seconds"] for p in ctx.status["phases"] if p["phase"].startswith("speed:"))
    left = ctx.left() - ctx.profile.report_s  # the optional runs after the sweeps get what the sweeps leave
    reserve = ctx.profile.sweep_s * sum(n.startswith("speed:") for n in ctx.names)
    limit = min(speed_share(reserve - used, sweeps_left), max(left, 0.0))
    if limit < 10.0:
        record(ctx, phase, t0, "skipped", note=f"{max(left, 0):.0f} s left")
        return
    cmd = speed_command(ctx.args.python, ctx.profile, length, ctx.args.device, folder)
    rc, killed = run_child(cmd, ctx.log, limit)
    rows = json.loads((folder / "speed.json").read_text())["rows"] if (folder / "speed.json").is_file() else []
    if rows:
        ctx.status["speed"][str(length)] = str(folder)
    status = "ok" if rc == 0 else ("cut" if killed else f"failed (exit {rc})")
    record(ctx, phase, t0, status, cmd, budget_s=round(limit, 1),
           note=f"{sum(not r.get('error') for r in rows)} of {len(TABLE2)} points measured")


def speed_complete(folder: Path) -> bool:
    path = folder / "speed.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    return "sweep_s" in data.get("meta", {}) and len(data.get("rows", [])) == len(TABLE2)


def phase_report(ctx: Context) -> None:
    t0 = time.perf_counter()
    runs = [Path(p) for p in ctx.status["runs"].values()
            if (Path(p) / "summary.json").is_file() or (Path(p) / "metrics.csv").is_file()]
    speeds = [Path(p) for p in ctx.status["speed"].values()]
    if not runs and not speeds:
        record(ctx, "report", t0, "skipped", note="no runs and no speed rows")
        return
    cmd = report_command(ctx.args.python, runs, speeds, ctx.out / "report")
    rc, _ = run_child(cmd, ctx.log, max(ctx.left(), 60.0))
    record(ctx, "report", t0, "ok" if rc == 0 else f"failed (exit {rc})", cmd)
    if rc == 0:
        append_run_record(ctx, ctx.out / "report" / "report.md")
        bundle(ctx)


def append_run_record(ctx: Context, md: Path) -> None:
    """This run's machine, budget, data check and phases (commands, seconds) at the end of report.md."""
    s, env = ctx.status, ctx.status["environment"]
    lines = ["", "## This run (`scripts/lra_gpu.sh`)", "",
             f"- {s['started']}, profile `{ctx.profile.name}`, budget {ctx.budget_s / 60:.1f} min, driver wall time "
             f"{ctx.elapsed():.0f} s (device time adds the machine's start and the transfers: see the device tool's "
             "lease figures).",
             f"- Machine: {env.get('gpu') or 'no GPU'}; {env['cpus']} CPUs; Python {env['python']}; torch "
             f"{env['torch']}; longrange {env.get('commit') or 'working tree'}.",
             f"- Invocation: `{s['command']}`."]
    data = s.get("data")
    if data:
        match = "matches" if data["first_1k_serial_match"] else "DIFFERS FROM"
        lines.append(f"- Data: `{data['command']}` in {data['seconds']:.0f} s on {data['workers']} processes; "
                     f"SHA-256 of the first {data['first_n']} examples `{data['first_1k_sha256']}` {match} a "
                     "one-process draw"
                     + ("" if data["paper_digest_match"] is None else
                        f", and {'matches' if data['paper_digest_match'] else 'DIFFERS FROM'} the CPU's "
                        f"`{PAPER_SEED0_FIRST_1K[:16]}…`") + ".")
    lines += ["", "| Phase | Status | Start (s) | Seconds | Budget (s) | Note | Command |",
              "|---|---|---|---|---|---|---|"]
    for p in s["phases"]:
        note = (p.get("note") or "").replace("|", "/")
        command = f"`{p['command']}`" if p.get("command") else ""
        lines.append(f"| {p['phase']} | {p['status']} | {p['start_s']} | {p['seconds']} | {p.get('budget_s', '')} | "
                     f"{note} | {command} |")
    with md.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# -- status, bundle ------------------------------------------------------------------------------------------------
#: what the longrange commands import (the device image has them all: /work/.library/device/KINDS.md)
NEEDED = ("torch", "numpy", "einops", "typer", "rich", "matplotlib", "safetensors", "PIL")


def environment(device: str) -> dict:
    import importlib

    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if "torch" in missing:
        return {"missing": missing, "cuda": False}
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "platform": platform.platform(), "cuda": torch.cuda.is_available(), "gpu": None, "commit": None,
           "missing": missing}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def save_status(ctx: Context) -> None:
    ctx.status["elapsed_s"] = round(ctx.elapsed(), 1)
    path = ctx.out / "status.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ctx.status, indent=2) + "\n")
    tmp.replace(path)


def small_files(out: Path) -> list[Path]:
    """Every file of --out that results.tar.gz carries (not data, weights, optimizer state, TensorBoard)."""
    keep = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if (path.is_file() and path.suffix not in HEAVY_SUFFIXES and not path.name.endswith(".tmp")
                and not set(rel.parts[:-1]) & set(HEAVY_FOLDERS)):
            keep.append(path)
    return keep


def bundle_names(profile: Profile) -> dict[str, str]:
    """report/ file -> its name in the bundle (ready to copy into docs/)."""
    p = profile.report_prefix
    return {"report.md": f"{p}.md", "report.png": f"{p}.png", "speed.png": f"{p}-speed.png"}


def bundle(ctx: Context) -> None:
    """At most 8 files into --bundle: the report (named for docs/, its image links renamed too),
    results.tar.gz of every small file, log.txt, status.json."""
    dest = ctx.args.bundle
    if not dest:
        return
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in small_files(ctx.out):
            tar.add(path, arcname=str(Path(ctx.out.name) / path.relative_to(ctx.out)))
    (dest / "results.tar.gz.tmp").write_bytes(buf.getvalue())
    (dest / "results.tar.gz.tmp").replace(dest / "results.tar.gz")
    names = bundle_names(ctx.profile)
    for source, name in names.items():
        path = ctx.out / "report" / source
        if path.is_file() and source.endswith(".md"):
            text = path.read_text(encoding="utf-8")
            for old, new in names.items():
                text = text.replace(f"]({old})", f"]({new})")
            (dest / name).write_text(text, encoding="utf-8")
        elif path.is_file():
            shutil.copyfile(path, dest / name)
    for name in ("log.txt", "status.json"):
        if (ctx.out / name).is_file():
            shutil.copyfile(ctx.out / name, dest / name)


def check_folders(out: Path, bundle_dir: str | None, profile: Profile) -> None:
    """Refuse folders that hold someone else's files (this script deletes nothing, but it writes)."""
    if out.exists() and any(out.iterdir()) and not (out / "status.json").is_file():
        raise SystemExit(f"--out {out}: not empty and not written by this script (no status.json); "
                         "pass an empty or new folder")
    if bundle_dir:
        b = Path(bundle_dir)
        ours = {*BUNDLE_FILES, *bundle_names(profile).values(), "results.tar.gz.tmp"}
        foreign = sorted(p.name for p in b.iterdir() if p.name not in ours) if b.is_dir() else []
        if foreign:
            raise SystemExit(f"--bundle {b}: holds files this script does not write ({foreign[:5]}); "
                             "pass an empty folder")


# -- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the rehearsal sizes (CPU minutes, not LRA results)")
    ap.add_argument("--out", type=Path, default=REPO / "lra-gpu", help="folder for everything (default: lra-gpu/)")
    ap.add_argument("--bundle", default=os.environ.get("OUT") or None,
                    help="folder for the <= 8 files to bring back (default: $OUT; none when unset)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="wall-clock budget of all phases (default: 8 for the paper run, 7 for --tiny)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes drawing ListOps trees")
    ap.add_argument("--mechanisms", default=",".join(REQUIRED + OPTIONAL),
                    help="attentions to train, in order of priority within their group")
    ap.add_argument("--speed-lengths", default=None,
                    help="one `lra speed` sweep per length, in this order (default 4096,1024,2048,3072; tiny: "
                         "256,128); empty: no sweeps")
    ap.add_argument("--seed", type=int, default=0, help="ListOps data seed")
    ap.add_argument("--python", default=sys.executable, help="the interpreter for the longrange commands")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and the commands; run nothing")
    args = ap.parse_args(argv)
    args.profile = PROFILES["tiny" if args.tiny else "paper"]
    if args.budget_minutes is None:
        args.budget_minutes = args.profile.budget_minutes
    if args.budget_minutes <= 0 or args.workers < 1:
        ap.error("--budget-minutes and --workers must be positive")
    args.mechanisms = tuple(m.strip() for m in args.mechanisms.split(",") if m.strip())
    sys.path.insert(0, str(REPO / "src"))
    try:
        from longrange.mechanisms import list_attentions
    except ImportError:  # no torch here: main() says so
        list_attentions = None
    unknown = sorted(set(args.mechanisms) - set(list_attentions())) if list_attentions else []
    if unknown:
        ap.error(f"--mechanisms: unknown attention(s) {unknown}; expected names from {list_attentions()}")
    if args.speed_lengths is None:
        args.speed_lengths = args.profile.speed_lengths
    else:
        try:
            args.speed_lengths = tuple(int(n) for n in args.speed_lengths.split(",") if n.strip())
        except ValueError:
            ap.error(f"--speed-lengths: expected comma-separated integers, got {args.speed_lengths!r}")
    args.out = args.out.resolve()
    return args


def print_plan(args: argparse.Namespace) -> None:
    p, data = args.profile, args.out / "data" / "listops"
    print(f"profile {p.name}, budget {args.budget_minutes:g} min, device {args.device}, out {args.out}, "
          f"bundle {args.bundle or '(none)'}")
    for row in nominal_plan(p, 60 * args.budget_minutes, args.mechanisms, args.speed_lengths):
        name = row["phase"]
        if name == "data":
            cmd = generate_command(args.python, p, data, args.workers, args.seed)
        elif name.startswith("train:") and row["budget_s"] < STARTUP_S + 10:
            print(f"{row['start_s']:7.0f} s  {name:18s}      – s  skipped: too little time left")
            continue
        elif name.startswith("train:"):
            minutes = (row["budget_s"] - STARTUP_S) / 60
            cmd = train_command(args.python, p, name[6:], data, args.out / "runs" / f"listops-{name[6:]}",
                                args.device, minutes, resume=False)
        elif name.startswith("speed:"):
            cmd = speed_command(args.python, p, int(name[6:]), args.device, args.out / "speed" / f"n{name[6:]}")
        else:
            cmd = report_command(args.python, [args.out / "runs"], [args.out / "speed"], args.out / "report")
        print(f"{row['start_s']:7.0f} s  {name:18s} {row['budget_s']:6.0f} s  {shell(cmd)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        print_plan(args)
        return 0
    check_folders(args.out, args.bundle, args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = Log(args.out / "log.txt")
    old = json.loads((args.out / "status.json").read_text()) if (args.out / "status.json").is_file() else {}
    status = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "profile": args.profile.name,
              "budget_minutes": args.budget_minutes,
              "command": " ".join(["scripts/lra_gpu.sh", *(sys.argv[1:] if argv is None else argv)]),
              "environment": environment(args.device), "phases": [], "runs": {}, "speed": {},
              "earlier": old.get("earlier", []) + ([{k: old[k] for k in ("started", "phases") if k in old}]
                                                   if old else [])}
    ctx = Context(args, args.profile, args.out, log, start, 60 * args.budget_minutes,
                  phase_names(args.mechanisms, args.speed_lengths), status, Allocator(args.profile))
    log(f"lra_gpu: {status['started']} profile {args.profile.name}, budget {args.budget_minutes:g} min, "
        f"{status['environment']}")
    if status["environment"]["missing"]:
        log(f"lra_gpu: missing Python packages {status['environment']['missing']}: install them, or carry them "
            "as wheels to the device (docs/lra-gpu.md)")
        return 2
    if args.device == "cuda" and not status["environment"]["cuda"]:
        log("lra_gpu: --device cuda but torch sees no CUDA device; use --device cpu --tiny for the rehearsal")
        return 2
    signal.signal(signal.SIGTERM, interrupt)
    try:
        data_ok = False
        for phase in ctx.names:
            if phase == "data":
                data_ok = phase_data(ctx)
            elif phase.startswith("train:"):
                phase_train(ctx, phase, data_ok)
            elif phase.startswith("speed:"):
                phase_speed(ctx, phase)
            else:
                phase_report(ctx)
    except KeyboardInterrupt:
        log("lra_gpu: interrupted; stopping the running child")
        if "proc" in CURRENT:
            kill_group(CURRENT["proc"])
        save_status(ctx)
        bundle(ctx)
        return 130
    print_summary(ctx)
    return 0


def interrupt(signum, frame) -> None:
    """SIGTERM (the device tool's timeout): stop like Ctrl-C, so the running child is stopped and the bundle written."""
    raise KeyboardInterrupt


def print_summary(ctx: Context) -> None:
    """The last lines of the output: each phase and each run in one line."""
    ctx.log(f"\nlra_gpu: done in {ctx.elapsed():.0f} s of a {ctx.budget_s:.0f} s budget; everything under {ctx.out}"
            + (f", bundle in {ctx.args.bundle}" if ctx.args.bundle else ""))
    for p in ctx.status["phases"]:
        ctx.log(f"  {p['phase']:16s} {p['status']:16s} {p['seconds']:6.0f} s  {p.get('note') or ''}")


if __name__ == "__main__":
    raise SystemExit(main())
