"""What every `longrange` command shares: parsing KEY=VALUE options, and turning the library's
`ConfigError` (which names an option as the library spells it) into a usage error naming the flag."""

from __future__ import annotations

import contextlib
from typing import Any

import typer

from longrange.core.config import ConfigError, parse_key_values, parse_scoped_key_values

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


def key_values(items: list[str] | None, option: str = "options", example: str = "window=512") -> dict[str, Any]:
    """Repeated `--opt KEY=VALUE` as a dict; a malformed one is a usage error naming the flag."""
    with flag_errors():
        return parse_key_values(items, option, example)


def scoped_key_values(items: list[str] | None, option: str = "options") -> dict[str, dict[str, Any]]:
    """Repeated `--opt MECHANISM.KEY=VALUE` as {mechanism: {key: value}}."""
    with flag_errors():
        return parse_scoped_key_values(items, option)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit with `code` (a runtime fault: no usage text)."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)
