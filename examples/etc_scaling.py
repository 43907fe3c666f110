"""ETC's time and peak memory against the long length n, at a fixed number of global tokens g and
a fixed local radius r: both should grow linearly (log-log slope ~1).

Each length runs in a fresh process (honest peak memory: the resident-set high-water mark is reset
after set-up, as `longrange bench` does). The g global tokens split the long input into g equal
segments; with --structure each global token sees, and is seen by, its segment only (the masks of
`etc_structure`), otherwise every global↔long pair is allowed.

    python examples/etc_scaling.py                                   # n = 1k..16k, g = 64, r = 84
    python examples/etc_scaling.py -n 512,1024,2048 --dim 64 --heads 2 --repeats 1   # a smoke run
    python examples/etc_scaling.py --mode fwdbwd --structure --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch


def measure(args) -> dict:
    """One point in this process: returns {'n', 'ms', 'mem_mb', ...}."""
    from longrange.bench.point import MemoryMeter
    from longrange.mechanisms import build_attention

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    n, g = args.point, args.num_global
    layer = build_attention("etc", dim=args.dim, heads=args.heads, radius=args.radius,
                            max_distance=args.max_distance).to(device)
    x = torch.randn(1, g + n, args.dim, device=device)
    masks = {}
    if args.structure:  # global token s <-> long tokens of segment s
        segment = torch.arange(n, device=device) * g // n  # (n,)
        l2g = (segment[:, None] == torch.arange(g, device=device))[None]  # (1, n, g)
        masks = {"long_to_global": l2g, "global_to_long": l2g.transpose(1, 2).contiguous()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.mode == "fwd":
        layer.eval()

        def step():
            with torch.no_grad():
                layer(x, num_global=g, **masks)
    else:
        x.requires_grad_(True)

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x, num_global=g, **masks).sum().backward()

    meter = MemoryMeter(device)
    meter.start()
    step()  # warm-up
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    mem = meter.stop()
    return {"n": n, "g": g, "radius": args.radius, "mode": args.mode, "ms": 1e3 * statistics.median(times),
            "mem_mb": mem["mem_mb"], "macs": layer.macs(g + n, num_global=g).total}


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(v) for v in xs], [math.log(max(v, 1e-9)) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--lengths", default="1024,2048,4096,8192,16384", help="long lengths n")
    parser.add_argument("-g", "--num-global", type=int, default=64)
    parser.add_argument("-r", "--radius", type=int, default=84)
    parser.add_argument("--max-distance", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd")
    parser.add_argument("--structure", action="store_true", help="segment masks instead of full global↔long")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # internal: measure one length here
    args = parser.parse_args(argv)
    if args.point is not None:
        print(json.dumps(measure(args)))
        return []
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for n in (int(v) for v in args.lengths.split(",")):
        out = subprocess.run([sys.executable, __file__, *passthrough, "--point", str(n)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"n={r['n']:>7}  g={r['g']}  r={r['radius']}  {r['mode']:<6}  {r['ms']:9.1f} ms  {r['mem_mb']:8.1f} MB  "
              f"{r['macs'] / 1e9:8.2f} GMAC", flush=True)
    if len(rows) > 1:
        ns = [r["n"] for r in rows]
        print(f"log-log slope vs n: time {slope(ns, [r['ms'] for r in rows]):.2f}, "
              f"memory {slope(ns, [r['mem_mb'] for r in rows]):.2f}, MACs {slope(ns, [r['macs'] for r in rows]):.2f}")
    return rows


if __name__ == "__main__":
    main()
