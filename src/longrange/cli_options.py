"""Command-line options shared by the `longrange` sub-commands (`longrange.cli`, `lm`, `lra`)."""

from __future__ import annotations

import typer


def key_values(items: list[str] | None, param: str = "--opt", example: str = "window=512") -> dict:
    """Repeated KEY=VALUE options as a dict; a malformed one is a usage error naming `param`."""
    from longrange.core.config import OptionError, parse_key_values

    try:
        return parse_key_values(items, param, example)
    except OptionError as e:
        raise typer.BadParameter(str(e), param_hint=e.param) from None
