"""Every option of the CLI, declared once, and how a command's flags become request fields.

Each shared option is an `Opt` record: its flags, help and kind of value. Typer reads it
through the `Annotated` aliases (`KeyOpt`, ...) that commands.py declares its parameters
with; `cli.fast` reads the same records to run a plain `surgery inspect` without
importing Typer at all (start-up), which is why this module does not import Typer.

A command's parameters carry the names of its request's fields (`strip_prefix`,
`num_classes`), so the flags given become fields as they are; `fields_of` leaves out
what was not given and what belongs to the CLI alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

# Optional[...] and not `X | None`: typer reads these annotations at run time.
Strs = Optional[list[str]]
Text = Optional[str]
File = Optional[Path]


class Opt(NamedTuple):
    """One option, or with no flags the command's argument, as Typer gets it."""

    flags: tuple[str, ...]  # ("--key", "-k"); () for an argument
    help: str
    value: type = str  # what one value becomes: str, int or Path; bool for an on/off flag
    many: bool = False  # repeatable: the values come as a list
    min: int | None = None
    show_default: bool = True


KEY = Opt(
    ("--key", "-k"), "Where the state_dict sits, dotted (`model_ema`), instead of the automatic choice."
)
STRIP_PREFIX = Opt(("--strip-prefix",), "Remove this prefix from every key (repeatable).", many=True)
ADD_PREFIX = Opt(("--add-prefix",), "Put this prefix before every key.")
RENAME = Opt(("--rename",), "REGEX=REPL applied to every key, in order (repeatable).", many=True)
INCLUDE = Opt(("--include",), "Only keys matching this glob (repeatable).", many=True)
EXCLUDE = Opt(("--exclude",), "Leave out keys matching this glob (repeatable).", many=True)
OUT = Opt(
    ("--out", "-o"),
    "Where to write: NAME.safetensors, a torch file (any other name), or a folder "
    "(convert --shard-size or --format dcp).",
    Path,
    show_default=False,
)
PORT_FORMAT = Opt(
    ("--format",),
    "auto (by OUT's name: NAME.safetensors, else a torch file) | hf: OUT becomes a Hugging Face "
    "model folder (config.json, model.safetensors) that from_pretrained loads.",
)
SHARD_SIZE = Opt(
    ("--shard-size",), "With --format hf: shards of at most this size (2GB, 500MiB); default 5GB."
)
SHARDS = Opt(("--shard-size",), "Write a sharded folder with shards of at most this size (2GB, 500MiB).")
DRY_RUN = Opt(("--dry-run",), "Show what would be done; write nothing.", bool)
VERIFY = Opt(
    ("--verify",),
    "Read everything back and check it: every zip CRC (inspect), every written tensor "
    "bit for bit against its source (port, convert).",
    bool,
)
FORCE = Opt(("--force",), "Replace an existing output (never an input).", bool)
ALLOW_LOSSY_CAST = Opt(
    ("--allow-lossy-cast",),
    "Write casts that overflow to inf, make NaN or flush non-zero values to zero (counted per "
    "tensor either way; refused without this flag).",
    bool,
)
TRUST = Opt(
    ("--trust",),
    "Read tensors of files with unsafe findings (their pickles are still never run), and "
    "build a package.module:callable target that a --recipe file names.",
    bool,
)
MIN_COVERAGE = Opt(
    ("--min-coverage",),
    "Refuse (write nothing), strict or not, when less than this percent of the target's parameters "
    "expected from the source would be loaded [default: 50]; 0 turns the guard off.",
    float,
    min=0,
    show_default=False,
)
ALLOW_MISSING = Opt(
    ("--allow-missing",),
    "Target keys matching this glob may find nothing in the source, even when strict: new (repeatable).",
    many=True,
)
ALLOW_UNEXPECTED = Opt(
    ("--allow-unexpected",),
    "Source keys matching this glob may go unused, even when strict (repeatable).",
    many=True,
)
RECIPE = Opt(("--recipe",), "A TOML file with these options as fields; flags given here win.", Path)
JSON = Opt(("--json",), "Print one JSON document on stdout and nothing else there.", bool)
DEBUG = Opt(("--debug",), "Show the traceback of an unexpected failure.", bool)

CHECKPOINT = Opt(
    (),
    "Checkpoint file, *.index.json, folder, http(s) URL, or hf://ORG/REPO[@REVISION][/PATH].",
    str,  # a Path would fold a URL's `//`
    show_default=False,
)
FILTER = Opt(
    ("--filter", "-f"),
    "Only tensors matching this glob (repeatable); `layer1` selects the module.",
    many=True,
)
DEPTH = Opt(("--depth", "-d"), "Fold modules deeper than N levels.", int, min=0)
DOWNLOAD = Opt(
    ("--download",),
    "Download a URL or hf:// address (to a temporary folder, or the Hub cache) and read the copy: for --verify, or a server ignoring Range.",
    bool,
)

# `surgery inspect`'s parameters, in the order of commands.inspect's signature (a test
# keeps the two the same): what cli.fast parses a command line into.
INSPECT = {
    "path": CHECKPOINT,
    "filter": FILTER,
    "depth": DEPTH,
    "key": KEY,
    "verify": VERIFY,
    "download": DOWNLOAD,
    "json_out": JSON,
    "debug": DEBUG,
}

_ALIASES = {
    "KeyOpt": KEY,
    "StripPrefixOpt": STRIP_PREFIX,
    "AddPrefixOpt": ADD_PREFIX,
    "RenameOpt": RENAME,
    "IncludeOpt": INCLUDE,
    "ExcludeOpt": EXCLUDE,
    "OutOpt": OUT,
    "PortFormatOpt": PORT_FORMAT,
    "ShardSizeOpt": SHARD_SIZE,
    "ShardsOpt": SHARDS,
    "DryRunOpt": DRY_RUN,
    "VerifyOpt": VERIFY,
    "ForceOpt": FORCE,
    "AllowLossyCastOpt": ALLOW_LOSSY_CAST,
    "TrustOpt": TRUST,
    "MinCoverageOpt": MIN_COVERAGE,
    "AllowMissingOpt": ALLOW_MISSING,
    "AllowUnexpectedOpt": ALLOW_UNEXPECTED,
    "RecipeOpt": RECIPE,
    "JsonOpt": JSON,
    "DebugOpt": DEBUG,
    "CheckpointArg": CHECKPOINT,
    "FilterOpt": FILTER,
    "DepthOpt": DEPTH,
    "DownloadOpt": DOWNLOAD,
}


def annotated(opt: Opt) -> Any:
    """`Annotated[type, typer.Option(...)]` (or `typer.Argument`) for a command's signature."""
    from typing import Annotated

    import typer

    if opt.value is bool:
        kind: Any = bool
    elif opt.many:
        kind = Optional[list[opt.value]]
    elif opt.flags:
        kind = Optional[opt.value]
    else:
        kind = opt.value  # an argument the command cannot do without
    if not opt.flags:
        return Annotated[kind, typer.Argument(help=opt.help, show_default=opt.show_default)]
    option = typer.Option(*opt.flags, help=opt.help, min=opt.min, show_default=opt.show_default)
    return Annotated[kind, option]


def __getattr__(name: str) -> Any:
    """The aliases (`KeyOpt`, ...), made on first use: they need Typer, which `cli.fast` does without."""
    if name not in _ALIASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    alias = globals()[name] = annotated(_ALIASES[name])
    return alias


# Command parameters that belong to the CLI, not to a request.
CLI_ONLY = frozenset({"json_out", "debug", "recipe", "exit_code", "no_strict", "sarif"})
# Parameters whose request field has another name.
FIELD_OF = {"arg": "args", "map_arg": "map_args", "adapter": "adapters"}


def fields_of(params: dict[str, Any]) -> dict[str, Any]:
    """The flags given, as request fields: unset ones (None, False, no items) left out."""
    return {
        FIELD_OF.get(name, name): value
        for name, value in params.items()
        if name not in CLI_ONLY and value is not None and value is not False and value != []
    }
