"""One measurement per fresh interpreter: `python -m MODULE '<spec json>'` prints one JSON line, and
`run_in_subprocess` starts it, with a timeout, and turns any failure into a row with `error` set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

import torch


def measure_safely(run, spec: dict[str, Any]) -> dict[str, Any]:
    """run(spec), or the spec with `error` set when it raises: a row, not a crash of the sweep."""
    try:
        return run(spec)
    except Exception as e:
        traceback.print_exc()
        kind = "out of memory" if isinstance(e, torch.OutOfMemoryError | MemoryError) else type(e).__name__
        return {**spec, "error": f"{kind}: {e}".strip()[:500]}


def point_main(run, module: str, argv: list[str] | None = None) -> int:
    """`python -m MODULE '<spec json>'`: measure one point with run(spec), print one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m {module} '<spec json>'", file=sys.stderr)
        return 2
    result = measure_safely(run, json.loads(argv[0]))
    print(json.dumps(result, default=str), flush=True)
    return 0 if result.get("error") is None else 1


def run_in_subprocess(spec: dict[str, Any], module: str, timeout: float | None = None) -> dict[str, Any]:
    """Run one point in a fresh interpreter (`python -m MODULE '<spec json>'`, which prints one JSON
    line); never raises for a failed point: the result's `error` says why. `spec["threads"]` sets
    OMP/MKL threads (default 2)."""
    threads = str(spec.get("threads") or 2)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", module, json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:g} s (--timeout)", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return {**json.loads(line), "wall_s": wall}
            except json.JSONDecodeError:
                break
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        why = f"exited with status {proc.returncode}"
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {**spec, "error": f"{why}: {tail}"[:500], "wall_s": wall}
