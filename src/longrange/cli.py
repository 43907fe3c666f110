"""The `longrange` command: argument parsing that calls into the package, nothing more."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="longrange: attention that scales to long sequences.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option


def _version(value: bool) -> None:
    if value:
        import longrange

        typer.echo(f"longrange {longrange.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, Opt("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """longrange: attention that scales to long sequences."""


bench_app = typer.Typer(help="Scaling benchmark: time and peak memory against length; `bench report` for a document.",
                        invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(bench_app, name="bench")

from longrange.lm_cli import lm_app  # noqa: E402

app.add_typer(lm_app, name="lm")

from longrange.lra.cli import lra_app  # noqa: E402

app.add_typer(lra_app, name="lra")


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
    dim: Annotated[int, Opt(help="Hidden size (BERT-base: 768).")] = 768,
    heads: Annotated[int, Opt(help="Attention heads.")] = 12,
    batch: Annotated[int, Opt(help="Batch size.")] = 1,
    dtype: Annotated[str, Opt(help="fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str, Opt(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, Opt(help="torch.set_num_threads in every point.")] = 2,
    repeats: Annotated[int | None, Opt(help="Timed runs per point, median reported (default: the preset's).")] = None,
    warmup: Annotated[int, Opt(help="Untimed runs before timing.")] = 1,
    global_tokens: Annotated[int, Opt(help="Global tokens (positions 0..) for longformer and hf-longformer.")] = 1,
    baseline: Annotated[str, Opt(help="Mechanism the ratios are taken against ('none': no ratios).")] = "full",
    out: Annotated[Path, Opt(help="Directory for results.json, results.csv, slopes.csv, scaling.png.")] = Path(
        "bench-results"),
    resume: Annotated[bool, Opt(help="Re-use finished points from OUT/results.json.")] = False,
    timeout: Annotated[float, Opt(help="Seconds allowed per point.")] = 3600.0,
    plot: Annotated[bool, Opt(help="Write scaling.png.")] = True,
) -> None:
    """Time and peak memory of one attention layer against sequence length, each point in a fresh process."""
    if ctx.invoked_subcommand is not None:  # `longrange bench report ...`
        return
    from longrange.bench import BenchConfigError, make_settings, run_bench

    try:
        settings = make_settings(
            preset, mechanisms=mechanisms, lengths=lengths, mode=mode, opts=opt, dim=dim, heads=heads, batch=batch,
            dtype=dtype, device=device, threads=threads, repeats=repeats, warmup=warmup,
            global_tokens=global_tokens, baseline=baseline, out=out, resume=resume, timeout=timeout, plot=plot,
        )
        run_bench(settings)
    except BenchConfigError as e:
        raise typer.BadParameter(str(e), param_hint=e.param) from None


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
    from longrange.bench import BenchConfigError, make_settings, run_bench
    from longrange.bench.document import write_report

    folders = results or [Path("bench-results")]
    try:
        if run:
            run_bench(make_settings(preset, out=folders[0], resume=True))
        paths = write_report(folders, out, title)
    except BenchConfigError as e:
        raise typer.BadParameter(str(e), param_hint=e.param) from None
    typer.echo(f"wrote {paths['html']}, {paths['md']}, {paths['png']}")


@app.command("list")
def list_() -> None:
    """Registered attentions with their config fields and defaults, and the bench peers."""
    from longrange.bench.report import make_console, print_catalog

    print_catalog(make_console())


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Local HF BERT or RoBERTa folder (config.json + weights).")],
    dst: Annotated[Path, typer.Argument(help="Output folder for the long model (written atomically).")],
    attention: Annotated[str, Opt(help="Attention of the long model (see `longrange list`).")] = "longformer",
    max_length: Annotated[int, Opt(help="Positions of the long model (at least the original's).")] = 4096,
    opt: Annotated[list[str] | None, Opt(
        "--opt", help="Attention option KEY=VALUE, repeatable, e.g. --opt window=512")] = None,
    overwrite: Annotated[bool, Opt(help="Replace DST if it exists and is not empty.")] = False,
) -> None:
    """Convert a pretrained BERT/RoBERTa into a long longrange Encoder (tile-copied positions, Q/K/V
    copied into the long attention); the tokenizer files go along with model_max_length updated."""
    from longrange.cli_options import key_values

    options = key_values(opt)
    from longrange.hf.convert import convert_to_long

    try:
        model = convert_to_long(src, attention=attention, max_length=max_length, output_dir=dst,
                                overwrite=overwrite, **options)
    except (OSError, TypeError, ValueError) as e:  # ConversionError is a ValueError
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    c = model.config
    typer.echo(f"wrote {dst}: {c.layers} layers, dim {c.dim}, attention {c.attention} {c.attention_options}, "
               f"max_length {c.max_length}")



@app.command()
def flops(
    preset: Annotated[str | None, Opt(help="bert-base-self-attention (the seed text's layer: Q/K/V, no output "
                                           "projection), bert-base-attention (every mechanism) or bert-base-layer "
                                           "(attention + feed-forward).")] = None,
    mechanisms: Annotated[str | None, Opt("--mechanisms", "-m", help="Comma-separated registered attentions.")] = None,
    lengths: Annotated[str | None, Opt("--lengths", "-n", help="Comma-separated lengths, e.g. 512,1024,4k.")] = None,
    dim: Annotated[int | None, Opt(help="Hidden size (default 768).")] = None,
    heads: Annotated[int | None, Opt(help="Attention heads (default 12).")] = None,
    opt: Annotated[list[str] | None, Opt("--opt", help="MECHANISM.KEY=VALUE, repeatable.")] = None,
    output_projection: Annotated[bool | None, Opt(
        "--output-projection/--no-output-projection", help="Count the output projection (default: the preset's, "
        "else yes).")] = None,
    ffn_dim: Annotated[int | None, Opt("--ffn-dim", help="Also count a feed-forward block C -> F -> C "
                                                         "(bert-base-layer: 3072; 0 = none).")] = None,
    format: Annotated[str, Opt("--format", help="table, json or csv.")] = "table",
    compare: Annotated[bool, Opt("--compare", help="Also run the layer through other counters: nn.Linear hooks, "
                                                 "ptflops (if installed), FlopCounterMode.")] = False,
    memory: Annotated[bool, Opt("--memory", help="Also measure the activations saved for backward (runs the "
                                               "layer once per length).")] = False,
    plot: Annotated[Path | None, Opt(help="Write a log-log PNG of MACs against length here.")] = None,
    model: Annotated[Path | None, Opt("--model", help="Count a whole model instead: a checkpoint folder (or its "
                                                     "config.json) written by save_pretrained / convert.")] = None,
) -> None:
    """Analytic MACs of one attention layer per length: projections and attention products (QKᵀ, PV, ...)."""
    from longrange.analysis.flops import flops_command
    from longrange.bench import BenchConfigError

    try:
        flops_command(preset=preset, mechanisms=mechanisms, lengths=lengths, dim=dim, heads=heads, opt=opt,
                      output_projection=output_projection, ffn_dim=ffn_dim, format=format, compare=compare,
                      memory=memory, plot=plot, model=model)
    except BenchConfigError as e:
        raise typer.BadParameter(str(e), param_hint=e.param) from None


@app.command()
def pattern(
    name: Annotated[str, typer.Argument(help="A registered mechanism (see `longrange list`) or a named pattern: "
                                             "window, window_global, causal, strided, fixed, segments.")],
    n: Annotated[int, Opt("--n", "-n", help="Sequence length.")] = 4096,
    opt: Annotated[list[str] | None, Opt("--opt", help=(
        "KEY=VALUE, repeatable: a mechanism's config field (e.g. --opt window=512) or a named pattern's knob: "
        "window radius=256 causal=false; window_global radius=256 global_tokens=1; strided stride=128 causal=true; "
        "fixed stride=128 c=32 causal=true; segments length=256."))] = None,
    heads: Annotated[int, Opt(help="Heads of a mechanism (built with dim = 16·heads).")] = 4,
    tile: Annotated[int | None, Opt(help="Layout tile in tokens (default: the mechanism's, or 64).")] = None,
    global_tokens: Annotated[int, Opt(help="Global tokens at positions 0.. (longformer, bigbird: global_mask).")] = 0,
    out: Annotated[Path, Opt(help="PNG to write.")] = Path("pattern.png"),
    stats: Annotated[bool, Opt("--stats/--no-stats", help="Compute and print the graph statistics.")] = True,
    depth: Annotated[int | None, Opt(help="Layers: also report reach and connectivity within this depth.")] = None,
    format: Annotated[str, Opt("--format", help="table or json.")] = "table",
) -> None:
    """Draw an attention graph as a PNG and print its graph statistics (edges, degrees, hops).

    PNG: query rows, key columns, one panel per head where heads differ (at most 8).

    Hops: layers for information to travel between any two tokens (2 with global tokens, ~n/r for a window).

    Radius: the fewest layers after which some token has heard every token. Reachable: pairs connected at all.
    """
    from longrange.analysis.graph import TargetError, pattern_command

    try:
        pattern_command(name, n=n, opt=opt, heads=heads, tile=tile, global_tokens=global_tokens,
                        out=out, stats=stats, depth=depth, fmt=format)
    except TargetError as e:
        raise typer.BadParameter(str(e), param_hint=e.param) from None


if __name__ == "__main__":
    app()
