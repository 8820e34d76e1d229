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
            where = kwargs.get("path") or kwargs.get("source") or "surgery"
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


def _strictness(value: str, no_strict: bool) -> bool:
    if no_strict:
        return False
    truth = {
        "true": True,
        "yes": True,
        "1": True,
        "on": True,
        "false": False,
        "no": False,
        "0": False,
        "off": False,
    }
    if value.lower() not in truth:
        from surgery.errors import UsageError

        raise UsageError("--strict", f"{value!r} is not true or false")
    return truth[value.lower()]


@app.command()
@handles_errors
def port(
    source: Annotated[
        Path, typer.Argument(help="The checkpoint to port (any format inspect reads).", show_default=False)
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="torchvision:NAME, timm:NAME, package.module:callable (with ?k=v&...), or a checkpoint as template.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output file: .safetensors, or a torch file.")
    ] = None,  # noqa: UP045
    arg: Annotated[
        Optional[list[str]], typer.Option("--arg", help="Target keyword argument NAME=VALUE (repeatable).")
    ] = None,  # noqa: UP045
    strict: Annotated[
        str,
        typer.Option(
            "--strict", help="true: refuse unless every key matches (as torch); false: load what matches."
        ),
    ] = "true",
    no_strict: Annotated[bool, typer.Option("--no-strict", help="The same as --strict false.")] = False,
    match: Annotated[str, typer.Option("--match", help="exact, suffix, order or auto.")] = "exact",
    rename: Annotated[
        Optional[list[str]],
        typer.Option("--rename", help="REGEX=REPL applied to every key, in order (repeatable)."),
    ] = None,  # noqa: UP045
    strip_prefix: Annotated[
        Optional[list[str]],
        typer.Option("--strip-prefix", help="Remove this prefix from source keys (repeatable)."),
    ] = None,  # noqa: UP045
    add_prefix: Annotated[
        Optional[str], typer.Option("--add-prefix", help="Add this prefix to every source key.")
    ] = None,  # noqa: UP045
    include: Annotated[
        Optional[list[str]],
        typer.Option("--include", help="Only source keys matching this glob (repeatable)."),
    ] = None,  # noqa: UP045
    exclude: Annotated[
        Optional[list[str]],
        typer.Option("--exclude", help="Leave out source keys matching this glob (repeatable)."),
    ] = None,  # noqa: UP045
    reshape: Annotated[
        bool,
        typer.Option("--reshape", help="Load pairs of equal size but different shape (Linear <-> 1x1 conv)."),
    ] = False,
    key: Annotated[
        Optional[str], typer.Option("--key", "-k", help="Where the source's state_dict sits, dotted.")
    ] = None,  # noqa: UP045
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; write nothing.")] = False,
    plan_out: Annotated[
        Optional[Path], typer.Option("--plan-out", help="Save the final mapping as an editable JSON file.")
    ] = None,  # noqa: UP045
    plan: Annotated[
        Optional[Path], typer.Option("--plan", help="Apply a saved (reviewed) mapping instead of matching.")
    ] = None,  # noqa: UP045
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-read OUT and check every tensor bit for bit.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    trust: Annotated[
        bool, typer.Option("--trust", help="Port from a file whose pickle references code (still never run).")
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Map, filter and match a checkpoint's keys into a target architecture; report; save.

    Exit code 1 when a strict port finds anything missing, unexpected or mismatched
    (the report is printed, nothing is written); 2 on bad usage.
    """
    from surgery import report as render
    from surgery.errors import UsageError
    from surgery.porting import PortFailed, make_options, port_checkpoint, read_plan

    strict_on = _strictness(strict, no_strict)
    if out is None and not dry_run:
        raise UsageError("--out", "say where to write the result (-o OUT), or pass --dry-run")
    if plan is not None and (rename or strip_prefix or add_prefix or include or exclude or match != "exact"):
        raise UsageError(
            "--plan",
            "a plan is applied as it is: drop --match, --rename, --strip-prefix, --add-prefix, --include and --exclude",
        )
    options = make_options(
        match,
        rename or [],
        strip_prefix or [],
        add_prefix,
        include or [],
        exclude or [],
        reshape,
        key,
        read_plan(plan) if plan is not None else None,
    )
    try:
        result = port_checkpoint(
            source,
            to,
            out,
            options,
            args=arg or [],
            strict=strict_on,
            dry_run=dry_run,
            force=force,
            verify=verify,
            trust=trust,
            plan_out=plan_out,
        )
    except PortFailed as failed:
        _show_port(failed.report, json_out, render)
        sys.stdout.flush()
        raise
    _show_port(result, json_out, render)


def _show_port(result, json_out: bool, render) -> None:
    if json_out:
        typer.echo(render.dumps(result.to_json()))
    elif _use_rich():
        from rich.console import Console

        render.render_port_rich(result, Console())
    else:
        sys.stdout.write(render.render_port_plain(result))


def run() -> None:
    """Console-script entry point."""
    app(prog_name="surgery")
