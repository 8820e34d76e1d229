"""The Typer app: the group (--version), each command with its error handling and --help examples."""

# No `from __future__ import annotations` here or in commands.py: Typer reads the commands'
# annotations at every start, and string annotations would be evaluated one by one.
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, Optional

import typer

from surgery import __version__
from surgery.cli.output import outcome

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


def handles_errors(command: Callable[..., int | None]) -> Callable[..., None]:
    """Run a command as `output.outcome` does (library errors as one stderr line), its exit code
    raised as `typer.Exit`: commands return their exit code rather than raise it."""

    @wraps(command)
    def wrapper(**params: Any) -> None:
        code = outcome(command, params)
        if code:
            raise typer.Exit(code)

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
