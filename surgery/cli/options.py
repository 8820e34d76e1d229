"""Every option of the CLI, declared once, and how a command's flags become request fields.

A command's parameters carry the names of its request's fields (`strip_prefix`,
`num_classes`), so the flags given become fields as they are; `fields_of` leaves out
what was not given and what belongs to the CLI alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# Optional[...] and not `X | None`: typer reads these annotations at run time.
Strs = Optional[list[str]]
Text = Optional[str]
File = Optional[Path]

KeyOpt = Annotated[
    Text,
    typer.Option(
        "--key",
        "-k",
        help="Where the state_dict sits, dotted (`model_ema`), instead of the automatic choice.",
    ),
]
StripPrefixOpt = Annotated[
    Strs, typer.Option("--strip-prefix", help="Remove this prefix from every key (repeatable).")
]
AddPrefixOpt = Annotated[Text, typer.Option("--add-prefix", help="Put this prefix before every key.")]
RenameOpt = Annotated[
    Strs, typer.Option("--rename", help="REGEX=REPL applied to every key, in order (repeatable).")
]
IncludeOpt = Annotated[Strs, typer.Option("--include", help="Only keys matching this glob (repeatable).")]
ExcludeOpt = Annotated[
    Strs, typer.Option("--exclude", help="Leave out keys matching this glob (repeatable).")
]
OutOpt = Annotated[
    File,
    typer.Option(
        "--out",
        "-o",
        help="Where to write: NAME.safetensors, a torch file (any other name), or a folder "
        "(convert --shard-size or --format dcp).",
        show_default=False,
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; write nothing.")]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Read everything back and check it: every zip CRC (inspect), every written tensor "
        "bit for bit against its source (port, convert).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output (never an input).")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Read tensors of files with unsafe findings (their pickles are still never run), and "
        "build a package.module:callable target that a --recipe file names.",
    ),
]
RecipeOpt = Annotated[
    File, typer.Option("--recipe", help="A TOML file with these options as fields; flags given here win.")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected failure.")]

# Command parameters that belong to the CLI, not to a request.
CLI_ONLY = frozenset({"json_out", "debug", "recipe", "exit_code", "no_strict", "sarif"})
# Parameters whose request field has another name.
FIELD_OF = {"arg": "args"}


def fields_of(params: dict[str, Any]) -> dict[str, Any]:
    """The flags given, as request fields: unset ones (None, False, no items) left out."""
    return {
        FIELD_OF.get(name, name): value
        for name, value in params.items()
        if name not in CLI_ONLY and value is not None and value is not False and value != []
    }
