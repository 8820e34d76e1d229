"""The one way a report or an error reaches the terminal: JSON, plain text for pipes, or
rich on a terminal; errors as one line on stderr and an exit code.

Errors become one line on stderr, `error: <file>: <what is wrong>`, with the exit code of
the error type; a library parameter at fault is shown as the flag it came from
(`strip_prefix` -> `--strip-prefix`); a traceback only with `--debug`. Nothing here imports
Typer: a plain `surgery inspect` runs without it (`cli.fast`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from surgery.errors import BadArgument, SurgeryError


def use_rich() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def echo(text: str, *, err: bool = False) -> None:
    """One line on stdout (or stderr), flushed: what `typer.echo` writes for the text here."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def say(line: str) -> None:
    """One line on stderr, names from files escaped (`text.printable`)."""
    from surgery.text import printable

    echo(printable(line), err=True)


def show(report: Any, json_out: bool) -> None:
    """`--json`: the report's JSON document alone on stdout; else its page, drawn."""
    if json_out:
        from surgery.render.json import dumps

        echo(dumps(report.to_json()))
        return
    from surgery.render import rows
    from surgery.render.reports import page_of

    page = page_of(report)
    if use_rich():
        from rich.console import Console

        rows.rich(page, Console())
    else:
        sys.stdout.write(rows.plain(page))
    sys.stdout.flush()  # the report first, then any verdict on stderr, in pipes too


def flag_of(param: str) -> str:
    """The flag or argument of the running command that sets a library parameter."""
    from surgery.cli.options import FIELD_OF

    names = {param} | {flag for flag, field in FIELD_OF.items() if field == param}  # --arg sets args
    ctx = _click_context()
    for p in ctx.command.params if ctx is not None else ():
        if p.name in names:
            longs = [o for o in p.opts if o.startswith("--")]
            return longs[0] if longs else (p.human_readable_name or param).upper()
    return "--" + param.replace("_", "-")


def _click_context() -> Any:
    """The running command's click context: Typer 0.28 runs its own copy of click, older
    Typers the click package; the fast path runs none (its flags are the records' own)."""
    import importlib
    import sys

    for name in ("typer._click.globals", "click"):
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:
            continue
        ctx = module.get_current_context(silent=True)
        if ctx is not None:
            return ctx
    return None


def failed(error: SurgeryError) -> int:
    """Say what went wrong (findings seen on the way, the error, a hint); its exit code."""
    for finding in error.findings:
        say(f"  {finding}")
    where = flag_of(error.param) if isinstance(error, BadArgument) else error.where
    say(f"error: {where}: {error.message}")
    if error.hint:
        say(f"hint: {error.hint}")
    return error.exit_code


def outcome(command: Callable[..., int | None], params: dict[str, Any]) -> int:
    """Run a command with its parameters: its exit code. A library error is said in one line
    (`failed`), anything else is a bug, said as one too (3); with `debug`, both are raised.
    On a terminal (and without --json) its work shows on one progress bar (`Bar`)."""
    try:
        if params.get("json_out") or not sys.stderr.isatty():
            return command(**params) or 0
        from surgery.formats.download import showing

        with Bar() as bar, showing(bar.download):
            token = _bar.set(bar)
            try:
                return command(**params) or 0
            finally:
                _bar.reset(token)
    except SurgeryError as error:
        if params.get("debug"):
            raise
        return failed(error)
    except BrokenPipeError:  # the reader went away (`surgery inspect x | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail
        return 141  # 128 + SIGPIPE, as `git log | head` ends
    except Exception as error:  # a bug: still no traceback unless asked
        if params.get("debug"):
            raise
        named = [params.get(k) for k in ("path", "source", "a", "b")]
        named += list(params.get("paths") or [])
        where = ", ".join(str(v) for v in named if v) or "surgery"
        say(f"error: {where}: internal error: {type(error).__name__}: {error}")
        say("hint: rerun with --debug for the traceback, and report it")
        return 3


class Bar:
    """A command's one progress display on stderr: drawn once work first says how much it has
    (a download's file, the tensors a command writes), a row for each, gone when it ends."""

    def __init__(self) -> None:
        self._progress: Any = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, description: str, total: int) -> Callable[[int], None]:
        """A row for `total` bytes of work: what hears each n bytes done."""
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            self._progress = Progress(*columns, transient=True, console=Console(stderr=True))
            self._progress.start()
        progress, task = self._progress, self._progress.add_task(description, total=total)
        return lambda done: progress.advance(task, done)

    def tensors(self, tensors: int, total: int) -> Callable[[int], None]:
        """The `progress` callback of convert, merge and extract."""
        return self.add(f"{tensors} tensors", total)

    def download(self, name: str, total: int) -> Callable[[int], None]:
        """What `formats.download.showing` hears."""
        return self.add(f"downloading {name}", total)


_bar: ContextVar[Bar | None] = ContextVar("surgery_cli_bar", default=None)


def progress() -> Callable[[int, int], Callable[[int], None]] | None:
    """The running command's bar as a library `progress` callback; None when nothing is drawn
    (not a terminal, or --json)."""
    bar = _bar.get()
    return bar.tensors if bar is not None else None
