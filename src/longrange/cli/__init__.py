"""The `longrange` command line: argument parsing that calls into the package, nothing more.

    longrange bench | bench report | list | flops | pattern | convert | lm train | lm stream | lra ...

One module per group of commands; `options` turns the library's errors into flag messages.
`python -m longrange.cli` (e.g. under torchrun) runs the same app.
"""

from longrange.cli.app import app

__all__ = ["app"]
