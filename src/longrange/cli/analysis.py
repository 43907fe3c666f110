"""`longrange flops` (analytic MACs per layer or model) and `longrange pattern` (an attention graph's
picture and statistics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import flag_errors, key_values, scoped_key_values
from longrange.core.config import ConfigError, parse_lengths, parse_names

Opt = typer.Option



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
    import csv

    from longrange.analysis.flops import counters_table, flop_report, flops_table, plot_macs
    from longrange.measure import make_console

    with flag_errors({"format": "--format"}):
        if format not in ("table", "json", "csv"):
            raise ConfigError(f"format must be table, json or csv, got {format!r}", "format")
        result, rows = flop_report(
            preset=preset, mechanisms=parse_names(mechanisms, "mechanisms") if mechanisms else None,
            lengths=parse_lengths(lengths) if lengths else None, dim=dim, heads=heads, options=scoped_key_values(opt),
            output_projection=output_projection, ffn_dim=ffn_dim, compare=compare, memory=memory, model=model)
    if plot is not None:
        plot_macs(rows, plot)
    if format == "json":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif format == "csv":
        fields = [k for k in result["rows"][0] if k != "options"]
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(result["rows"])
    else:
        console = make_console()
        console.print(flops_table(rows))
        if "counters" in result:
            console.print(counters_table(result["counters"]))
        console.print("attention products = scores + weighted + other: the products between activations that "
                      "an nn.Linear hook counter does not see; 1 MAC = 2 FLOPs")



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
    from longrange.analysis.graph import build_target, graph_stats, stats_table
    from longrange.analysis.pictures import draw_pattern

    for param, value, least in (("--n", n, 1), ("--heads", heads, 1), ("--tile", tile, 1),
                                ("--global-tokens", global_tokens, 0), ("--depth", depth, 0)):
        if value is not None and value < least:
            raise typer.BadParameter(f"must be at least {least}, got {value}", param_hint=param)
    if format not in ("table", "json"):
        raise typer.BadParameter(f"must be table or json, got {format!r}", param_hint="--format")
    with flag_errors():
        target = build_target(name, key_values(opt, attention=name), heads)
    try:
        result = graph_stats(target, n, tile, depth=depth, global_tokens=global_tokens) if stats else None
        path = draw_pattern(target, n, out, tile=tile, global_tokens=global_tokens)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--global-tokens" if "global" in str(e) else "--opt") from None
    if format == "json":
        print(json.dumps({**(result.to_dict() if result else {"name": name, "n": n}), "png": str(path)}, indent=2))
        return
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=160)
    if result is not None:
        console.print(stats_table(result))
    console.print(f"wrote {path}")
