"""Peak memory of a measured interval: the resident-set high-water mark on CPU (reset at the start,
Linux `/proc/self/clear_refs`), `torch.cuda.max_memory_allocated` on CUDA.

Memory: the layer and its input are built first; that is the baseline. Then the high-water mark is
reset, the runs go, and the new high-water mark (`VmHWM`) is the peak; `mem_mb` is the increase over
the baseline. Where the mark cannot be reset, `resource.getrusage(RUSAGE_SELF).ru_maxrss` after set-up
and after the runs is used instead; on Linux a child's ru_maxrss starts at its parent's peak (exec from
a vfork keeps it), so it understates growth whenever the parent was bigger.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

MIB = 2**20


class MemoryMeter:
    """Peak memory between `start()` (after set-up) and `stop()` (after the runs)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
        self.maxrss_base = _ru_maxrss()
        self.rss_base = _proc_status("VmRSS")
        self.hwm_reset = self.rss_base is not None and _reset_hwm()

    def stop(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, Any] = {"ru_maxrss_base_mb": self.maxrss_base / MIB, "ru_maxrss_mb": _ru_maxrss() / MIB}
        if self.hwm_reset:
            base, peak = self.rss_base, _proc_status("VmHWM")
            out.update(rss_source="VmHWM", rss_base_mb=base / MIB, rss_peak_mb=peak / MIB)
        else:
            out.update(rss_source="ru_maxrss", rss_base_mb=out["ru_maxrss_base_mb"], rss_peak_mb=out["ru_maxrss_mb"])
        out["rss_increase_mb"] = max(out["rss_peak_mb"] - out["rss_base_mb"], 0.0)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            out.update(cuda_base_mb=self.cuda_base / MIB, cuda_peak_mb=peak / MIB,
                       cuda_increase_mb=(peak - self.cuda_base) / MIB)
            out.update(mem_source="cuda", peak_mb=out["cuda_peak_mb"], mem_mb=out["cuda_increase_mb"])
        else:
            out.update(mem_source=out["rss_source"], peak_mb=out["rss_peak_mb"], mem_mb=out["rss_increase_mb"])
        return out


def _ru_maxrss() -> int:
    """Peak RSS in bytes (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def process_peak_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, kind) of the whole process so far: CUDA's max allocated bytes, or the peak resident
    set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB, "cuda_max_allocated"
    return _ru_maxrss() / MIB, "cpu_peak_rss"
