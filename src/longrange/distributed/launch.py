"""A small torchrun from Python: start `nproc` processes that form one process group, run
`fn(rank, world, *args)` in each, and return every rank's result.

    from longrange.distributed.launch import launch
    results = launch(work, 4, n, timeout_s=600, threads_per_rank=1)   # [work(0, 4, n), ..., work(3, 4, n)]

Each rank is a fresh interpreter (`python -c ...`, not a fork: its memory is its own, as under
torchrun) with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on a free local port; OMP/MKL threads = threads_per_rank), joined to a gloo group by
`init_process_group(init_method="env://")`. `fn` must be picklable by reference (a module-level
function) and its return value picklable. A rank that raises, dies or outlives `timeout_s` stops the
launch: the other ranks are killed and `LaunchError` names the rank that failed first and its error,
with the tail of its log.

Under a real `torchrun` (RANK and WORLD_SIZE already set) nothing is spawned: this process joins
that group (or uses the one already initialised), runs fn for its own rank, and every rank gets the
list of all ranks' results.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the environment torchrun sets, which `launch` sets for the ranks it starts and reads when run under it
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: the tail of a failed rank's log quoted in `LaunchError`
LOG_TAIL_CHARS = 3000
POLL_S = 0.05
#: after the first rank fails, how long to wait for the others' own errors (to name the first cause)
GRACE_S = 2.0
_WORKER = "from longrange.distributed.launch import worker_main; worker_main()"


class LaunchError(RuntimeError):
    """A launched rank failed (raised, died, or ran past the timeout). `rank`: the rank that failed
    first (None for a timeout); `error`: its error as one line."""

    def __init__(self, message: str, rank: int | None = None, error: str | None = None):
        super().__init__(message)
        self.rank, self.error = rank, error


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets its environment)."""
    return all(os.environ.get(k) for k in TORCHRUN_ENV)


def launch(fn: Callable, nproc: int, *args: Any, timeout_s: float = 600.0, threads_per_rank: int | None = None,
           collective_timeout_s: float | None = None, backend: str = "gloo",
           log_dir: str | Path | None = None) -> list[Any]:
    """fn(rank, nproc, *args) in nproc processes of one process group; -> the results in rank order.

    timeout_s: the whole launch (ranks still running then are killed); collective_timeout_s: the
    group's timeout for one collective (default: timeout_s), so a rank waiting on a dead peer raises
    instead of hanging; threads_per_rank: torch threads in each rank (default: the CPUs shared out,
    at least 1); log_dir: keep each rank's stdout and stderr there as rank{r}.log (default: a
    temporary folder, removed afterwards)."""
    _check_positive("nproc", nproc)
    _check_positive("timeout_s", timeout_s)
    threads = threads_per_rank if threads_per_rank is not None else max(1, (os.cpu_count() or 1) // nproc)
    _check_positive("threads_per_rank", threads)
    group_timeout = timeout_s if collective_timeout_s is None else collective_timeout_s
    _check_positive("collective_timeout_s", group_timeout)
    if under_torchrun():
        return _join_torchrun(fn, nproc, args, backend, group_timeout)
    return _spawn(fn, nproc, args, timeout_s=timeout_s, threads=threads, group_timeout=group_timeout,
                  backend=backend, log_dir=log_dir)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


# -- under torchrun ------------------------------------------------------------------------------------
def _join_torchrun(fn: Callable, nproc: int, args: tuple, backend: str, group_timeout: float) -> list[Any]:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world != nproc:
        raise ValueError(f"nproc={nproc}, but this process runs under torchrun with WORLD_SIZE={world}: pass "
                         f"nproc={world} or launch with --nproc-per-node {nproc}")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=group_timeout))
    rank = dist.get_rank()
    try:
        outcome = ("ok", fn(rank, world, *args))
    except Exception as err:  # every rank must reach the gather below, or the others wait for it
        traceback.print_exc()
        outcome = ("error", f"{type(err).__name__}: {err}")
    outcomes: list = [None] * world
    dist.all_gather_object(outcomes, outcome)
    failed = [(r, msg) for r, (kind, msg) in enumerate(outcomes) if kind == "error"]
    if failed:
        r, msg = failed[0]
        raise LaunchError(f"rank {r} of {world} failed: {msg}", rank=r, error=msg)
    return [value for _, value in outcomes]


# -- spawning ------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (rank 0's store binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, threads: int, backend: str, group_timeout: float) -> dict[str, str]:
    """torchrun's environment for one rank on this machine, with its thread count."""
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "LONGRANGE_LAUNCH_THREADS": str(threads), "LONGRANGE_LAUNCH_BACKEND": backend,
            "LONGRANGE_LAUNCH_TIMEOUT": str(group_timeout)}


def _spawn(fn: Callable, nproc: int, args: tuple, *, timeout_s: float, threads: int, group_timeout: float,
           backend: str, log_dir: str | Path | None) -> list[Any]:
    try:
        payload = pickle.dumps((fn, args))
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ValueError(f"fn and args must be picklable (fn a module-level function): {err}") from None
    main = sys.modules.get("__main__")
    main_path = getattr(main, "__file__", None) if getattr(fn, "__module__", None) == "__main__" else None
    job = pickle.dumps({"sys_path": list(sys.path), "main_path": main_path, "payload": payload})
    work = Path(tempfile.mkdtemp(prefix="longrange-launch-"))
    logs = Path(log_dir) if log_dir is not None else work
    logs.mkdir(parents=True, exist_ok=True)
    (work / "job.pkl").write_bytes(job)
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            with (logs / f"rank{rank}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", _WORKER, str(work)], stdout=log, stderr=subprocess.STDOUT,
                    env=rank_env(rank, nproc, port, threads, backend, group_timeout)))
        _wait(procs, work, logs, timeout_s)
        return [pickle.loads((work / f"result{rank}.pkl").read_bytes()) for rank in range(nproc)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _wait(procs: list[subprocess.Popen], work: Path, logs: Path, timeout_s: float) -> None:
    """Until every rank exits 0 with its result written; else kill the rest and raise LaunchError."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        if any(c is not None and _failed(p, work, r) for r, (p, c) in enumerate(zip(procs, codes, strict=True))):
            _grace(procs)
            raise _failure(procs, work, logs)
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            running = [r for r, p in enumerate(procs) if p.poll() is None]
            for p in procs:
                if p.poll() is None:
                    p.kill()
            tails = "\n".join(_log_tail(logs, r) for r in running)
            raise LaunchError(f"rank(s) {running} of {len(procs)} still running after {timeout_s:g} s (timeout_s); "
                              f"killed\n{tails}")
        time.sleep(POLL_S)


def _failed(proc: subprocess.Popen, work: Path, rank: int) -> bool:
    """Whether an exited rank failed: a non-zero status, or no result written."""
    return proc.returncode != 0 or not (work / f"result{rank}.pkl").exists()


def _grace(procs: list[subprocess.Popen]) -> None:
    """Let the other ranks finish failing for a moment (their own errors name the first cause)."""
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)


def _failure(procs: list[subprocess.Popen], work: Path, logs: Path) -> LaunchError:
    """The error of the rank that failed first: the earliest error a rank wrote about itself, else
    (none wrote one: killed, out of memory) the first rank that exited non-zero."""
    errors = {}
    for r in range(len(procs)):
        path = work / f"error{r}.txt"
        if path.exists():
            stamp, _, message = path.read_text().partition("\n")
            errors[r] = (float(stamp), message)
    if errors:
        rank = min(errors, key=lambda r: errors[r][0])
        message = errors[rank][1]
    else:
        rank = next(r for r, p in enumerate(procs) if p.poll() is not None and _failed(p, work, r))
        message = _exit_reason(procs[rank].poll())
    others = sorted(set(errors) - {rank})
    also = f" (rank(s) {others} failed after it)" if others else ""
    return LaunchError(f"rank {rank} of {len(procs)} failed: {message}{also}\n{_log_tail(logs, rank)}",
                       rank=rank, error=message)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    if code == 0:
        return "exited without returning a result"
    return f"exited with status {code}"


def _log_tail(logs: Path, rank: int) -> str:
    path = logs / f"rank{rank}.log"
    text = path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if path.exists() else "(no log)"
    return f"--- rank {rank} log ---\n{text}"


# -- inside a rank -------------------------------------------------------------------------------------
def worker_main() -> None:
    """A spawned rank: join the group, run the job, write its result (or its error), leave."""
    work = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ["LONGRANGE_LAUNCH_THREADS"]))
        timeout = datetime.timedelta(seconds=float(os.environ["LONGRANGE_LAUNCH_TIMEOUT"]))
        dist.init_process_group(os.environ["LONGRANGE_LAUNCH_BACKEND"], init_method="env://", timeout=timeout)
        fn, args = _load_job(work / "job.pkl")
        result = fn(rank, dist.get_world_size(), *args)
        _write_atomic(work / f"result{rank}.pkl", pickle.dumps(result))
    except BaseException as err:
        traceback.print_exc()
        _write_atomic(work / f"error{rank}.txt", f"{time.time()!r}\n{type(err).__name__}: {err}".encode())
        _leave(1)
    _leave(0)


def _load_job(path: Path):
    """(fn, args), importable as in the launching process: its sys.path, and its script as
    `__mp_main__` when fn was defined there (as multiprocessing's spawn does)."""
    job = pickle.loads(path.read_bytes())
    sys.path[:] = job["sys_path"]
    if job["main_path"]:
        import runpy
        import types

        main = types.ModuleType("__mp_main__")
        main.__dict__.update(runpy.run_path(job["main_path"], run_name="__mp_main__"))
        sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    return pickle.loads(job["payload"])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _leave(code: int) -> None:
    """End the rank at once. torch 2.13's gloo ranks abort in interpreter shutdown now and then
    ("terminate called without an active exception", after all work succeeded; tests/workers.py);
    skipping the shutdown avoids it. The result or error is already on disk."""
    import torch.distributed as dist

    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
