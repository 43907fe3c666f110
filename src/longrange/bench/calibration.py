"""The calibration file `longrange advise` reads: what this machine measured, beside results.json.

    {"format": "longrange-calibration/1", "machine": {...}, "points": [{mechanism, options, mode, n, dim,
     heads, batch, dtype, device, threads, global_tokens, time_ms, mem_mb, flops, other_cpus}, ...]}

Only our registered mechanisms' successful points go in (peers are other libraries). `flops` is the
analytic count of the point (`specs.layer_flops`, forward + backward counted as 3x forward), so a
reader can turn a time into a rate without re-counting. `other_cpus` says how busy the machine was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longrange.bench.specs import is_peer

FORMAT = "longrange-calibration/1"
NAME = "calibration.json"
POINT_FIELDS = ("mechanism", "options", "mode", "n", "dim", "heads", "batch", "dtype", "device", "threads",
                "global_tokens", "time_ms", "mem_mb", "flops", "other_cpus")
MACHINE_FIELDS = ("date", "cpu_count", "load_avg_1min", "gpu", "torch", "longrange", "platform")


def calibration(meta: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    machine = {k: meta.get(k) for k in MACHINE_FIELDS}
    machine["probe_gflops"] = (meta.get("probe") or {}).get("gflops")
    rows = [{k: p.get(k) for k in POINT_FIELDS} for p in points
            if not p.get("error") and not is_peer(p["mechanism"]) and p.get("time_ms")]
    return {"format": FORMAT, "machine": machine, "points": rows}


def write_calibration(out: Path, meta: dict[str, Any], points: list[dict[str, Any]]) -> Path:
    """Write OUT/calibration.json (atomically); a resumed sweep rewrites it with every point."""
    path = Path(out) / NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(calibration(meta, points), indent=1, default=str))
    tmp.replace(path)
    return path
