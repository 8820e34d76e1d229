"""What `surgery port` is asked to do, as one value: `PortRequest`, from flags, a recipe
file's fields or a script, every field checked where it is given (errors name the field)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from surgery.commands.requests import Request, given
from surgery.errors import BadArgument, UsageError
from surgery.models.edit import Edit
from surgery.models.finetune import FinetunePlan
from surgery.plans.keys import KeyRules, strings
from surgery.plans.match import MODES

# The least share of the target's expected parameters (%) a port loads before it writes:
# a port that loads almost nothing is a wrong prefix or a wrong target, never a model.
DEFAULT_MIN_COVERAGE = 50.0


def check_min_coverage(value: object) -> float:
    """A percent from 0 to 100.

    Raises:
        BadArgument: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise BadArgument("min_coverage", f"{value!r} is not a percent from 0 to 100")
    return float(value)


# -- the request: flags, a recipe file's fields, or a library call ----------------
@dataclass(frozen=True)
class PortRequest(Request):
    """Everything `surgery port` does, as one value. The CLI builds it from its flags,
    a recipe file from its fields (the same names), a script by calling it; then
    `port_file(request)` runs it.

    Example:
        >>> PortRequest("ckpt.pth", "torchvision:resnet18", out="ready.safetensors",
        ...             keys=KeyRules.parse(strip_prefix="module."), strict=False)
    """

    source: str
    to: str
    out: str | None = None
    args: tuple[str, ...] = ()  # the target's keyword arguments, NAME=VALUE
    keys: KeyRules = KeyRules()
    match: str = "exact"
    strict: bool = True
    min_coverage: float = DEFAULT_MIN_COVERAGE  # percent of the expected parameters; 0: no guard
    allow_missing: tuple[str, ...] = ()  # globs of target keys expected to be new
    allow_unexpected: tuple[str, ...] = ()  # globs of source keys expected to go unused
    reshape: bool = False
    edits: tuple[Edit, ...] = ()
    init: str | None = None
    finetune: FinetunePlan = FinetunePlan()
    verify: bool = False
    allow_lossy_cast: bool = False  # load casts that overflow to inf, make NaN or flush to zero
    plan: str | None = None  # a reviewed plan file, applied instead of matching
    plan_out: str | None = None
    dry_run: bool = False
    force: bool = False
    trust: bool = False
    format: str = "auto"  # auto: by OUT's name; hf: a Hugging Face model folder
    shard_size: int | None = None  # --format hf: shards of at most this many bytes (default 5 GB)
    map: tuple[str, ...] = ()  # rule files, applied before name matching
    preset: tuple[str, ...] = ()  # rule files shipped with surgery (`surgery presets`)
    map_args: tuple[str, ...] = ()  # NAME=VALUE for the rules' "{name}" op parameters
    adapt: bool = False  # resample or resize what differs only in grid, kernel, vocabulary or classes
    check: bool = False  # run the source's architecture and the target on probes, compare
    check_from: str | None = None  # the source's architecture, a spec as `to`
    probe_shape: tuple[int, ...] | None = None
    atol: float = 1e-5
    target_named_by: str | None = None  # the recipe file `to` was read from: it imports code only with trust
    from_named_by: str | None = None  # the same for `check_from`

    # What a recipe file may hold, with the TOML type of each field: the flags by their
    # long names. `plan`, `plan_out`, `dry_run`, `force` and `trust` are the caller's
    # alone: a file never decides to trust itself.
    FILE_FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "source": str,
        "to": str,
        "out": str,
        "args": dict,
        "strict": bool,
        "min_coverage": (int, float),
        "allow_missing": list,
        "allow_unexpected": list,
        "match": str,
        **KeyRules.FILE_FIELDS,
        "reshape": bool,
        "edits": list,
        "extract": str,
        "drop": str,
        "delete": list,
        "replace": list,
        "add": list,
        "rename_module": list,
        "num_classes": int,
        "in_chans": int,
        "init": str,
        "freeze": list,
        "unfreeze": list,
        "freeze_bn": bool,
        "lr": dict,
        "base_lr": float,
        "weight_decay": float,
        "layer_decay": float,
        "verify": bool,
        "allow_lossy_cast": bool,
        "format": str,
        "shard_size": (str, int),
        "map": (str, list),
        "preset": (str, list),
        "map_args": dict,
        "adapt": bool,
        "check": bool,
        "check_from": str,
        "probe_shape": (str, list),
        "atol": (int, float),
    }

    def __post_init__(self) -> None:
        from surgery.models.edit import INIT_SCHEMES

        if not self.source:
            raise BadArgument("source", "name the checkpoint to port (or `source` in the recipe)")
        if not self.to:
            raise BadArgument("to", "name the target (or `to` in the recipe)")
        if self.out is None and not self.dry_run:
            raise BadArgument("out", "say where to write the result (-o OUT), or pass --dry-run")
        if self.match not in MODES:
            raise BadArgument("match", f"{self.match!r} is not one of {', '.join(MODES)}")
        if self.plan is not None and (self.keys.renames_keys or self.match != "exact"):
            raise BadArgument(
                "plan",
                "a plan is applied as it is: drop --match, --rename, --strip-prefix, --add-prefix, "
                "--include and --exclude",
            )
        check_min_coverage(self.min_coverage)
        if self.format not in PORT_FORMATS:
            raise BadArgument("format", f"{self.format!r} is not one of {', '.join(PORT_FORMATS)}")
        if self.format == "hf" and self.edits:
            raise BadArgument(
                "format",
                "--format hf writes the target's config.json, which edits do not change: set the "
                "config's keywords instead (hf:CLASS?num_labels=3&config=...)",
            )
        if self.shard_size is not None and (self.format != "hf" or self.shard_size <= 0):
            raise BadArgument("shard_size", "shards are written with --format hf, of more than 0 bytes")
        if self.check and not self.check_from:
            raise BadArgument(
                "check", "--check builds the source's architecture too: name it with --from SPEC"
            )
        if self.check_from and not self.check:
            raise BadArgument("check_from", "--from names the architecture --check runs: pass --check")
        if isinstance(self.atol, bool) or not isinstance(self.atol, (int, float)) or self.atol < 0:
            raise BadArgument("atol", f"{self.atol!r} is not a tolerance of 0 or more")
        if self.map_args and not (self.map or self.preset or self.plan):
            raise BadArgument(
                "map_args", "values for the rules' parameters, with no rules: pass --map or --preset"
            )
        if self.plan is not None and (self.map or self.preset):
            raise BadArgument("plan", "a plan holds the rules it was made with: drop --map and --preset")
        if self.init is not None and self.init not in INIT_SCHEMES:
            raise BadArgument("init", f"{self.init!r} is not one of {', '.join(INIT_SCHEMES)}")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, file: str | None = None, from_file: frozenset = frozenset()
    ) -> PortRequest:
        """A request from flat fields: the flags' long names (`strip_prefix`, `num_classes`),
        as the CLI and recipe files give them; fields set to None keep their defaults. A
        target read from `file` (`to` in `from_file`) is built only with `trust` when it
        imports code."""
        fields = given(fields)
        unknown = sorted(
            set(fields) - set(cls.FILE_FIELDS) - {"plan", "plan_out", "dry_run", "force", "trust"}
        )
        if unknown:
            raise BadArgument(unknown[0], "not a field of surgery port")
        from surgery.commands.convert import parse_size

        size = fields.get("shard_size")
        args, map_args = (as_pairs(fields.get(name) or ()) for name in ("args", "map_args"))
        return cls(
            source=str(fields.get("source") or ""),
            to=str(fields.get("to") or ""),
            out=str(fields["out"]) if fields.get("out") is not None else None,
            args=tuple(args),
            keys=KeyRules.from_fields(fields),
            match=fields.get("match") or "exact",
            strict=bool(fields.get("strict", True)),
            min_coverage=fields.get("min_coverage", DEFAULT_MIN_COVERAGE),
            allow_missing=strings(fields.get("allow_missing"), "allow_missing"),
            allow_unexpected=strings(fields.get("allow_unexpected"), "allow_unexpected"),
            reshape=bool(fields.get("reshape")),
            edits=tuple(edits_from_fields(fields)),
            init=fields.get("init"),
            finetune=finetune_from_fields(fields),
            verify=bool(fields.get("verify")),
            allow_lossy_cast=bool(fields.get("allow_lossy_cast")),
            plan=str(fields["plan"]) if fields.get("plan") is not None else None,
            plan_out=str(fields["plan_out"]) if fields.get("plan_out") is not None else None,
            dry_run=bool(fields.get("dry_run")),
            force=bool(fields.get("force")),
            trust=bool(fields.get("trust")),
            format=fields.get("format") or "auto",
            shard_size=parse_size(size) if isinstance(size, str) else size,
            map=paths(fields.get("map"), "map"),
            preset=strings(fields.get("preset"), "preset"),
            map_args=tuple(map_args),
            adapt=bool(fields.get("adapt")),
            check=bool(fields.get("check")),
            check_from=fields.get("check_from"),
            probe_shape=probe_shape(fields.get("probe_shape")),
            atol=fields.get("atol", 1e-5),
            target_named_by=file if "to" in from_file else None,
            from_named_by=file if "check_from" in from_file else None,
        )

    @classmethod
    def check_file(cls, path: Path, doc: dict[str, Any]) -> None:
        for edit in doc.get("edits", []):
            if not isinstance(edit, dict) or "op" not in edit or set(edit) - EDIT_FIELDS:
                raise UsageError(path, f"each edit is a table with op and path, spec or value; got {edit!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "to": self.to,
            "out": self.out,
            "args": list(self.args),
            **self.keys.to_json(),
            "match": self.match,
            "strict": self.strict,
            "min_coverage": self.min_coverage,
            "allow_missing": list(self.allow_missing),
            "allow_unexpected": list(self.allow_unexpected),
            "reshape": self.reshape,
            "edits": [e.to_json() for e in self.edits],
            "init": self.init,
            "finetune": self.finetune.to_json(),
            "verify": self.verify,
            "allow_lossy_cast": self.allow_lossy_cast,
            "format": self.format,
            "shard_size": self.shard_size,
            "map": list(self.map),
            "preset": list(self.preset),
            "map_args": list(self.map_args),
            "adapt": self.adapt,
            "check": self.check,
            "check_from": self.check_from,
            "probe_shape": list(self.probe_shape) if self.probe_shape else None,
            "atol": self.atol,
            "plan": self.plan,
            "dry_run": self.dry_run,
        }


def probe_shape(value: Any) -> tuple[int, ...] | None:
    """`2,3,224,224` (or a list of sizes) as a shape.

    Raises:
        BadArgument: anything but positive sizes.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        shape = tuple(int(str(n).strip()) for n in items)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise BadArgument("probe_shape", f"{value!r} is not a shape of positive sizes like 2,3,224,224")
    return shape


def paths(value: Any, param: str) -> tuple[str, ...]:
    """A path or a list of paths (`str` or `os.PathLike`, as `map=` takes them), as strings.

    Raises:
        BadArgument: naming `param`, for anything else.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif isinstance(value, (list, tuple)):
        value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    return strings(value, param)


def as_pairs(value: Any) -> list[str]:
    """NAME=VALUE strings from a recipe's table (`args = { num_classes = 2 }`) or as given."""
    if isinstance(value, dict):
        return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in value.items()]
    return list(value)


EDIT_FIELDS = {"op", "path", "spec", "value"}
PORT_FORMATS = ("auto", "hf")


def edits_from_fields(fields: Mapping[str, Any]) -> list[Edit]:
    """Edits in the order they apply: a recipe's `edits` table as written, then the
    flags' edits by kind (extract, drop, delete, replace, add, rename), then the head
    (`num_classes`) and the input (`in_chans`)."""
    edits = [Edit.from_json(e) for e in fields.get("edits", [])]
    if fields.get("extract"):
        edits.append(Edit("extract", spec=fields["extract"]))
    if fields.get("drop"):
        edits.append(Edit("without", spec=fields["drop"]))
    edits += [Edit("delete", path) for path in fields.get("delete") or []]
    for op, param, form in (("replace", "replace", "PATH=SPEC"), ("add", "add", "PATH=SPEC"),
                            ("rename", "rename_module", "PATH=NAME")):  # fmt: skip
        for text in fields.get(param) or []:
            path, sep, spec = text.partition("=")
            if not sep or not path or not spec:
                raise BadArgument(param, f"{text!r} is not {form}")
            edits.append(Edit(op, path.strip(), spec.strip()))
    if fields.get("num_classes") is not None:
        edits.append(Edit("num_classes", value=int(fields["num_classes"])))
    if fields.get("in_chans") is not None:
        edits.append(Edit("in_chans", value=int(fields["in_chans"])))
    return edits


def finetune_from_fields(fields: Mapping[str, Any]) -> FinetunePlan:
    """Freeze rules first, then unfreeze rules (each in the order given); `lr` rules in order."""
    from surgery.models.finetune import LrRule

    lr = fields.get("lr") or []
    rules = [f"{k}={v}" for k, v in lr.items()] if isinstance(lr, dict) else list(lr)
    return FinetunePlan(
        tuple(("freeze", g) for g in fields.get("freeze") or [])
        + tuple(("unfreeze", g) for g in fields.get("unfreeze") or []),
        bool(fields.get("freeze_bn")),
        tuple(LrRule.parse(r) for r in rules),
        fields.get("base_lr"),
        fields.get("weight_decay"),
        fields.get("layer_decay"),
    )
