"""CPU-time companion to `longrange bench` for a machine shared with other jobs: the same BERT-base
layers (ours and the peers, built by the bench's own `build_layer`), timed by this process's CPU time
(`time.process_time`) with ONE thread, so other processes' load does not enter the figures the way it
enters wall time; mechanisms interleaved round by round, the minimum of the rounds kept.

    PYTHONPATH=src python scripts/survey_cputime.py \\
        -m routing,lucid-routing,sinkhorn,lucid-sinkhorn,axial,lucid-axial -n 2048,4096,8192,16384 --rounds 3

Prints per point: CPU ms forward and forward+backward, useful GFLOP/s and % of this process's fp32
matmul rate (the bench's probe shape, also CPU-timed), then log-log time slopes between the first
and last length, and ours / peer ratios. Memory: use `longrange bench` (fresh process per point).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from longrange.bench.point import build_layer
from longrange.bench.specs import PEER_OF, is_peer, layer_flops, mechanism_options


def cpu_ms(step, rounds_done: list[float]) -> None:
    t0 = time.process_time()
    step()
    rounds_done.append((time.process_time() - t0) * 1e3)


def matmul_gflops(rows: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(rows, 768), torch.randn(768, 2304)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * rows * 768 * 2304 / best / 1e9


def steps_for(name: str, n: int):
    """(fwd step, fwdbwd step, forward FLOPs) for one point, built as the bench builds it."""
    spec = {"mechanism": name, "n": n, "dim": 768, "heads": 12, "options": mechanism_options(name)}
    layer, call, _, flops_module = build_layer(spec)
    x = torch.randn(1, n, 768)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(1, n, 768)

    def fwd():
        layer.eval()
        with torch.no_grad():
            call(x)

    def fwdbwd():
        layer.train()
        xg.grad = None
        layer.zero_grad(set_to_none=True)
        call(xg).backward(grad)

    flops = layer_flops(name, n, 768, 12, spec["options"], module=flops_module)["total"]
    return fwd, fwdbwd, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--mechanisms", default="routing,lucid-routing,sinkhorn,lucid-sinkhorn,axial,lucid-axial")
    parser.add_argument("-n", "--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [s.strip() for s in args.mechanisms.split(",") if s.strip()]
    lengths = [int(s) for s in args.lengths.split(",")]
    peak = matmul_gflops()
    print(f"fp32 matmul [4096,768]x[768,2304], 1 thread, CPU time: {peak:.1f} GFLOP/s")
    results: dict[tuple[str, int, str], float] = {}
    for n in lengths:
        points = {name: steps_for(name, n) for name in names}
        times = {(name, mode): [] for name in names for mode in ("fwd", "fwdbwd")}
        for name in names:  # warm-up
            points[name][0]()
            points[name][1]()
        for _ in range(args.rounds):
            for name in names:
                cpu_ms(points[name][0], times[name, "fwd"])
                cpu_ms(points[name][1], times[name, "fwdbwd"])
        for name in names:
            flops = points[name][2]
            for mode, factor in (("fwd", 1), ("fwdbwd", 3)):
                ms = min(times[name, mode])
                results[name, n, mode] = ms
                rate = factor * flops / ms / 1e6
                print(f"{name:16s} n={n:6d} {mode:7s} {ms:9.1f} ms  {rate:6.1f} GFLOP/s  "
                      f"{100 * rate / peak:4.0f}% matmul", flush=True)
    lo, hi = lengths[0], lengths[-1]
    print(f"\ntime slopes {lo}->{hi} (log-log) and ours / peer at {hi}")
    for name in names:
        for mode in ("fwd", "fwdbwd"):
            slope = math.log(results[name, hi, mode] / results[name, lo, mode]) / math.log(hi / lo)
            line = f"{name:16s} {mode:7s} slope {slope:5.2f}"
            peer = PEER_OF.get(name)
            if peer in names and not is_peer(name):
                line += f"   / {peer}: {results[name, hi, mode] / results[peer, hi, mode]:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
