"""Compiled FlexAttention vs the engine, forward (inference), on the same layouts; prints a table.

    PYTHONPATH=src python scripts/flex_vs_engine.py [--lengths 4096 16384] [--repeats 5] [--threads T] [--device cpu]

q/k/v [1, 12, n, 64] float32 under torch.no_grad(); patterns: a two-sided window of 256 keys per
side (`local`'s graph) and BigBird ITC's graph (64-token blocks, 3 random blocks per head, a
3-block window, first and last block global). The engine runs its default tile (64) and, for the
window, `local`'s tile (256); flex runs the same graphs on 64- and 128-token tiles. Every row:
the first call (compile + run; inductor's cache starts empty, so this is a cold compile), the
first call of a fresh layout of the same shape (dynamo retraces, inductor's on-disk cache hits),
the median of `repeats` steady calls, interleaved with the other rows' calls so that machine load
hits all rows alike (compare ratios, not absolute times, on a shared machine), and the largest
difference from the engine's tile-64 output.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
import warnings

import torch

import longrange as lr
from longrange.patterns import BlockWindow, RandomBlocks, Window, global_blocks
from longrange.sparse.engine import block_sparse_attention
from longrange.sparse.flex import flex_block_sparse_attention

HEADS, HEAD_DIM = 12, 64


def patterns():
    bigbird = BlockWindow(1, 64) | global_blocks(64) | RandomBlocks(3, 64, num_heads=HEADS, seed=0)
    return {"window 256/side": (Window(256), (64, 256), (64, 128)),
            "bigbird (64-token blocks)": (bigbird, (64,), (64, 128))}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="flex_vs_engine_"))
    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, float32, forward only, "
          f"q/k/v [1, {HEADS}, n, {HEAD_DIM}]; inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    header = (f"{'pattern':26s} {'n':>6s} {'backend':7s} {'tile':>4s} {'compile s':>9s} {'recompile s':>11s} "
              f"{'median ms':>9s} {'vs engine/64':>12s} {'max |diff|':>10s}")
    print(header)
    for name, (pattern, engine_tiles, flex_tiles) in patterns().items():
        for n in args.lengths:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(dev) for _ in range(3))
            rows = []  # (backend, tile, call, first_s, recompile_s)
            with torch.no_grad():
                for tile in engine_tiles:
                    layout = lr.compile_layout(pattern, n, tile).to(dev)
                    call = functools.partial(block_sparse_attention, q, k, v, layout)
                    rows.append(["engine", tile, call, None, None])
                for tile in flex_tiles:
                    layout = lr.compile_layout(pattern, n, tile).to(dev)
                    call = functools.partial(flex_block_sparse_attention, q, k, v, layout)
                    _, first = timed(call)
                    fresh = lr.compile_layout(pattern, n, tile).to(dev)  # same shape, a new compiled function
                    _, again = timed(functools.partial(flex_block_sparse_attention, q, k, v, fresh))
                    rows.append(["flex", tile, call, first, again])
                outs = [row[2]() for row in rows]  # warm-up (engine buffers, flex first steady call)
                times = [[] for _ in rows]
                for _ in range(args.repeats):
                    for i, row in enumerate(rows):
                        _, dt = timed(row[2])
                        times[i].append(dt)
            base = statistics.median(times[0])
            for (backend, tile, _, first, again), ts, out in zip(rows, times, outs, strict=True):
                med = statistics.median(ts)
                compile_s = "" if first is None else f"{first - med:9.1f}"
                recompile_s = "" if again is None else f"{again - med:11.1f}"
                diff = (out - outs[0]).abs().max().item()
                print(f"{name:26s} {n:6d} {backend:7s} {tile:4d} {compile_s:>9s} {recompile_s:>11s} {med * 1e3:9.1f} "
                      f"{base / med:11.2f}x {diff:10.1e}", flush=True)


if __name__ == "__main__":
    main()
