"""Transformer-XL's segment attention: dense SDPA with its position term as an [n, L] float bias (how
XL's released code and this library before issue 12 ran it) against the segment's block layout on the
engine (`XLAttention.attend`: causal tiles past the diagonal skipped, the position term per chunk);
prints a table.

    PYTHONPATH=src python scripts/xl_backends.py [--sizes 128:128 512:512 2048:2048] [--repeats 5]

One `xl` layer (768 / 12 unless --dim / --heads), fp32, batch 1, `--threads` threads, causal; n
segment tokens attending to [M memory slots ; the segment]. q, k, v are made once by the layer's
projections (the attention is what differs). Time: median of `repeats` calls after one warm-up;
memory: the resident-set high-water mark over those calls, above the set-up (Linux). Both paths are
checked equal (largest difference printed). Forward under torch.no_grad(); forward+backward through
q, k, v and the layer's position parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import longrange as lr
from longrange.mechanisms.memory import allowed_keys


def dense_attend(layer, q, k, v):
    """The whole [n, L] position bias, masked, in SDPA's float mask (no key padding here)."""
    n, length = q.shape[2], k.shape[2]
    allowed = allowed_keys(n, length, layer.config.causal, layer.config.span, q.device)[None, None]
    scale = q.shape[-1] ** -0.5
    bias = (layer.position_scores(q, length) * scale).masked_fill(~allowed, float("-inf"))
    query = q + layer.content_bias[:, None].to(q.dtype)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=bias, scale=scale)


def rss_mib() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(step, repeats: int) -> tuple[float, float]:
    step()
    base = rss_mib()[0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, max(rss_mib()[1] - base, 0.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["128:128", "512:512", "2048:2048"], help="n:M pairs")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = lr.build_attention("xl", dim=args.dim, heads=args.heads, backend="engine")
    print(f"xl segment attention, {args.dim} / {args.heads}, fp32, {args.threads} threads, tile {layer.config.tile}; "
          "time ms / peak +MiB")
    print(f"{'n':>6} {'M':>6} | {'mode':6} | {'dense SDPA + bias':>18} | {'layout (engine)':>16} | {'t ratio':>7} | "
          f"{'max |diff|':>10}")
    for size in args.sizes:
        n, m = (int(s) for s in size.split(":"))
        x, memory = torch.randn(1, n, args.dim), torch.randn(1, m, args.dim)
        q, k, v = (t.detach().requires_grad_() for t in layer.project_with_memory(x, memory))
        paths = {"dense": lambda q=q, k=k, v=v: dense_attend(layer, q, k, v),
                 "layout": lambda q=q, k=k, v=v: layer.attend(q, k, v, None)}
        with torch.no_grad():
            diff = (paths["dense"]() - paths["layout"]()).abs().max().item()
        for mode in ("fwd", "fwdbwd"):
            got = {}
            for name, fn in paths.items():
                def step(fn=fn, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            fn()
                    else:
                        fn().sum().backward()
                got[name] = measure(step, args.repeats)
            (td, md), (tl, ml) = got["dense"], got["layout"]
            print(f"{n:>6} {m:>6} | {mode:6} | {td:9.1f} / {md:6.0f} | {tl:8.1f} / {ml:5.0f} | {tl / td:6.2f}x | "
                  f"{diff:10.2e}")


if __name__ == "__main__":
    main()
