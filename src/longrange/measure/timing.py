"""The timing loop and a reading of contention: the CPUs other processes kept busy while we measured."""

from __future__ import annotations

import os
import time

import torch

from longrange.measure.memory import MemoryMeter

#: other processes keeping at least this many CPUs busy during a point make its time unreliable
BUSY_CPUS = 0.5


def timed_runs(step, sync, device: torch.device, warmup: int, repeats: int,
               before=None) -> tuple[list[float], float, dict]:
    """warmup untimed calls of step(), then `repeats` timed ones, each followed by sync(); with the
    peak memory over all of them (from after set-up) and the CPUs other processes kept busy.
    before: called untimed before each call (sharded points: a barrier, so the ranks start together).
    Returns (seconds per timed call, other CPUs, MemoryMeter.stop()'s figures)."""
    meter, contention = MemoryMeter(device), CpuContention()
    meter.start()
    contention.start()
    for _ in range(warmup):
        if before is not None:
            before()
        step()
        sync()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times, contention.stop(), meter.stop()


def busy(row: dict) -> bool:
    """Whether a measured row ran while other processes kept >= BUSY_CPUS CPUs busy."""
    return (row.get("other_cpus") or 0) >= BUSY_CPUS


def contention_note(rows: list[dict], label) -> str | None:
    """One note naming the rows measured on a busy machine (`label(row)` names a row), or None."""
    hits = [r for r in rows if busy(r) and not r.get("error")]
    if not hits:
        return None
    names = ", ".join(f"{label(r)} ({r['other_cpus']:.1f})" for r in hits)
    return (f"{len(hits)} point(s) ran while other processes kept >= {BUSY_CPUS} CPUs busy ({names}): their times "
            "are not reliable; re-run them on a quiet machine")


class CpuContention:
    """CPUs kept busy by *other* processes while this one runs (Linux /proc/stat), averaged over the
    measured interval: system-wide busy CPU time minus this process's own, over wall time."""

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _system_busy_s(), _own_cpu_s()

    def stop(self) -> float | None:
        busy_s = _system_busy_s()
        if busy_s is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy_s - self.busy0) - (_own_cpu_s() - self.own0)
        return max(other / wall, 0.0) if wall > 0 else None


def _system_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, guest is inside user


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system
