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
) -> None:
    """Time and peak memory of one attention layer against sequence length, each point in a fresh process."""
    if ctx.invoked_subcommand is not None:  # `longrange bench report ...`
        return
    from longrange.bench import make_settings, run_bench

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
