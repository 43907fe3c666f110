"""How close `longrange advise`'s predictions are to a fresh `longrange bench` measurement.

    longrange bench -m full,local,... -n 1k,2k,8k --mode fwd --out calib     # the calibration
    longrange bench -m full,local,... -n 4k,16k --mode fwd --out check       # fresh points to predict
    python scripts/advise_check.py calib check [--tolerance 0.35]

For every successful point of CHECK's results.json, `lr.analysis.predict` with CALIB's calibration.json
gives the predicted time and memory; printed: a Markdown table with the measured values, the ratio
predicted / measured, whether the time is within the tolerance, and the CPUs other processes kept busy
during each measurement (both sweeps record it). Exits 1 when a time is outside the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import longrange as lr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("calibration", type=Path, help="results folder (or calibration.json) of the calibrating sweep")
    p.add_argument("check", type=Path, help="results folder of the sweep to predict")
    p.add_argument("--tolerance", type=float, default=0.35, help="allowed |predicted / measured - 1| for time")
    args = p.parse_args()
    calib = lr.analysis.load_calibration(args.calibration)
    busy_cal = {(q["mechanism"], q["n"]): q.get("other_cpus") for q in calib["points"]}
    points = json.loads((args.check / "results.json").read_text())["points"]
    print("| mechanism | mode | n | predicted ms | measured ms | ratio | within | predicted MiB | measured MiB | "
          "busy CPUs (check) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    outside = 0
    for q in sorted((q for q in points if not q.get("error")), key=lambda q: (q["mechanism"], q["n"])):
        job = "training" if q["mode"] == "fwdbwd" else "inference"
        c = lr.analysis.predict(q["mechanism"], q["n"], job=job, dim=q["dim"], heads=q["heads"], batch=q["batch"],
                                options=q.get("options") or {}, device=q["device"], dtype=q["dtype"],
                                calibration=calib, global_tokens=q.get("global_tokens", 0),
                                probe_gflops=calib["machine"].get("probe_gflops"))
        ratio = c.time_ms / q["time_ms"]
        ok = abs(ratio - 1) <= args.tolerance
        outside += not ok
        print(f"| {q['mechanism']} | {q['mode']} | {q['n']} | {c.time_ms:,.0f} | {q['time_ms']:,.0f} | {ratio:.2f} | "
              f"{'yes' if ok else 'NO'} | {c.memory_mb:,.0f} | {q['mem_mb']:,.0f} | {q.get('other_cpus') or 0:.1f} |")
    print(f"\n{outside} point(s) outside ±{args.tolerance:.0%}; calibration busy CPUs: "
          f"{', '.join(f'{m} {n}: {b:.1f}' for (m, n), b in sorted(busy_cal.items()) if b)}")
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
