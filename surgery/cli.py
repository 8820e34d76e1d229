"""The `surgery` command: parse, call the library, render. No logic of its own.

Errors become one line on stderr, `error: <file>: <what is wrong>`, with the
exit code of the error type; a traceback only with `--debug`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
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


ListOpt = Optional[list[str]]  # noqa: UP045


@app.command()
@handles_errors
def port(
    source: Annotated[
        Optional[Path],
        typer.Argument(help="The checkpoint to port (any format inspect reads).", show_default=False),
    ] = None,  # noqa: UP045
    to: Annotated[
        Optional[str],
        typer.Option(
            "--to",
            help="torchvision:NAME, timm:NAME, package.module:callable (with ?k=v&...), or a checkpoint as template.",
            show_default=False,
        ),
    ] = None,  # noqa: UP045
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output file: .safetensors, or a torch file.")
    ] = None,  # noqa: UP045
    arg: Annotated[
        ListOpt, typer.Option("--arg", help="Target keyword argument NAME=VALUE (repeatable).")
    ] = None,
    strict: Annotated[
        Optional[str],
        typer.Option(
            "--strict",
            help="true (default): refuse unless every key matches, as torch; false: load what matches.",
        ),
    ] = None,  # noqa: UP045
    no_strict: Annotated[bool, typer.Option("--no-strict", help="The same as --strict false.")] = False,
    match: Annotated[
        Optional[str], typer.Option("--match", help="exact (default), suffix, order or auto.")
    ] = None,  # noqa: UP045
    rename: Annotated[
        ListOpt, typer.Option("--rename", help="REGEX=REPL applied to every key, in order (repeatable).")
    ] = None,
    strip_prefix: Annotated[
        ListOpt, typer.Option("--strip-prefix", help="Remove this prefix from source keys (repeatable).")
    ] = None,
    add_prefix: Annotated[
        Optional[str], typer.Option("--add-prefix", help="Add this prefix to every source key.")
    ] = None,  # noqa: UP045
    include: Annotated[
        ListOpt, typer.Option("--include", help="Only source keys matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        ListOpt, typer.Option("--exclude", help="Leave out source keys matching this glob (repeatable).")
    ] = None,
    reshape: Annotated[
        bool,
        typer.Option("--reshape", help="Load pairs of equal size but different shape (Linear <-> 1x1 conv)."),
    ] = False,
    key: Annotated[
        Optional[str], typer.Option("--key", "-k", help="Where the source's state_dict sits, dotted.")
    ] = None,  # noqa: UP045
    replace: Annotated[
        ListOpt,
        typer.Option(
            "--replace",
            help="PATH=SPEC: put a torch.nn module spec at PATH; * is its input width (repeatable).",
        ),
    ] = None,
    add: Annotated[
        ListOpt,
        typer.Option(
            "--add", help="PATH=SPEC: add a module; an index into a Sequential inserts it there (repeatable)."
        ),
    ] = None,
    delete: Annotated[ListOpt, typer.Option("--delete", help="PATH: remove a module (repeatable).")] = None,
    rename_module: Annotated[
        ListOpt, typer.Option("--rename-module", help="PATH=NAME: rename a submodule (repeatable).")
    ] = None,
    extract: Annotated[
        Optional[str],
        typer.Option("--extract", help="PATH[,PATH...]: keep only these submodules (a backbone)."),
    ] = None,  # noqa: UP045
    drop: Annotated[
        Optional[str],
        typer.Option(
            "--drop", help="NAME[,NAME...]: keep every top-level module but these (resnet: avgpool,fc)."
        ),
    ] = None,  # noqa: UP045
    num_classes: Annotated[
        Optional[int], typer.Option("--num-classes", min=1, help="Replace the classifier for N classes.")
    ] = None,  # noqa: UP045
    in_chans: Annotated[
        Optional[int], typer.Option("--in-chans", min=1, help="Adapt the first conv to N input channels.")
    ] = None,  # noqa: UP045
    init: Annotated[
        Optional[str],
        typer.Option("--init", help="default, kaiming, xavier, normal or zeros: for new modules."),
    ] = None,  # noqa: UP045
    freeze: Annotated[
        ListOpt,
        typer.Option("--freeze", help="Freeze parameters matching GLOB (repeatable; before --unfreeze)."),
    ] = None,
    unfreeze: Annotated[
        ListOpt, typer.Option("--unfreeze", help="Unfreeze parameters matching GLOB (repeatable).")
    ] = None,
    freeze_bn: Annotated[
        bool,
        typer.Option(
            "--freeze-bn", help="Keep BatchNorm statistics fixed (eval mode) and its parameters frozen."
        ),
    ] = False,
    lr: Annotated[
        ListOpt,
        typer.Option(
            "--lr",
            help="[NAME:]GLOB=VALUE: a named optimizer group's learning rate; first match wins (repeatable).",
        ),
    ] = None,
    base_lr: Annotated[
        Optional[float], typer.Option("--base-lr", help="Learning rate of the other trainable parameters.")
    ] = None,  # noqa: UP045
    weight_decay: Annotated[
        Optional[float], typer.Option("--weight-decay", help="Weight decay, none on biases and norm weights.")
    ] = None,  # noqa: UP045
    layer_decay: Annotated[
        Optional[float],
        typer.Option("--layer-decay", help="Layer-wise learning-rate decay from the head down."),
    ] = None,  # noqa: UP045
    recipe: Annotated[
        Optional[Path], typer.Option("--recipe", help="A TOML file with these fields (flags given here win).")
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
    """Map, filter and match a checkpoint's keys into a (possibly edited) target; report; save.

    Exit code 1 when a strict port finds anything missing, unexpected or mismatched
    (the report is printed, nothing is written); 2 on bad usage.
    """
    from surgery import report as render
    from surgery.porting import PortFailed, port_from_fields
    from surgery.recipe import read_recipe_file

    flags = {
        "source": str(source) if source else None,
        "to": to,
        "out": str(out) if out else None,
        "args": arg,
        "strict": False if no_strict else (_strictness(strict, False) if strict is not None else None),
        "match": match,
        "rename": rename,
        "strip_prefix": strip_prefix,
        "add_prefix": add_prefix,
        "include": include,
        "exclude": exclude,
        "reshape": reshape or None,
        "key": key,
        "replace": replace,
        "add": add,
        "delete": delete,
        "rename_module": rename_module,
        "extract": extract,
        "drop": drop,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "init": init,
        "freeze": freeze,
        "unfreeze": unfreeze,
        "freeze_bn": freeze_bn or None,
        "lr": lr,
        "base_lr": base_lr,
        "weight_decay": weight_decay,
        "layer_decay": layer_decay,
        "verify": verify or None,
    }
    fields = read_recipe_file(recipe) if recipe is not None else {}
    fields.update({k: v for k, v in flags.items() if v is not None})
    try:
        result = port_from_fields(
            fields, dry_run=dry_run, force=force, trust=trust, plan=plan, plan_out=plan_out
        )
    except PortFailed as failed:
        _show_port(failed.report, json_out, render)
        sys.stdout.flush()
        raise
    _show_port(result, json_out, render)
    for warning in result.finetune.warnings if result.finetune else ():
        typer.echo(f"warning: {warning}", err=True)


def _show_port(result, json_out: bool, render) -> None:
    if json_out:
        typer.echo(render.dumps(result.to_json()))
    elif _use_rich():
        from rich.console import Console

        render.render_port_rich(result, Console())
    else:
        sys.stdout.write(render.render_port_plain(result))


ListOpt = Optional[list[str]]  # noqa: UP045


@app.command()
@handles_errors
def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="Checkpoint file, *.index.json, or a folder (sharded or DCP).", show_default=False
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output: NAME.safetensors, a torch file, or a folder (--shard-size, --format dcp).",
        ),
    ],
    format: Annotated[
        str, typer.Option("--format", help="auto (by OUT's name) | safetensors | torch | dcp.")
    ] = "auto",
    shard_size: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--shard-size", help="Write a sharded folder with shards of at most this size (2GB, 500MiB)."
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--dtype", help="Cast floating tensors: bf16 | fp16 | fp32 (integer buffers untouched)."
        ),
    ] = None,
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--key", "-k", help="The container to convert, dotted (`state_dict_ema`)."),
    ] = None,
    rename: Annotated[
        ListOpt, typer.Option("--rename", help="REGEX=REPLACEMENT on key names (repeatable).")
    ] = None,
    strip_prefix: Annotated[ListOpt, typer.Option("--strip-prefix", help="Remove this key prefix.")] = None,
    add_prefix: Annotated[
        Optional[str], typer.Option("--add-prefix", help="Put this prefix before every key.")  # noqa: UP045
    ] = None,
    include: Annotated[ListOpt, typer.Option("--include", help="Keep only keys matching a glob.")] = None,
    exclude: Annotated[ListOpt, typer.Option("--exclude", help="Leave out keys matching a glob.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be written; write nothing.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-read the output and compare every tensor with its source.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust", help="Convert a source with unsafe findings (its pickle is still never run)."
        ),
    ] = False,
    max_output_ratio: Annotated[
        float,
        typer.Option(
            "--max-output-ratio",
            help="Refuse an output more than this many times the input's size. A conversion writes"
            " at most what the input stores (2x with a cast to fp32); views that repeat stored bytes"
            " (stride 0) are written in full and can make a small file write terabytes.",
        ),
    ] = 4.0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert between torch, safetensors, sharded and DCP checkpoints, streaming.

    One tensor at a time; bytes that need no change are copied file to file.
    The output appears only when complete (and verified, with --verify).
    """
    from surgery import report
    from surgery.converting import convert as run_convert

    with _progress(enabled=not json_out and sys.stderr.isatty()) as progress:
        result = run_convert(
            source,
            out,
            key=key,
            strip_prefix=strip_prefix or [],
            add_prefix=add_prefix,
            rename=rename or [],
            include=include or [],
            exclude=exclude or [],
            dtype=dtype,
            format=format,
            shard_size=shard_size,
            dry_run=dry_run,
            force=force,
            verify=verify,
            trust=trust,
            progress=progress,
            max_output_ratio=max_output_ratio,
        )
    _show(result, report.convert_rows, json_out)


@app.command()
@handles_errors
def diff(
    a: Annotated[str, typer.Argument(help="First checkpoint (any format).", show_default=False)],
    b: Annotated[str, typer.Argument(help="Second checkpoint (any format).", show_default=False)],
    structure_only: Annotated[
        bool, typer.Option("--structure-only", help="Compare names, shapes and dtypes only; read no data.")
    ] = False,
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--key", "-k", help="The container to compare in both files, dotted."),
    ] = None,
    strip_prefix: Annotated[
        ListOpt, typer.Option("--strip-prefix", help="Remove this prefix on both sides.")
    ] = None,
    include: Annotated[ListOpt, typer.Option("--include", help="Compare only keys matching a glob.")] = None,
    exclude: Annotated[ListOpt, typer.Option("--exclude", help="Leave out keys matching a glob.")] = None,
    exit_code: Annotated[
        bool,
        typer.Option("--exit-code", help="Exit 1 when the checkpoints differ (like git diff --exit-code)."),
    ] = False,
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Compare files with unsafe findings (their pickles are never run)."),
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Keys only in A or B, shape and dtype differences, and how far the values are apart.

    Tensors are compared one at a time, as raw bytes where possible.
    """
    from surgery import report
    from surgery.diffing import diff as run_diff

    result = run_diff(
        a,
        b,
        structure_only=structure_only,
        key=key,
        strip_prefix=strip_prefix or [],
        include=include or [],
        exclude=exclude or [],
        trust=trust,
    )
    _show(result, report.diff_rows, json_out)
    if exit_code and not result.same:
        raise typer.Exit(1)


def _show(result, rows, json_out: bool) -> None:
    from surgery import report

    if json_out:
        typer.echo(report.dumps(result.to_json()))
    elif _use_rich():
        from rich.console import Console

        report.render_rows_rich(rows(result), Console())
    else:
        sys.stdout.write(report.render_rows_plain(rows(result)))


@contextmanager
def _progress(*, enabled: bool):
    """A rich progress bar (bytes, rate, time left) on a terminal; nothing in pipes or with --json."""
    if not enabled:
        yield None
        return
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
    with Progress(*columns, transient=True, console=_stderr_console()) as bar:

        def start(tensors: int, total: int):
            task = bar.add_task(f"{tensors} tensors", total=total)
            return lambda done: bar.advance(task, done)

        yield start


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def run() -> None:
    """Console-script entry point."""
    app(prog_name="surgery")
