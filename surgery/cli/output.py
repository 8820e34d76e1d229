"""The one way a report reaches stdout: JSON, plain text for pipes, or rich on a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer


def use_rich() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def show(report: Any, json_out: bool) -> None:
    """`--json`: the report's JSON document alone on stdout; else its page, drawn."""
    if json_out:
        from surgery.render.json import dumps

        typer.echo(dumps(report.to_json()))
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


@contextmanager
def progress(*, enabled: bool) -> Iterator[Callable[[int, int], Callable[[int], None]] | None]:
    """A rich progress bar (bytes, rate, time left) on stderr when it is a terminal."""
    if not enabled:
        yield None
        return
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
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:

        def start(tensors: int, total: int) -> Callable[[int], None]:
            task = bar.add_task(f"{tensors} tensors", total=total)
            return lambda done: bar.advance(task, done)

        yield start
