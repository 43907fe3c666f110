"""`longrange bench` (the scaling benchmark) and `longrange bench report` (one document of results)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import fail, flag_errors, scoped_key_values

Opt = typer.Option
bench_app = typer.Typer(help="Scaling benchmark: time and peak memory against length; `bench report` for a document.",
                        invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False)


@bench_app.callback()
def bench(
    ctx: typer.Context,
    preset: Annotated[str, Opt(help="quick (about a minute on 2 cores), targets (the sparse family against HF), "
                                    "lowrank (the low-rank/kernel/hashing family against lucidrains') or all "
                                    "(every mechanism and installed peer).")] = "quick",
    mechanisms: Annotated[str | None, Opt(
        "--mechanisms", "-m", help="Comma-separated, e.g. full,bigbird,hf-bigbird (see `longrange list`).")] = None,
    lengths: Annotated[str | None, Opt("--lengths", "-n", help="Comma-separated lengths, e.g. 1024,2048,4k.")] = None,
    mode: Annotated[str | None, Opt(help="fwd, fwdbwd or both (default: the preset's).")] = None,
    opt: Annotated[list[str] | None, Opt(
        "--opt", help="MECHANISM.KEY=VALUE, repeatable, e.g. --opt bigbird.block_size=128")] = None,
    backend: Annotated[str | None, Opt(help="engine, flex and/or auto, comma-separated: each mechanism on a block "
                                            "layout runs once per backend (as name@backend); default: the "
                                            "config's backend, auto.")] = None,
    dim: Annotated[int, Opt(help="Hidden size (BERT-base: 768).")] = 768,
    heads: Annotated[int, Opt(help="Attention heads.")] = 12,
    batch: Annotated[int, Opt(help="Batch size.")] = 1,
    dtype: Annotated[str, Opt(help="fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str, Opt(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, Opt(help="torch.set_num_threads in every point.")] = 2,
    repeats: Annotated[int | None, Opt(help="Timed runs per point, median reported (default: the preset's).")] = None,
    warmup: Annotated[int, Opt(help="Untimed runs before timing.")] = 1,
    global_tokens: Annotated[int, Opt(help="Global tokens (the first g) for mechanisms whose graph has them "
                                           "(longformer, etc, hf-longformer).")] = 1,
    baseline: Annotated[str, Opt(help="Mechanism the ratios are taken against ('none': no ratios).")] = "full",
    out: Annotated[Path, Opt(help="Directory for results.json, results.csv, slopes.csv, scaling.png.")] = Path(
        "bench-results"),
    resume: Annotated[bool, Opt(help="Re-use finished points from OUT/results.json.")] = False,
    timeout: Annotated[float, Opt(help="Seconds allowed per point.")] = 3600.0,
    plot: Annotated[bool, Opt(help="Write scaling.png.")] = True,
    keep_going: Annotated[bool, Opt("--keep-going", help="Run past failed points (errors, timeouts) and exit 0; "
                                                         "without it the first failed point stops the sweep and "
                                                         "the command exits 1.")] = False,
    include_busy: Annotated[bool, Opt("--include-busy", help="Fit slopes over points measured while other "
                                                             "processes kept the CPUs busy too (marked either "
                                                             "way).")] = False,
    nproc: Annotated[int | None, Opt(help="Shard each point's sequence over this many gloo ranks (context "
                                          "parallelism): time, memory and bytes sent per rank, beside one "
                                          "process; writes sharded.json and sharded.csv.")] = None,
    rank_threads: Annotated[int | None, Opt(help="With --nproc: torch threads per rank (default: --threads "
                                                 "shared out, at least 1).")] = None,
    cp_fallback: Annotated[str, Opt(help="With --nproc: none (a mechanism without a sharded form is refused) or "
                                         "gather (it runs on the gathered sequence, O(N) memory per rank).")] = "none",
    reference: Annotated[str, Opt(help="With --nproc: the one-process point to compare with: auto (at n, or at "
                                       "n/P where n fails), n, shard (n/P) or none.")] = "auto",
) -> None:
    """Time and peak memory of one attention layer against sequence length, each point in a fresh process."""
    if ctx.invoked_subcommand is not None:  # `longrange bench report ...`
        return
    from longrange.bench import make_settings, run_bench

    if nproc is not None:
        _sharded(nproc, rank_threads, cp_fallback, reference, preset=preset, mechanisms=mechanisms, lengths=lengths,
                 mode=mode, options=scoped_key_values(opt), backend=backend, dim=dim, heads=heads, batch=batch,
                 dtype=dtype, device=device, threads=threads, repeats=repeats, warmup=warmup,
                 global_tokens=global_tokens, baseline=baseline, out=out, resume=resume, timeout=timeout, plot=plot,
                 keep_going=keep_going, include_busy=include_busy)
        return
    with flag_errors():
        settings = make_settings(
            preset, mechanisms=mechanisms, lengths=lengths, mode=mode, options=scoped_key_values(opt), backend=backend,
            dim=dim,
            heads=heads, batch=batch, dtype=dtype, device=device, threads=threads, repeats=repeats, warmup=warmup,
            global_tokens=global_tokens, baseline=baseline, out=out, resume=resume, timeout=timeout, plot=plot,
            keep_going=keep_going, include_busy=include_busy,
        )
        result = run_bench(settings)
    failed = [p for p in result["points"] if p.get("error")]
    if failed and not keep_going:
        stopped = result["meta"].get("stopped")
        fail(f"{len(failed)} point(s) failed (first: {failed[0]['mechanism']} n={failed[0]['n']} {failed[0]['mode']}: "
             f"{failed[0]['error'][:160]})" + (f"; {stopped}" if stopped else "") + f"; results so far in {out}",
             code=1)


def _sharded(nproc: int, rank_threads: int | None, cp_fallback: str, reference: str, *, preset: str,
             **fields) -> None:
    """`longrange bench --nproc P`: the sweep sharded over P ranks (`longrange.bench.sharded`)."""
    from longrange.bench import make_settings
    from longrange.bench.sharded import make_sharded_settings, run_sharded_bench

    with flag_errors():
        settings = make_sharded_settings(make_settings(preset, **fields), nproc, rank_threads=rank_threads,
                                         fallback=cp_fallback, reference=reference)
        result = run_sharded_bench(settings, run_sharded_point)
    failed = [p for p in result["points"] if p.get("error")]
    if failed and not fields["keep_going"]:
        fail(f"{len(failed)} point(s) failed (first: {failed[0]['mechanism']} n={failed[0]['n']} {failed[0]['mode']}: "
             f"{failed[0]['error'][:160]}); results so far in {fields['out']}", code=1)


# -- the sharded bench's glue: bench/ and distributed/ are peers, only cli/ may join them --------------------
def refusal(spec: dict) -> str | None:
    """Why this point cannot run sharded, known before starting any rank (None: start them; a
    strategy may still refuse the call's options there)."""
    import torch

    from longrange.bench.specs import is_peer, ours, point_options
    from longrange.distributed import unsupported_reason
    from longrange.mechanisms import build_attention

    name = spec["mechanism"]
    if is_peer(name):
        return f"{name} is another library's layer: it runs in one process only"
    if spec.get("fallback") == "gather":
        return None
    with torch.device("meta"):  # the class and config only: no weights allocated
        attn = build_attention(ours(name), dim=spec["dim"], heads=spec["heads"],
                               **point_options(name, spec["n"], spec.get("options", {})))
    return unsupported_reason(attn)


def sharded_rank(rank: int, world: int, spec: dict) -> dict:
    """One rank of a sharded bench point (run by `launch` in each rank): the bench's layer, this
    rank's tokens, ContextParallel's call measured (`longrange.bench.sharded.measure_rank`)."""
    import torch.distributed as dist

    from longrange.bench import sharded
    from longrange.distributed import ContextParallel, ContextParallelUnsupported, ShardError, Shards, strategy_for

    layer = sharded.rank_layer(spec)
    shards = Shards.even(int(spec["n"]), world, rank)
    x = sharded.rank_input(spec, rank, shards.length)
    batch = int(spec.get("batch", 1))
    inputs = sharded.shard_global_inputs(layer, int(spec.get("global_tokens", 0)), batch, shards.lo, shards.length)
    cp = ContextParallel(fallback=spec.get("fallback"))
    strategy = strategy_for(layer)
    try:
        measured = sharded.measure_rank(sharded.sharded_step(cp, layer, x, inputs, spec["mode"]), spec, cp.comm,
                                        dist.barrier)
    except ContextParallelUnsupported as err:  # a strategy refusing this call's options
        return {"rank": rank, "refused": str(err)}
    except ShardError as err:  # the same, raised inside ContextParallel's check that every rank agrees
        if ContextParallelUnsupported.__name__ not in str(err):
            raise
        return {"rank": rank, "refused": str(err).partition(f"{ContextParallelUnsupported.__name__}: ")[2] or str(err)}
    return {"rank": rank, "lo": shards.lo, "n_local": shards.length,
            "path": "sharded" if strategy is not None else "gather fallback",
            "strategy": f"{strategy.__module__}.{strategy.__qualname__}" if strategy is not None else None,
            **measured, "kv_allgather_bytes": sharded.kv_allgather_bytes(shards.length, world, batch, x.shape[-1],
                                                                         x.element_size()),
            **sharded.planned_bytes_of(strategy, cp, layer, int(spec["n"]), batch, x.dtype)}


def run_sharded_point(spec: dict, settings) -> dict:
    """Launch the ranks of one point (`longrange.distributed.launch`); a refusal or a failure is a
    row saying so, not a raise."""
    import time

    from longrange.bench import sharded
    from longrange.distributed.launch import LaunchError, launch

    reason = refusal(spec)
    if reason is not None:
        return sharded.refused_point(spec, reason)
    t0 = time.perf_counter()
    try:
        ranks = launch(sharded_rank, settings.nproc, spec, timeout_s=settings.bench.timeout,
                       threads_per_rank=settings.threads_per_rank())
    except LaunchError as err:
        return sharded.failed_point(spec, str(err).splitlines()[0], time.perf_counter() - t0)
    return sharded.point_from_ranks(spec, ranks, time.perf_counter() - t0)


@bench_app.command("report")
def bench_report(
    results: Annotated[list[Path] | None, Opt("--results", help="Bench result folder(s) with results.json; "
                                                                 "repeatable (default: bench-results).")] = None,
    out: Annotated[Path, Opt(help="Folder for report.html, report.md and scaling.png.")] = Path("bench-report"),
    run: Annotated[bool, Opt("--run", help="First run (or finish: finished points are kept) the sweep of --preset "
                                           "into the first results folder.")] = False,
    preset: Annotated[str, Opt(help="The sweep --run runs: all (every mechanism and installed peer), quick, "
                                    "targets or lowrank.")] = "all",
    title: Annotated[str, Opt(help="The document's title.")] = "longrange scaling report",
) -> None:
    """One self-contained HTML (and Markdown + PNG) report: curves, slopes, crossovers, throughput, machine."""
    from longrange.bench import make_settings, run_bench
    from longrange.bench.document import write_report

    folders = results or [Path("bench-results")]
    with flag_errors():
        if run:
            run_bench(make_settings(preset, out=folders[0], resume=True, keep_going=True))
        paths = write_report(folders, out, title)
    typer.echo(f"wrote {paths['html']}, {paths['md']}, {paths['png']}")
