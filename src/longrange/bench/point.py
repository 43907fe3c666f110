"""One bench point, meant to run in a fresh process: `python -m longrange.bench.point '<spec json>'`.

Prints one JSON line: the spec plus the median time and the peak memory of the layer (measured by
`longrange.measure`: the layer and its input are built first, that is the baseline; `mem_mb` is the
peak's increase over it; on CUDA `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import torch

from longrange.bench.peers import build_peer
from longrange.bench.specs import is_peer, layer_flops, ours, point_options, takes_global_tokens
from longrange.measure import point_main, timed_runs
from longrange.measure.machine import DTYPES
from longrange.mechanisms import build_attention


def build_layer(spec: dict[str, Any]):
    """-> (module, call(x) -> y, note or None, module whose layout gives the FLOPs or None)."""
    name, n, dim, heads = spec["mechanism"], spec["n"], spec["dim"], spec["heads"]
    options = point_options(name, n, spec.get("options", {}))
    g = spec.get("global_tokens", 0) if takes_global_tokens(name) else 0
    if is_peer(name):

        layer, note = build_peer(name, dim, heads, n, options, g)
        return layer, layer, note, None

    layer = build_attention(ours(name), dim=dim, heads=heads, **options)
    inputs = layer.global_token_inputs(g, spec.get("batch", 1), n, spec.get("device", "cpu"))
    if inputs:
        return layer, lambda x: layer(x, **inputs), f"{g} global", layer
    return layer, layer, None, layer


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (mechanism, n, mode) point in this process; returns the spec plus results."""
    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    torch.manual_seed(int(spec.get("seed", 0)))
    device = torch.device(spec.get("device", "cpu"))
    dtype = DTYPES[spec.get("dtype", "fp32")]
    batch, n, dim, mode = int(spec.get("batch", 1)), int(spec["n"]), int(spec["dim"]), spec["mode"]
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be fwd or fwdbwd, got {mode!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    layer, call, note, flops_module = build_layer(spec)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(batch, n, dim, device=device, dtype=dtype)
    params = list(layer.parameters())
    if mode == "fwd":
        layer.eval()

        def step():
            with torch.no_grad():
                call(x)
    else:
        layer.train()
        x.requires_grad_(True)
        grad = torch.randn(batch, n, dim, device=device, dtype=dtype)

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            call(x).backward(grad)

    backend = None
    if hasattr(layer, "decide_backend"):  # which backend ran the layout, and why ("auto" decides per call)
        with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
            try:
                backend = str(layer.decide_backend(x, **({"num_global": spec.get("global_tokens", 0)}
                                                         if "num_global" in layer.capabilities.inputs else {})))
            except ValueError as err:
                backend = f"error: {err}"
    times, others, memory = timed_runs(step, sync, device, int(spec.get("warmup", 1)),
                                       max(int(spec.get("repeats", 3)), 1))

    flops = layer_flops(
        spec["mechanism"], n, dim, int(spec["heads"]), spec.get("options", {}),
        spec.get("global_tokens", 0),
        batch=batch, module=flops_module, dense_fallback=bool(getattr(layer, "dense_fallback", False)),
    )
    factor = 1 if mode == "fwd" else 3  # backward ~ 2x forward
    return {
        **spec,
        "time_ms": statistics.median(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        **memory,
        "flops": flops["total"] * factor,
        "pairs": flops["pairs"],
        "note": note,
        "backend": backend,
        "other_cpus": others,
        "threads_used": torch.get_num_threads(),
        "torch": torch.__version__,
        "error": None,
    }


def main(argv: list[str] | None = None) -> int:
    return point_main(run_point, "longrange.bench.point", argv)


if __name__ == "__main__":
    raise SystemExit(main())
