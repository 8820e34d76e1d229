"""The `surgery` command: parse flags into a request, call the library, render the report.

app.py       the Typer app, errors as one line and an exit code, --help examples
options.py   every option declared once; flags -> request fields
output.py    the one output path: JSON, plain text, or rich on a terminal
commands.py  inspect, port, convert, diff, scan, sanitize
"""

from surgery.cli import commands as _commands  # noqa: F401 - registers the commands on the app
from surgery.cli.app import app, run

__all__ = ["app", "run"]
