"""Axial attention's two passes, on the block engine vs as fused SDPA over line views (the measurement
behind `longrange.mechanisms.axial`'s choice). Both compute the same pairs: rows are the engine's
`Segments(w)` layout, columns the same after a transpose.

    PYTHONPATH=src python scripts/probe_axial_paths.py --lengths 4096 16384

Prints the median CPU time (`time.process_time`, one thread by default, so other jobs on a shared
machine barely enter it) per path, forward (no grad) and forward+backward, q/k/v [1, 12, n, 64],
the grid the most square one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from longrange.mechanisms.axial import axial_attention, most_square
from longrange.patterns import Segments
from longrange.sparse.engine import block_sparse_attention
from longrange.sparse.layout import compile_layout


def to_columns(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H, h·w, D] row-major -> column-major (a copy)."""
    b, heads, n, d = t.shape
    return t.view(b, heads, h, w, d).transpose(2, 3).contiguous().view(b, heads, n, d)


def engine_axial(q, k, v, h, w, layouts):
    rows = block_sparse_attention(q, k, v, layouts[0])
    cols = block_sparse_attention(to_columns(q, h, w), to_columns(k, h, w), to_columns(rows, h, w), layouts[1])
    return to_columns(cols, w, h)


def median_ms(fn, args: tuple, grad: bool, repeats: int) -> float:
    """Median CPU milliseconds of fn(*args) (then .sum().backward() when grad), after one untimed call."""

    def step():
        if grad:
            fn(*args).sum().backward()
        else:
            with torch.no_grad():
                fn(*args)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'n':>6} {'grid':>10} {'mode':>7} {'engine ms':>10} {'sdpa ms':>9} {'engine/sdpa':>11}")
    for n in args.lengths:
        h, w = most_square(n)
        layouts = (compile_layout(Segments(w), n, w), compile_layout(Segments(h), n, h))
        for grad in (False, True):
            q, k, v = (torch.randn(1, 12, n, 64, requires_grad=grad) for _ in range(3))
            engine = median_ms(engine_axial, (q, k, v, h, w, layouts), grad, args.repeats)
            sdpa = median_ms(axial_attention, (q, k, v, (h, w)), grad, args.repeats)
            mode = "fwdbwd" if grad else "fwd"
            print(f"{n:>6} {f'{h}x{w}':>10} {mode:>7} {engine:>10.1f} {sdpa:>9.1f} {engine / sdpa:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
