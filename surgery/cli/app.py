"""The Typer app, its entry point, and the one way errors reach the terminal.

Errors become one line on stderr, `error: <file>: <what is wrong>`, with the exit
code of the error type; a library parameter at fault is shown as the flag it came
from (`strip_prefix` -> `--strip-prefix`); a traceback only with `--debug`.
"""

# No `from __future__ import annotations` here or in commands.py: Typer reads the commands'
# annotations at every start, and string annotations would be evaluated one by one.
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, Optional

import typer

from surgery import __version__
from surgery.errors import BadArgument, SurgeryError

SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "no_args_is_help": True,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,  # click's plain help: no rich import for --help (start-up)
    "help": "Inspect, port and operate on PyTorch checkpoints, safely.",
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


def main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Inspect, port and operate on PyTorch checkpoints, safely."""


def say(line: str) -> None:
    """One line on stderr, names from files escaped (`text.printable`)."""
    from surgery.text import printable

    typer.echo(printable(line), err=True)


def flag_of(param: str) -> str:
    """The flag or argument of the running command that sets a library parameter."""
    import click

    ctx = click.get_current_context(silent=True)
    for p in ctx.command.params if ctx is not None else ():
        if p.name == param:
            longs = [o for o in p.opts if o.startswith("--")]
            return longs[0] if longs else (p.human_readable_name or param).upper()
    return "--" + param.replace("_", "-")


def fail(error: SurgeryError) -> typer.Exit:
    for finding in error.findings:
        say(f"  {finding}")
    where = flag_of(error.param) if isinstance(error, BadArgument) else error.where
    say(f"error: {where}: {error.message}")
    if error.hint:
        say(f"hint: {error.hint}")
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
            raise fail(error) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:  # a bug: still no traceback unless asked
            if kwargs.get("debug"):
                raise
            named = [kwargs.get(k) for k in ("path", "source", "a", "b")]
            named += list(kwargs.get("paths") or [])
            where = ", ".join(str(v) for v in named if v) or "surgery"
            say(f"error: {where}: internal error: {type(error).__name__}: {error}")
            say("hint: rerun with --debug for the traceback, and report it")
            raise typer.Exit(3) from None

    return wrapper


def new_app() -> typer.Typer:
    """A Typer app with the group's options (--version) and no commands yet."""
    fresh = typer.Typer(**SETTINGS)
    fresh.callback()(main)
    return fresh


app = new_app()  # every command, registered by commands.py
COMMANDS: dict[str, tuple[Callable[..., Any], str]] = {}  # name -> (wrapped function, epilog)


def command(examples: list[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command with its error handling and 2-3 real command lines shown in --help."""
    epilog = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples)

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        wrapped = handles_errors(function)
        COMMANDS[function.__name__.replace("_", "-")] = (wrapped, epilog)
        return app.command(epilog=epilog)(wrapped)

    return register


def app_for(args: list[str]) -> typer.Typer:
    """The app that runs `surgery ARGS`: the named command alone when the first argument names one.

    Typer turns every registered command's signature into click options at each start
    (about 1 ms per command, port's 40 options more), so a command run pays only for its
    own; the group and the command behave the same either way. Anything else (no command,
    --help, --version, a typo) gets the whole app.
    """
    if not args or args[0] not in COMMANDS:
        return app
    function, epilog = COMMANDS[args[0]]
    alone = new_app()
    alone.command(epilog=epilog)(function)
    return alone


def run() -> None:
    """Console-script entry point."""
    app_for(sys.argv[1:])(prog_name="surgery")
