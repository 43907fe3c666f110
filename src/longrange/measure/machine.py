"""What a measurement ran on: the machine's dense matmul rate (the yardstick for "% matmul"), versions,
load, and the console tables go to."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any

import torch

from longrange.core.version import __version__

#: the dtype names the command line takes
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def matmul_probe(*, dim: int, threads: int, device: str = "cpu", dtype: str = "fp32", rows: int = 4096,
                 repeats: int = 5) -> dict[str, Any]:
    """Dense GEMM GFLOP/s with these threads, device and dtype: [rows, dim] x [dim, 3·dim] (a fused QKV
    projection), median of `repeats` after two warm-ups. Probe before and after a sweep and keep the
    faster: one busy moment should not set the bar."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dev, dt = torch.device(device), DTYPES[dtype]
        a = torch.randn(rows, dim, device=dev, dtype=dt)
        b = torch.randn(dim, 3 * dim, device=dev, dtype=dt)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        times = []
        for i in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
    finally:
        torch.set_num_threads(previous)
    flops = 2 * rows * dim * 3 * dim
    return {"shape": f"[{rows},{dim}]x[{dim},{3 * dim}]", "dtype": dtype, "time_ms": t * 1e3, "gflops": flops / t / 1e9}


def machine_meta(settings: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Settings, date, versions, CPU count, 1-minute load average and GPU name of a sweep, plus a note
    when the machine was busy at the start."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    cpus = os.cpu_count() or 1
    meta = {"settings": settings, "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_count": cpus,
            "load_avg_1min": load, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__, "longrange": __version__,
            "platform": platform.platform(), "notes": []}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    if load is not None and load > 0.5 * cpus:
        meta["notes"].append(f"machine busy at start (1-min load average {load:.1f} on {cpus} CPUs): timings may "
                             "be noisy")
    return meta


def make_console(console=None):
    """The console tables go to: as wide as the terminal, or 140 columns when output is not a terminal."""
    if console is not None:
        return console
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)
