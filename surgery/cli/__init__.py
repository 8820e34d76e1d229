"""The `surgery` command: parse flags into a request, call the library, render the report.

typer_app.py the Typer app: the group, each command with its error handling and --help examples
options.py   every option declared once; flags -> request fields
output.py    the one output path: JSON, plain text, or rich on a terminal; errors as one line
commands.py  inspect, port, convert, merge, diff, scan, sanitize
fast.py      a plain `surgery inspect` run without importing Typer (start-up)

Importing this package imports no Typer: `app` (every command) is made on first use.
"""

from __future__ import annotations

import sys
from typing import Any


def run() -> None:
    """Console-script entry point: a plain `surgery inspect` without Typer, anything else with it."""
    args = sys.argv[1:]
    if args[:1] == ["inspect"]:
        from surgery.cli.fast import run_inspect

        code = run_inspect(args[1:])
        if code is not None:
            sys.exit(code)
    from surgery.cli import commands  # noqa: F401 - registers the commands
    from surgery.cli.typer_app import app_for

    app_for(args)(prog_name="surgery")


def __getattr__(name: str) -> Any:
    """`app`: the Typer app with every command, for tests and embedding (`CliRunner().invoke(app, ...)`)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from surgery.cli import commands  # noqa: F401 - registers the commands
    from surgery.cli.typer_app import app

    return app


__all__ = ["app", "run"]
