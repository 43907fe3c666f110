"""Context parallelism measured: one sequence sharded over P gloo ranks against one process.

    python scripts/context_parallel.py -m longformer,bigbird -n 1048576 --nproc 4 --dim 512 --heads 8 --mode fwd
    python scripts/context_parallel.py -m longformer,bigbird -n 262144 --nproc 4 --dim 768 --heads 12 --mode fwdbwd
    python scripts/context_parallel.py -m local,longformer,bigbird -n 64k --nproc 4 --dim 768 --heads 12 \\
        --reference none --out cp-bytes-64k                         # bytes per rank against a K,V all-gather

Every (mechanism, length, mode) point starts P fresh ranks (`longrange.distributed.launch`); each
builds the bench's layer (its options, its seed) and only its own n/P tokens (batch 1 by default, no
full-length tensor anywhere; the forward under torch.no_grad), then runs warm-up + timed calls of
`ContextParallel`. Points at n >= --single-repeat-from run one timed call. Printed: per rank the
median time, the process's peak memory (the one-process bench's meter) and the bytes sent per call
(forward and backward apart) beside an all-gather of K and V, the strategy's planned bytes where it
has them; then the slowest rank against the one-process bench point at n (or at n/P where n fails,
or as --reference says). Written: OUT/sharded.json and OUT/sharded.csv (`longrange.bench.sharded`; the ranks run
`longrange.cli.bench.sharded_rank`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from longrange.bench.sharded import REFERENCES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--mechanisms", default="local,longformer,bigbird", help="comma-separated mechanisms")
    p.add_argument("-n", "--lengths", default="4096", help="comma-separated lengths (4k accepted)")
    p.add_argument("--nproc", type=int, default=4, help="ranks the sequence is sharded over")
    p.add_argument("--dim", type=int, default=768, help="hidden size")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwdbwd", "both"), help="forward, or forward+backward")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=2, help="torch threads of the one-process reference")
    p.add_argument("--rank-threads", type=int, default=None,
                   help="torch threads per rank (default: --threads shared out, at least 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per point (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--single-repeat-from", type=int, default=262144,
                   help="points at n >= this run one timed call (0: never)")
    p.add_argument("--reference", default="auto", choices=REFERENCES,
                   help="one-process point: at n, at n/P where n fails (auto), n, shard, or none")
    p.add_argument("--cp-fallback", default="none", choices=("none", "gather"),
                   help="gather: run mechanisms without a sharded form on the gathered sequence")
    p.add_argument("--opt", action="append", default=None, help="MECHANISM.KEY=VALUE, repeatable")
    p.add_argument("--global-tokens", type=int, default=1, help="global tokens of longformer / etc (the first g)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds allowed per point (ranks and reference)")
    p.add_argument("--keep-going", action="store_true", help="run past failed points")
    p.add_argument("--out", type=Path, default=Path("cp-results"), help="folder for sharded.json and sharded.csv")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace):
    from longrange.bench import make_settings
    from longrange.bench.sharded import make_sharded_settings
    from longrange.core.config import parse_scoped_key_values

    bench = make_settings("quick", mechanisms=args.mechanisms, lengths=args.lengths, mode=args.mode,
                          options=parse_scoped_key_values(args.opt, "options"), repeats=args.repeats, dim=args.dim,
                          heads=args.heads, batch=args.batch, dtype=args.dtype, threads=args.threads,
                          warmup=args.warmup, global_tokens=args.global_tokens, out=args.out, timeout=args.timeout,
                          keep_going=args.keep_going, plot=False)
    return make_sharded_settings(bench, args.nproc, rank_threads=args.rank_threads, fallback=args.cp_fallback,
                                 reference=args.reference, single_repeat_from=args.single_repeat_from or None)


def main(argv: list[str] | None = None) -> int:
    from longrange.bench.sharded import run_sharded_bench
    from longrange.cli.bench import run_sharded_point
    from longrange.core.config import ConfigError

    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as err:
        print(f"error: {err} (option: {err.option})", file=sys.stderr)
        return 2
    result = run_sharded_bench(settings, run_sharded_point)
    return 1 if any(p.get("error") for p in result["points"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
