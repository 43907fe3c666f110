"""The root `longrange` app: the command groups, `list` and `convert`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli import analysis, apps
from longrange.cli.advise import advise
from longrange.cli.bench import bench_app
from longrange.cli.generate import generate
from longrange.cli.lm import lm_app
from longrange.cli.lra import lra_app
from longrange.cli.options import fail, key_values
from longrange.core.version import __version__

app = typer.Typer(help="longrange: attention that scales to long sequences.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
Opt = typer.Option


def _version(value: bool) -> None:
    if value:
        typer.echo(f"longrange {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, Opt("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """longrange: attention that scales to long sequences."""


app.add_typer(bench_app, name="bench")
app.add_typer(lm_app, name="lm")
app.add_typer(lra_app, name="lra")
app.add_typer(apps.apps_app, name="apps")
app.command()(apps.pretrain)
app.command()(apps.finetune)
app.command()(analysis.flops)
app.command()(analysis.pattern)
app.command()(advise)
app.command()(generate)


@app.command("list")
def list_() -> None:
    """Registered attentions with their options and defaults, what each takes, and the bench peers."""
    from longrange.measure import make_console

    print_catalog(make_console())


def print_catalog(console) -> None:
    """`longrange list`: registered attentions with their config fields and defaults, then the peers."""
    from rich.table import Table

    from longrange.bench.specs import PEERS, mechanism_options, peer_missing
    from longrange.core.config import AttentionConfig
    from longrange.mechanisms import ATTENTIONS, backends, list_attentions

    shared = {f.name: f.default for f in dataclasses.fields(AttentionConfig)}  # what every mechanism takes
    common = ", ".join(f"{k}={v!r}" for k, v in shared.items())
    t = Table(title="registered attentions: build_attention(name, **fields)", title_justify="left",
              caption=f"every attention also takes {common}", caption_justify="left")
    t.add_column("name")
    t.add_column("config fields (defaults)", overflow="fold")
    t.add_column("takes", overflow="fold")
    t.add_column("backends", overflow="fold")
    t.add_column("bench sets", overflow="fold")
    for name in list_attentions():
        config_cls, module_cls = ATTENTIONS.get(name)
        fields = ", ".join(f"{k}={v!r}" for k, v in config_cls.option_defaults().items() if k not in shared) or "-"
        caps = module_cls.capabilities
        dropout = ["attention dropout"] if module_cls.applies_attention_dropout else []
        takes = ", ".join((["causal"] if caps.causal else []) + dropout + list(caps.inputs)) or "-"
        preset = ", ".join(f"{k}={v!r}" for k, v in mechanism_options(name).items()) or "-"
        runs_on = " / ".join(backends(name)) + " (backend=auto chooses)" if backends(name) else "its own kernel"
        t.add_row(name, fields, takes, runs_on, preset)
    console.print(t)
    p = Table(title="bench peers (same harness, other libraries)", title_justify="left")
    p.add_column("name")
    p.add_column("same pattern as")
    p.add_column("bench sets", overflow="fold")
    p.add_column("status", overflow="fold")
    for name, (_, base) in PEERS.items():
        preset = ", ".join(f"{k}={v!r}" for k, v in mechanism_options(name).items()) or "-"
        p.add_row(name, base, preset, peer_missing(name) or "available")
    console.print(p)


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
    from longrange.hf.convert import convert_to_long

    options = key_values(opt, attention=attention)
    try:
        model = convert_to_long(src, attention=attention, max_length=max_length, output_dir=dst,
                                overwrite=overwrite, **options)
    except (OSError, TypeError, ValueError) as e:  # ConversionError is a ValueError
        fail(str(e), code=1)
    c = model.config
    typer.echo(f"wrote {dst}: {c.layers} layers, dim {c.dim}, attention {c.attention} {c.attention_options}, "
               f"max_length {c.max_length}")
