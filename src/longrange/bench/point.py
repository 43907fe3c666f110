"""One bench point, meant to run in a fresh process: `python -m longrange.bench.point '<spec json>'`.

Prints one JSON line: the spec plus the median time and the peak memory of the layer.

Memory: the layer and its input are built first; that is the baseline. Then the resident-set
high-water mark is reset (Linux: `/proc/self/clear_refs`), the warm-up and timed runs go, and the
new high-water mark (`VmHWM`) is the peak; `mem_mb` is the increase over the baseline. Where the
high-water mark cannot be reset, `resource.getrusage(RUSAGE_SELF).ru_maxrss` after set-up and after
the runs is used instead; note that on Linux a child's ru_maxrss starts at its parent's peak (exec
from a vfork keeps it), so it understates growth whenever the parent was bigger. On CUDA the
headline numbers are `torch.cuda.max_memory_allocated` against the allocation after set-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

import torch

from longrange.bench.specs import is_peer, layer_flops, point_options, takes_global_tokens

MIB = 2**20
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def build_layer(spec: dict[str, Any]):
    """-> (module, call(x) -> y, note or None, module whose layout gives the FLOPs or None)."""
    name, n, dim, heads = spec["mechanism"], spec["n"], spec["dim"], spec["heads"]
    options = point_options(name, n, spec.get("options", {}))
    g = spec.get("global_tokens", 0) if takes_global_tokens(name) else 0
    if is_peer(name):
        from longrange.bench.peers import build_peer

        layer, note = build_peer(name, dim, heads, n, options, g)
        return layer, layer, note, None
    from longrange.mechanisms import build_attention

    layer = build_attention(name, dim=dim, heads=heads, **options)
    inputs = layer.global_token_inputs(g, spec.get("batch", 1), n, spec.get("device", "cpu"))
    if inputs:
        return layer, lambda x: layer(x, **inputs), f"{g} global", layer
    return layer, layer, None, layer


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


class CpuContention:
    """CPUs kept busy by *other* processes while this one runs (Linux /proc/stat), averaged over the
    measured interval: system-wide busy CPU time minus this process's own, over wall time."""

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _system_busy_s(), _own_cpu_s()

    def stop(self) -> float | None:
        busy = _system_busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy - self.busy0) - (_own_cpu_s() - self.own0)
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


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (mechanism, n, mode) point in this process; returns the spec plus results."""
    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    torch.manual_seed(int(spec.get("seed", 0)))
    device = torch.device(spec.get("device", "cpu"))
    dtype = DTYPES[spec.get("dtype", "fp32")]
    batch, n, dim, mode = int(spec.get("batch", 1)), int(spec["n"]), int(spec["dim"]), spec["mode"]
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be fwd or fwdbwd, got {mode!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    layer, call, note, flops_module = build_layer(spec)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(batch, n, dim, device=device, dtype=dtype)
    params = list(layer.parameters())
    if mode == "fwd":
        layer.eval()

        def step():
            with torch.no_grad():
                call(x)
    else:
        layer.train()
        x.requires_grad_(True)
        grad = torch.randn(batch, n, dim, device=device, dtype=dtype)

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            call(x).backward(grad)

    times, others, memory = timed_runs(step, sync, device, int(spec.get("warmup", 1)),
                                       max(int(spec.get("repeats", 3)), 1))

    flops = layer_flops(
        spec["mechanism"], n, dim, int(spec["heads"]), spec.get("options", {}),
        spec.get("global_tokens", 0),
        batch=batch, module=flops_module, dense_fallback=bool(getattr(layer, "dense_fallback", False)),
    )
    factor = 1 if mode == "fwd" else 3  # backward ~ 2x forward
    return {
        **spec,
        "time_ms": statistics.median(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        **memory,
        "flops": flops["total"] * factor,
        "pairs": flops["pairs"],
        "note": note,
        "other_cpus": others,
        "threads_used": torch.get_num_threads(),
        "torch": torch.__version__,
        "error": None,
    }


def timed_runs(step, sync, device: torch.device, warmup: int, repeats: int) -> tuple[list[float], float, dict]:
    """warmup untimed calls of step(), then `repeats` timed ones, each followed by sync(); with the
    peak memory over all of them (from after set-up) and the CPUs other processes kept busy.
    Returns (seconds per timed call, other CPUs, MemoryMeter.stop()'s figures)."""
    meter, contention = MemoryMeter(device), CpuContention()
    meter.start()
    contention.start()
    for _ in range(warmup):
        step()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times, contention.stop(), meter.stop()


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


def main(argv: list[str] | None = None) -> int:
    return point_main(run_point, "longrange.bench.point", argv)


if __name__ == "__main__":
    raise SystemExit(main())
