"""Training memory of a Reformer encoder against its depth: reversible layers keep it flat (issue 19).

    PYTHONPATH=src python scripts/reversible_memory.py [-n 16384] [--layers 1,12] [--ffn-chunk 2048]
                                   [--grads both|before|in-step] [--mmap-threshold BYTES] [--plain]

An `Encoder` (BERT-base sizes: 768 / 12 heads / FFN 3072, pre-norm, dropout 0.1) with `reformer`
attention (4 hashes, buckets of 64), a small vocabulary (so the embedding table is not what is
measured), one forward + backward at length n. Each point runs in a fresh process; its figure is
the resident-set peak over the set-up (model, parameters' gradients already allocated as in a
training loop's steady state, input), i.e. what the step's activations need; `+ grads` is the same
step with the gradients allocated inside it (set_to_none), where depth adds 28 MiB of weights per
layer. `--plain` adds the same models without reversible layers for contrast (much more memory).

Resident memory also counts what the C allocator keeps after tensors are freed: glibc's malloc
keeps freed heap blocks, and gradients allocated between a block's temporaries fragment it.
`--mmap-threshold 131072` runs the points with MALLOC_MMAP_THRESHOLD_ set, so blocks above that
size are unmapped when freed and the figure follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

MIB = 2**20


def run_point(spec: dict) -> dict:
    from longrange.measure import MemoryMeter
    from longrange.models import Encoder, ModelConfig

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    n = spec["n"]
    config = ModelConfig(vocab_size=1024, dim=768, heads=12, layers=spec["layers"], ffn_dim=3072, max_length=n,
                         attention="reformer", attention_options={"bucket_size": 64, "n_hashes": 4}, norm="pre",
                         reversible=spec["reversible"], ffn_chunk_size=spec["ffn_chunk"])
    model = Encoder(config).train()
    ids = torch.randint(1, 1024, (1, n))
    upstream = torch.randn(1, n, 768)
    if spec["grads_ready"]:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    t0 = time.perf_counter()
    hidden = model(ids).last_hidden_state
    (hidden * upstream).sum().backward()
    seconds = time.perf_counter() - t0
    memory = meter.stop()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**spec, "mem_mb": memory["mem_mb"], "seconds": seconds, "param_mb": params / MIB}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=16384)
    parser.add_argument("--layers", default="1,12")
    parser.add_argument("--ffn-chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grads", default="both", choices=("both", "before", "in-step"))
    parser.add_argument("--mmap-threshold", type=int, help="glibc MALLOC_MMAP_THRESHOLD_ for the points")
    parser.add_argument("--plain", action="store_true", help="also run the models without reversible layers")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))), flush=True)
        return 0
    layers = [int(v) for v in args.layers.split(",")]
    env = dict(os.environ)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    modes = {"both": (True, False), "before": (True,), "in-step": (False,)}[args.grads]
    rows = []
    for reversible in (True, False) if args.plain else (True,):
        for grads_ready in modes:
            for depth in layers:
                spec = {"n": args.n, "layers": depth, "reversible": reversible, "ffn_chunk": args.ffn_chunk,
                        "threads": args.threads, "grads_ready": grads_ready}
                out = subprocess.run([sys.executable, __file__, "--point", json.dumps(spec)], capture_output=True,
                                     text=True, check=True, env=env)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    allocator = "default malloc" if args.mmap_threshold is None else f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
    print(f"Encoder, reformer (4 hashes, buckets of 64), n = {args.n}, FFN chunks of {args.ffn_chunk}, "
          f"{args.threads} threads, {allocator}: peak resident growth over the set-up, one forward + backward")
    print(f"{'layers':>6} {'reversible':>10} {'gradients':>18} {'peak MiB':>9} {'x 1 layer':>9} {'weights MiB':>11} "
          f"{'step s':>7}")
    for row in rows:
        base = next(r for r in rows if r["layers"] == layers[0] and r["reversible"] == row["reversible"]
                    and r["grads_ready"] == row["grads_ready"])
        grads = "allocated before" if row["grads_ready"] else "allocated in step"
        print(f"{row['layers']:>6} {str(row['reversible']):>10} {grads:>18} {row['mem_mb']:>9.0f} "
              f"{row['mem_mb'] / base['mem_mb']:>9.2f} {row['param_mb']:>11.0f} {row['seconds']:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
