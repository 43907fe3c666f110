"""What every `longrange` command shares: parsing KEY=VALUE options, and turning the library's
`ConfigError` (which names an option as the library spells it) into a usage error naming the flag."""

from __future__ import annotations

import contextlib
from typing import Any

import typer

from longrange.core.config import ConfigError, bools_from_text, parse_key_values, parse_scoped_key_values

#: library option -> command-line flag, where the flag is not simply `--` + the option with dashes
FLAGS = {"options": "--opt", "data_options": "--data-opt", "attentions": "--attention", "name": "NAME",
         "output_dir": "OUT", "n": "--n"}


def flag(option: str | None, flags: dict[str, str] | None = None) -> str | None:
    """The flag of a library option: `flags` (the command's own), then FLAGS, then `--option-name`."""
    if option is None:
        return None
    return (flags or {}).get(option) or FLAGS.get(option) or "--" + option.replace("_", "-")


@contextlib.contextmanager
def flag_errors(flags: dict[str, str] | None = None):
    """Inside: a ConfigError becomes a typer usage error naming the command-line flag."""
    try:
        yield
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint=flag(e.option, flags)) from None


def key_values(items: list[str] | None, option: str = "options", example: str = "window=512",
               attention: str | None = None) -> dict[str, Any]:
    """Repeated `--opt KEY=VALUE` as a dict; a malformed one is a usage error naming the flag.
    attention: the mechanism the options are for; its bool fields take true/false/1/0 in any case
    (`--opt causal=False`), anything else is a usage error naming the key."""
    with flag_errors():
        return attention_bools(attention, parse_key_values(items, option, example), option)


def scoped_key_values(items: list[str] | None, option: str = "options") -> dict[str, dict[str, Any]]:
    """Repeated `--opt MECHANISM.KEY=VALUE` as {mechanism: {key: value}} (bool fields as in key_values)."""
    with flag_errors():
        scoped = parse_scoped_key_values(items, option)
        return {name: attention_bools(name, options, option) for name, options in scoped.items()}


def attention_bools(name: str | None, options: dict[str, Any], option: str = "options") -> dict[str, Any]:
    """`options` with the bool fields of mechanism (or bench peer) `name` read from their command-line
    spelling; unchanged when `name` is not a known mechanism (the library names that error later)."""
    config = _config_class(name)
    return options if config is None else bools_from_text(config, options, option)


def _config_class(name: str | None):
    from longrange.bench.specs import PEERS
    from longrange.mechanisms import config_class, list_attentions

    name = PEERS[name][1] if name in PEERS else name
    return config_class(name) if name in list_attentions() else None


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit with `code` (a runtime fault: no usage text)."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def training_stops(main: bool = True, resume: str | None = None, checkpoint: str | None = None):
    """How every training command ends early: Ctrl-C (`TrainingInterrupted`, raised after the loop
    saved a checkpoint) prints where it is and the command that continues it, exit 130; a diverged
    run (`NonFiniteLoss`) one line, exit 1. main: this process prints (torchrun: rank 0);
    resume / checkpoint: override what the loop reported."""
    from longrange.models.training import NonFiniteLoss, TrainingInterrupted

    try:
        yield
    except TrainingInterrupted as stop:
        if main:
            typer.echo(f"interrupted at step {stop.step} of {stop.total}; checkpoint saved in "
                       f"{checkpoint or stop.checkpoint}; continue with: {resume or stop.resume}", err=True)
        raise typer.Exit(130) from None
    except NonFiniteLoss as e:
        fail(str(e), code=1)
