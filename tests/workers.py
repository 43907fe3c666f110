"""Helpers for the tests' spawned worker processes (DDP over gloo)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch.distributed as dist


def rendezvous() -> str:
    """A TCP rendezvous on a free local port. (A file:// rendezvous was seen to abort the workers at
    interpreter exit, "terminate called without an active exception", in about a third of the runs;
    torchrun's TCP store never did.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_worker(rank: int, world: int, init_method: str, log_dir: str | Path) -> None:
    """Join the gloo group, with this worker's stdout and stderr in log_dir/worker{rank}.log instead of
    the pytest capture files it inherited."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(log_dir) / f"worker{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)


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
