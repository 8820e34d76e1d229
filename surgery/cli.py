"""The `surgery` command: parse, call the library, render. No logic of its own.

Errors become one line on stderr, `error: <file>: <what is wrong>`, with the
exit code of the error type; a traceback only with `--debug`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery import __version__
from surgery.errors import SurgeryError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Inspect, port and operate on PyTorch checkpoints, safely.",
)

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected failure.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],  # noqa: UP045 - typer needs Optional at runtime on 3.9-
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Inspect, port and operate on PyTorch checkpoints, safely."""


def _fail(error: SurgeryError) -> typer.Exit:
    for finding in error.findings:
        typer.echo(f"  {finding}", err=True)
    typer.echo(f"error: {error.where}: {error.message}", err=True)
    if error.hint:
        typer.echo(f"hint: {error.hint}", err=True)
    return typer.Exit(error.exit_code)


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one stderr line and an exit code."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SurgeryError as error:
            if kwargs.get("debug"):
                raise
            raise _fail(error) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:  # a bug: still no traceback unless asked
            if kwargs.get("debug"):
                raise
            where = kwargs.get("path", "surgery")
            typer.echo(f"error: {where}: internal error: {type(error).__name__}: {error}", err=True)
            typer.echo("hint: rerun with --debug for the traceback, and report it", err=True)
            raise typer.Exit(3) from None

    return wrapper


def _use_rich() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


@app.command()
@handles_errors
def inspect(
    path: Annotated[
        Path,
        typer.Argument(help="Checkpoint file, *.index.json, or a folder holding one.", show_default=False),
    ],
    filter: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--filter",
            "-f",
            help="Only tensors matching this glob (repeatable); `layer1` selects the module.",
        ),
    ] = None,
    depth: Annotated[
        Optional[int], typer.Option("--depth", "-d", min=0, help="Fold modules deeper than N levels.")
    ] = None,  # noqa: UP045
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--key",
            "-k",
            help="Where the state_dict sits, dotted (`model_ema`), instead of the automatic choice.",
        ),
    ] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Also read all data to check zip CRCs.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What is inside a checkpoint: containers, tensors, sizes, safety. Reads no tensor data.

    Exit code 1 when the pickle references anything beyond tensors and plain
    containers (or the file is damaged), so scripts notice; 2 on bad usage.
    """
    from surgery import report
    from surgery.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path, key=key, verify=verify)
    globs = filter or []
    if json_out:
        typer.echo(report.dumps(report.inspect_json(ckpt, globs)))
    else:
        view = report.inspect_view(ckpt, globs, depth)
        safety = report.safety_line(ckpt)
        if _use_rich():
            from rich.console import Console

            report.render_rich(view, safety, Console())
        else:
            sys.stdout.write(report.render_plain(view, safety))
    if not ckpt.safe:
        sys.stdout.flush()  # the report first, then the verdict, in pipes too
        blocking = [f for f in ckpt.findings if f.severity in ("danger", "unsafe", "corrupt")]
        more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
        typer.echo(
            f"error: {path}: not safe to load: {blocking[0].severity}: {blocking[0].message}{more}", err=True
        )
        raise typer.Exit(1)


def run() -> None:
    """Console-script entry point."""
    app(prog_name="surgery")
