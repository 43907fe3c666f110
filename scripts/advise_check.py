"""How close `longrange advise`'s predictions are to a fresh `longrange bench` measurement.

    longrange bench -m full,local,... -n 1k,2k,8k --mode fwd --out calib     # the calibration
    longrange bench -m full,local,... -n 4k,16k --mode fwd --out check       # fresh points to predict
    python scripts/advise_check.py calib check [--tolerance 0.35]
    # or one sweep over every length, calibrating on some and predicting the others (measured in turn):
    longrange bench -m ... -n 1k,2k,4k,8k,16k --out sweep
    python scripts/advise_check.py sweep sweep --calibrate-on 1k,2k,8k --check-on 4k,16k --budget 16k:300MiB

For every successful point of CHECK's results.json, `lr.analysis.predict` with CALIB's calibration.json
gives the predicted time and memory; printed: a Markdown table with the measured values, the ratio
predicted / measured, whether the time is within the tolerance, and the CPUs other processes kept busy
during each measurement (both sweeps record it). `--budget N:SIZE` also asks `lr.analysis.advise` for
its first choice at length N under that memory budget (among the checked mechanisms, approximate ones
allowed) and compares it with the choice's measured memory. Exits 1 when a time is outside the
tolerance or the choice is over budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import longrange as lr
from longrange.analysis.advise import parse_bytes
from longrange.core.config import parse_lengths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("calibration", type=Path, help="results folder (or calibration.json) of the calibrating sweep")
    p.add_argument("check", type=Path, help="results folder of the sweep to predict")
    p.add_argument("--tolerance", type=float, default=0.35, help="allowed |predicted / measured - 1| for time")
    p.add_argument("--calibrate-on", help="only these lengths of the calibration (e.g. 1k,2k,8k)")
    p.add_argument("--check-on", help="only these lengths of the check (e.g. 4k,16k)")
    p.add_argument("--budget", action="append", default=[], help="N:SIZE, e.g. 16k:300MiB (repeatable)")
    args = p.parse_args()
    calib = lr.analysis.load_calibration(args.calibration)
    if args.calibrate_on:
        keep = set(parse_lengths(args.calibrate_on))
        calib["points"] = [q for q in calib["points"] if q["n"] in keep]
    busy_cal = {(q["mechanism"], q["n"]): q.get("other_cpus") for q in calib["points"]}
    points = json.loads((args.check / "results.json").read_text())["points"]
    if args.check_on:
        keep = set(parse_lengths(args.check_on))
        points = [q for q in points if q["n"] in keep]
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
    busy = [b for b in busy_cal.values() if b is not None]
    print(f"\n{outside} point(s) outside ±{args.tolerance:.0%}; other processes kept {min(busy, default=0):.1f}-"
          f"{max(busy, default=0):.1f} CPUs busy during the calibration points")
    over = 0
    for item in args.budget:
        n_text, _, size = item.partition(":")
        n = parse_lengths(n_text)[0]
        measured = {q["mechanism"]: q for q in points if q["n"] == n and not q.get("error")}
        first = points[0]
        for exact in (True, False):
            advice = lr.analysis.advise(n, memory_budget=size, exact=exact, calibration=calib, dim=first["dim"],
                                        heads=first["heads"], mechanisms=sorted(measured))
            c, label = advice.choice, f"budget {size} at n={n}, {'exact only' if exact else 'approximate allowed'}"
            if c is None:
                print(f"\n{label}: no mechanism predicted to fit")
                continue
            got = measured[c.mechanism]["mem_mb"]
            fits = got * 2**20 <= parse_bytes(size)
            over += not fits
            print(f"\n{label}: first choice {c.mechanism} (predicted {c.time_ms:,.0f} ms, {c.memory_mb:,.0f} MiB); "
                  f"measured {measured[c.mechanism]['time_ms']:,.0f} ms, {got:,.0f} MiB: "
                  f"{'within' if fits else 'OVER'} budget; ruled out by memory: "
                  + ", ".join(x.mechanism for x in advice.candidates if x.ruled_out and "budget" in x.ruled_out))
    return 1 if outside or over else 0


if __name__ == "__main__":
    sys.exit(main())
