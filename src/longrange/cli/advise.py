"""`longrange advise`: rank the attention mechanisms for a length, a device, a memory budget and a job."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import flag_errors, scoped_key_values
from longrange.core.config import ConfigError, parse_lengths, parse_names

Opt = typer.Option
DEFAULT_CALIBRATION = Path("bench-results") / "calibration.json"


def advise(
    length: Annotated[str, Opt("--length", "-n", help="Sequence length, e.g. 16384 or 16k.")],
    job: Annotated[str, Opt(help="inference (forward) or training (forward + backward).")] = "inference",
    causal: Annotated[bool, Opt("--causal/--bidirectional", help="The job needs causal attention.")] = False,
    approximate: Annotated[bool, Opt("--approximate/--exact", help="Also admit mechanisms that are not exact "
                                                                  "softmax attention over a graph (low-rank, kernel, "
                                                                  "hashing, relative-position models).")] = False,
    memory: Annotated[str | None, Opt("--memory", help="Memory budget of one layer's call, e.g. 2GiB, 512MiB.")] = None,
    device: Annotated[str, Opt(help="cpu or cuda (picks the calibration's points for it).")] = "cpu",
    dtype: Annotated[str, Opt(help="fp32, bf16 or fp16.")] = "fp32",
    dim: Annotated[int, Opt(help="Hidden size.")] = 768,
    heads: Annotated[int, Opt(help="Attention heads.")] = 12,
    batch: Annotated[int, Opt(help="Batch size.")] = 1,
    mechanisms: Annotated[str | None, Opt("--mechanisms", "-m", help="Candidates, comma-separated (default: the "
                                                                    "calibrated ones, else all).")] = None,
    opt: Annotated[list[str] | None, Opt("--opt", help="MECHANISM.KEY=VALUE, repeatable.")] = None,
    calibration: Annotated[Path | None, Opt(help="calibration.json from `longrange bench` (or its folder); "
                                                "default: bench-results/calibration.json when it exists.")] = None,
    format: Annotated[str, Opt("--format", help="table or json.")] = "table",
) -> None:
    """Rank the mechanisms by predicted time and memory (analytic MACs and activation bytes, calibrated by
    this machine's `longrange bench` results), saying why each ruled-out one was ruled out."""
    from longrange.analysis.advise import advise as run

    with flag_errors({"memory_budget": "--memory", "length": "--length", "format": "--format",
                      "calibration": "--calibration"}):
        if format not in ("table", "json"):
            raise ConfigError(f"format must be table or json, got {format!r}", "format")
        lengths = parse_lengths(length, "length")
        if len(lengths) != 1:
            raise ConfigError(f"give one length, got {length!r}", "length")
        if calibration is None and DEFAULT_CALIBRATION.is_file():
            calibration = DEFAULT_CALIBRATION
        advice = run(lengths[0], job=job, causal=causal, exact=not approximate, memory_budget=memory, device=device,
                     dtype=dtype, dim=dim, heads=heads, batch=batch,
                     mechanisms=parse_names(mechanisms, "mechanisms") if mechanisms else None,
                     options=scoped_key_values(opt), calibration=calibration)
    if format == "json":
        sys.stdout.write(json.dumps(advice.to_dict(), indent=2, default=str) + "\n")
        return
    typer.echo(advice.table())
    choice = advice.choice
    typer.echo("")
    typer.echo(f"choice: {choice.mechanism} ({choice.basis})" if choice else "no mechanism qualifies")
    if advice.calibration is None:
        typer.echo("uncalibrated: run `longrange bench --out bench-results -m ... -n ...` on this machine first")
