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


@app.command()
def bench(
    preset: Annotated[str, Opt(help="quick (about a minute on 2 cores) or targets (the issue's sweep).")] = "quick",
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


@app.command("list")
def list_() -> None:
    """Registered attentions with their config fields and defaults, and the bench peers."""
    from longrange.bench.report import make_console, print_catalog

    print_catalog(make_console())


if __name__ == "__main__":
    app()
