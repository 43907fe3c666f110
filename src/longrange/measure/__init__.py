"""Measuring one thing honestly: each point in a fresh process, a timing loop, a memory meter, and a
reading of how busy other processes kept the CPUs. Used by the layer benchmark (`longrange.bench`),
LRA's speed table (`longrange.lra.speed`) and the analysis (`longrange.analysis`); depends on core only.

    from longrange.measure import timed_runs, run_in_subprocess, point_main
    times, other_cpus, memory = timed_runs(step, sync, device, warmup=1, repeats=3)
"""

from longrange.measure.machine import machine_meta, make_console, matmul_probe
from longrange.measure.memory import MemoryMeter, process_peak_mb
from longrange.measure.process import measure_safely, point_main, run_in_subprocess
from longrange.measure.timing import BUSY_CPUS, CpuContention, busy, contention_note, timed_runs

__all__ = [
    "BUSY_CPUS", "CpuContention", "MemoryMeter", "busy", "contention_note", "machine_meta", "make_console",
    "matmul_probe", "measure_safely", "point_main", "process_peak_mb", "run_in_subprocess", "timed_runs",
]
