"""Helpers for the tests' spawned worker processes (DDP over gloo)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist


def rendezvous() -> str:
    """A TCP rendezvous on a free local port. (A file:// rendezvous was seen to abort the workers at
    interpreter exit, "terminate called without an active exception", in about a third of the runs;
    torchrun's TCP store never did.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_worker(rank: int, world: int, init_method: str, log_dir: str | Path, timeout_s: float | None = None) -> None:
    """Join the gloo group, with this worker's stdout and stderr in log_dir/worker{rank}.log instead of
    the pytest capture files it inherited. timeout_s: the group's collective timeout (a rank that
    stopped makes the others raise after it instead of hanging)."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(log_dir) / f"worker{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, **kw)


def finish_worker() -> None:
    """Leave the group and end the process at once, after a worker's work succeeded. torch 2.13's
    gloo workers spawned by torch.multiprocessing abort in interpreter shutdown now and then
    ("terminate called without an active exception", no Python frame, after all work and checks
    passed; seen with file:// and tcp:// stores alike, never under torchrun here), which `mp.spawn`
    reports as a failure; skipping the shutdown avoids it. A failing worker raises before this."""
    dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _rank_main(rank, target, world, init_method, log_dir, args, timeout_s):
    start_worker(rank, world, init_method, log_dir, timeout_s)
    import torch

    torch.set_num_threads(1)
    try:
        target(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finish_worker()


def assert_on_ranks(target, world: int, log_dir: str | Path, *args, timeout_s: float = 240.0,
              collective_timeout_s: float = 60.0) -> None:
    """Run target(rank, world, *args), whose checks assert, in `world` spawned gloo processes (a
    module-level function), bounded in time: a rank whose assertion (or anything else) fails, or a
    run past `timeout_s`, fails the caller with an AssertionError carrying the workers' logs."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(target, world, rendezvous(), str(log_dir), args, collective_timeout_s),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout_s:.0f} s")
    except Exception as err:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        logs = "\n".join(f"--- rank {r} ---\n{(Path(log_dir) / f'worker{r}.log').read_text()[-3000:]}"
                         for r in range(world) if (Path(log_dir) / f"worker{r}.log").exists())
        raise AssertionError(f"{err}\n{logs}") from None
