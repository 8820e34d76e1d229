"""`surgery inspect` without Typer: the command's body, and a reader for its plain command lines.

Importing Typer and building a command with it take about 40 ms here, as long as the
interpreter's own start and more than inspecting a 400-tensor checkpoint. So `surgery.cli.run`
hands `surgery inspect ARGS` to `run_inspect` first, which reads ARGS with the records of
options.py, the ones Typer's command is built from, and accepts only what it reads exactly as
click does: known flags, each value in the next word (one not starting with `-`) or after
`--flag=`, the one PATH. Everything else (`--help`, `-fVALUE`, `--`, a mistake) goes to Typer,
which reads it as always. Either way the same `inspect_checkpoint` runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from surgery.cli.options import INSPECT, Opt
from surgery.cli.output import outcome, say, show


def inspect_checkpoint(
    path: str | Path,
    filter: list[str] | None,
    depth: int | None,
    key: str | None,
    verify: bool,
    download: bool,
    json_out: bool,
    debug: bool = False,  # read by `output.outcome`
) -> int:
    """The report on stdout; exit code 1, with the blocking finding on stderr, when the
    checkpoint is not safe to load."""
    from surgery.commands.inspect import inspect

    report = inspect(path, key=key, verify=verify, download=download, filter=filter or (), depth=depth)
    show(report, json_out)
    ckpt = report.checkpoint
    if ckpt.safe:
        return 0
    blocking = [f for f in ckpt.findings if f.severity in ("danger", "unsafe", "corrupt")]
    more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
    say(f"error: {path}: not safe to load: {blocking[0].severity}: {blocking[0].message}{more}")
    return 1


def parse(args: list[str], params: dict[str, Opt]) -> dict[str, Any] | None:
    """The values click gives `params` for the command line `args`, or None where a command
    line is not of the plain kind read here (click then reads it, and says what is wrong)."""
    by_flag = {flag: name for name, opt in params.items() for flag in opt.flags}
    values: dict[str, Any] = {name: False if opt.value is bool else None for name, opt in params.items()}
    arguments = [name for name, opt in params.items() if not opt.flags]
    given: list[str] = []
    words = iter(args)
    for word in words:
        if not word.startswith("-"):
            given.append(word)
            continue
        flag, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        name = by_flag.get(flag)
        if name is None:
            return None
        opt = params[name]
        if opt.value is bool:
            if equals:
                return None
            values[name] = True
            continue
        if not equals:
            value = next(words, None)
            if value is None or value.startswith("-"):
                return None
        if opt.value is int and not (value.isascii() and value.isdigit() and int(value) >= (opt.min or 0)):
            return None
        item = opt.value(value)
        values[name] = [*(values[name] or []), item] if opt.many else item
    if len(given) != len(arguments):
        return None
    for name, word in zip(arguments, given, strict=True):
        values[name] = params[name].value(word)
    return values


def run_inspect(args: list[str]) -> int | None:
    """`surgery inspect ARGS`: its exit code, or None when ARGS are for Typer to read."""
    if os.name == "nt" or "_SURGERY_COMPLETE" in os.environ:  # click expands globs there, or completes
        return None
    params = parse(args, INSPECT)
    if params is None:
        return None
    try:
        return outcome(inspect_checkpoint, params)
    except KeyboardInterrupt:
        return 130  # as Typer exits on Ctrl-C
    except BrokenPipeError:  # as click does when even the error could not be written: quiet, 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
