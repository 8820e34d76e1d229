"""`surgery merge`: checkpoints of one model averaged or merged into one, streamed.

`MergeRequest` says what to merge and how (from flags, a TOML file or a script);
`merge_file(request)` opens every input (any format surgery reads, mixed), puts their keys
through the key rules of port and convert, plans the output from names, shapes and dtypes
alone (what `--dry-run` shows), then merges one tensor at a time, piece by piece, through the
method's float64 arithmetic (`models.merges`) into the writer of the output's kind (convert's
`WRITERS`): memory follows a few pieces of each input, not the checkpoints.

Floating tensors are merged and written in their own dtype (unless `dtype`); integer and bool
tensors are never averaged: they are the last input's (with `last`, the newest's). Tied names
are merged once and stay tied. Inputs whose keys or shapes differ are refused, unless not
`strict`: then the keys all hold alike are merged and the others taken from the base or the
first input that holds them. The output's provenance names every input file with its sha256,
the method and its parameters.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from surgery import __version__
from surgery.casts import CastLosses, LossyCast
from surgery.commands.convert import (
    CASTS,
    FLOATING,
    FOLDERS,
    MAX_OUTPUT_RATIO,
    WRITERS,
    Output,
    output_format,
    parse_size,
)
from surgery.commands.requests import Request, given
from surgery.errors import BadArgument, NotFound, SurgeryError, UsageError
from surgery.formats.base import is_remote
from surgery.formats.checkpoint import (
    ALIASES_KEY,
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    open_headers,
    open_trusted,
)
from surgery.models.merges import METHODS, MergeParams, Stream, lora_delta, merge_pieces, normalised
from surgery.names import group_names, natural, wrapper_prefixes
from surgery.plans.adapters import AdapterUse, Delta
from surgery.plans.keys import KeyRules, Rename
from surgery.text import human_bytes, plural
from surgery.values import Entry
from surgery.writers.copy import Pieces, RawBytes
from surgery.writers.outputs import check_destination, check_folder_destination
from surgery.writers.torch_archive import streams_torch

if TYPE_CHECKING:
    import torch

FORMATS = ("auto", "safetensors", "torch", "dcp")
DTYPES = {**CASTS, "fp64": "float64", "float64": "float64", "double": "float64"}
# What `last` orders the inputs by: the first of these that every input records beside its
# state_dict, and the ones after it to break ties (a Lightning checkpoint has epoch and global_step).
RECORDED = ("epoch", "global_step", "step")
PIECE = 1 << 18  # elements of each input merged at a time: 2 MiB as float64 (bigger pieces fault more pages)
SHOWN = 3  # differences named in an error


@dataclass(frozen=True)
class MergeRequest(Request):
    """Everything `surgery merge` does, as one value (flags, a TOML file, or a script).

    Example:
        >>> surgery.merge_file(MergeRequest(("a.pt", "b.pt", "c.pt"), "soup.safetensors"))
    """

    inputs: tuple[str, ...]
    out: str
    method: str = "mean"  # mean | weighted | task-arithmetic | ties | slerp
    weights: tuple[float, ...] = ()  # weighted: one per input, normalised to sum 1
    base: str | None = None  # task-arithmetic, ties: what the inputs were fine-tuned from
    scale: float | None = None  # task-arithmetic, ties: λ (1)
    density: float | None = None  # ties: the share of each task vector kept (0.2)
    t: float | None = None  # slerp: 0 the first input, 1 the second (0.5)
    dtype: str | None = None  # bfloat16 | float16 | float32 | float64: every floating tensor written
    strict: bool = True  # refuse inputs whose keys or shapes differ
    last: int | None = None  # merge the newest N of the inputs (epoch or step recorded, else name)
    keys: KeyRules = KeyRules()
    format: str = "auto"  # by OUT's name: .safetensors, a folder with a shard size, else torch; or dcp
    shard_size: int | None = None  # bytes per shard: a sharded folder
    adapters: tuple[str, ...] = ()  # lora: PEFT LoRA adapter folders merged into the one input
    unmerge: bool = False  # lora: subtract the adapters instead
    allow_lossy_cast: bool = False  # write tensors whose cast overflowed to inf, made NaN or flushed to zero
    verify: bool = False
    dry_run: bool = False
    force: bool = False
    trust: bool = False

    FILE_FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "inputs": list,
        "out": str,
        "method": str,
        "weights": (list, str),
        "base": str,
        "scale": float,
        "density": float,
        "t": float,
        "dtype": str,
        "strict": bool,
        "last": int,
        **KeyRules.FILE_FIELDS,
        "format": str,
        "shard_size": (str, int),
        "adapters": list,
        "unmerge": bool,
        "allow_lossy_cast": bool,
        "verify": bool,
    }

    def __post_init__(self) -> None:
        if not self.out:
            raise BadArgument("out", "say where to write the result (-o OUT)")
        if self.method not in METHODS:
            raise BadArgument("method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        method = METHODS[self.method]
        given_params = {"weights": self.weights, "scale": self.scale, "density": self.density, "t": self.t}
        for param, value in given_params.items():
            if value not in ((), None) and param not in method.params:
                users = " and ".join(name for name, m in METHODS.items() if param in m.params)
                raise BadArgument(param, f"is a parameter of {users}, not of --method {self.method}")
        if self.method == "weighted" and not self.weights:
            raise BadArgument("weights", "--method weighted needs one weight per input (--weights 1,1,2)")
        if self.adapters and self.method != "lora":
            raise BadArgument(
                "method", f"--adapter merges adapters into one base: drop --method {self.method}"
            )
        if self.method == "lora" and not self.adapters:
            raise BadArgument("adapters", "lora merges PEFT adapters: name each with --adapter DIR")
        if self.unmerge and not self.adapters:
            raise BadArgument(
                "unmerge", "subtracts adapters from a merged model: name them with --adapter DIR"
            )
        if self.adapters and self.base:
            raise BadArgument("base", "with --adapter the one checkpoint given is the base: drop --base")
        if self.adapters and self.last is not None:
            raise BadArgument("last", "picks checkpoints to average: --adapter merges into the one given")
        if not all(math.isfinite(w) for w in self.weights):
            raise BadArgument("weights", "weights are finite numbers")
        if self.method == "weighted" and not math.fsum(self.weights) > 0:
            raise BadArgument("weights", "a weighted mean needs weights with a positive sum")
        if method.needs_base and not self.base:
            raise BadArgument(
                "base", f"{self.method} needs the checkpoint the inputs were fine-tuned from (--base BASE)"
            )
        if self.base and not method.needs_base:
            raise BadArgument("base", f"--method {self.method} reads no base (task-arithmetic and ties do)")
        if self.scale is not None and not math.isfinite(self.scale):
            raise BadArgument("scale", f"must be a finite number, not {self.scale}")
        if self.density is not None and not 0 < self.density <= 1:
            raise BadArgument(
                "density",
                f"is the share of each task vector kept: more than 0, at most 1, not {self.density}",
            )
        if self.t is not None and not 0 <= self.t <= 1:
            raise BadArgument("t", f"runs from 0 (the first input) to 1 (the second), not {self.t}")
        if self.dtype is not None and self.dtype not in FLOATING:
            raise BadArgument("dtype", f"{self.dtype!r} is not one of bf16, fp16, fp32, fp64")
        if self.last is not None and self.last < 1:
            raise BadArgument("last", f"merges the newest N inputs: N is at least 1, not {self.last}")
        if self.format not in FORMATS:
            raise BadArgument("format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        if self.shard_size is not None and self.shard_size <= 0:
            raise BadArgument("shard_size", "must be more than 0 bytes")
        if self.shard_size is not None and self.format == "dcp":
            raise BadArgument(
                "shard_size", "a DCP folder is written by torch's own layout: drop the shard size"
            )

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, file: str | None = None, from_file: frozenset = frozenset()
    ) -> MergeRequest:
        """A request from flat fields (the flags' long names): `weights` may be `"1,1,2"`,
        `dtype` an alias (`bf16`), `shard_size` a size such as `2GB`. Weights without a method
        mean `weighted`."""
        fields = given(fields)
        weights = _weights(fields.get("weights", ()))
        dtype = fields.get("dtype")
        if dtype is not None and str(dtype).lower() not in DTYPES:
            raise BadArgument("dtype", f"{dtype!r} is not one of bf16, fp16, fp32, fp64")
        size = fields.get("shard_size")
        inputs = fields.get("inputs") or ()
        adapters = fields.get("adapters") or ()
        adapters = tuple(str(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters))
        default = "lora" if adapters else "weighted" if weights else "mean"
        return cls(
            inputs=tuple(str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)),
            out=str(fields.get("out") or ""),
            method=str(fields.get("method") or default),
            weights=weights,
            base=str(fields["base"]) if fields.get("base") else None,
            scale=_number(fields, "scale"),
            density=_number(fields, "density"),
            t=_number(fields, "t"),
            dtype=None if dtype is None else DTYPES[str(dtype).lower()],
            strict=bool(fields.get("strict", True)),
            last=int(fields["last"]) if fields.get("last") is not None else None,
            keys=KeyRules.from_fields(fields),
            format=fields.get("format", "auto"),
            shard_size=parse_size(size) if isinstance(size, str) else size,
            adapters=adapters,
            unmerge=bool(fields.get("unmerge")),
            allow_lossy_cast=bool(fields.get("allow_lossy_cast")),
            verify=bool(fields.get("verify")),
            dry_run=bool(fields.get("dry_run")),
            force=bool(fields.get("force")),
            trust=bool(fields.get("trust")),
        )

    @property
    def params(self) -> MergeParams:
        """The method's parameters, defaults filled in."""
        defaults = MergeParams()
        return MergeParams(
            weights=self.weights,
            scale=defaults.scale if self.scale is None else self.scale,
            density=defaults.density if self.density is None else self.density,
            t=defaults.t if self.t is None else self.t,
        )

    def method_json(self) -> dict[str, Any]:
        """The method and the parameters it uses (weights as given): the provenance's `surgery.merge`."""
        params = self.params
        used = {p: _plain(getattr(params, p)) for p in METHODS[self.method].params}
        return {"method": self.method, **used, **({"unmerge": True} if self.unmerge else {})}

    def rules_json(self) -> dict[str, Any]:
        """What the merge does to names and dtypes: the report's `options`."""
        return {
            **self.keys.to_json(),
            "dtype": self.dtype,
            "strict": self.strict,
            "last": self.last,
            "format": self.format,
            "shard_size": self.shard_size,
        }


def _weights(value: Any) -> tuple[float, ...]:
    """`"1,1,2"` or `[1, 1, 2]` as floats.

    Raises:
        BadArgument: naming `weights`, for anything that is not a number.
    """
    items = value.split(",") if isinstance(value, str) else list(value or ())
    try:
        return tuple(float(w) for w in items if not (isinstance(w, str) and not w.strip()))
    except (TypeError, ValueError):
        raise BadArgument("weights", f"{value!r} is not a list of numbers such as 1,1,2") from None


def _number(fields: Mapping[str, Any], name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadArgument(name, f"{value!r} is not a number") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# -- inputs: globs, --last, names ------------------------------------------------------------
def expand(inputs: Sequence[str]) -> list[Path]:
    """Each input as a path; one that does not exist and is a glob (`runs/*.pt`, as a recipe
    file or a script may give it) stands for the paths it matches, in natural order.

    Raises:
        NotFound: a glob that matches nothing.
    """
    paths: list[Path] = []
    for text in inputs:
        if is_remote(text):  # as it is: a Path would fold `https://` to `https:/`
            paths.append(text)  # type: ignore[arg-type]
            continue
        if Path(text).exists() or not glob.has_magic(text):
            paths.append(Path(text))
            continue
        matched = sorted(glob.glob(text), key=lambda p: (natural(p), p))
        if not matched:
            raise NotFound(text, "no checkpoint matches this pattern")
        paths += map(Path, matched)
    return paths


def recorded(ckpt: Checkpoint) -> dict[str, float]:
    """The epoch and steps a checkpoint records beside its state_dict (`epoch: 90`)."""
    return {
        e.name: e.value
        for e in ckpt.extras
        if e.name in RECORDED and isinstance(e.value, (int, float)) and not isinstance(e.value, bool)
    }


def by_age(ckpts: Sequence[Checkpoint]) -> tuple[list[Checkpoint], str]:
    """The checkpoints oldest first (the newest last), and what ordered them: the epoch and
    steps every one records (the fields of `RECORDED`), else their names in natural order
    (`checkpoint10.pt` after `checkpoint9.pt`)."""
    fields = [f for f in RECORDED if all(f in recorded(c) for c in ckpts)]

    def age(ckpt: Checkpoint) -> tuple:
        return (tuple(recorded(ckpt)[f] for f in fields), natural(str(ckpt.path)), str(ckpt.path))

    return sorted(ckpts, key=age), ", ".join(fields) or "name"


@dataclass(frozen=True)
class Side:
    """A checkpoint the merge reads (an input, or the base), under the names the merge uses."""

    ckpt: Checkpoint
    role: str  # "input" or "base"
    keys: dict[str, str]  # merged name -> the checkpoint's own key, in file order
    steps: tuple[str, ...]

    def info(self, name: str) -> TensorInfo:
        return self.ckpt.tensors_by_name[self.keys[name]]

    @property
    def ties(self) -> dict[str, str]:
        """The checkpoint's tied names (one tensor, two names) under the names used here:
        alias -> the name stored first."""
        own = {key: name for name, key in self.keys.items()}
        return {own[a]: own[k] for a, k in self.ckpt.aliases.items() if a in own and k in own}


def named(ckpts: Sequence[Checkpoint], rules: KeyRules) -> list[tuple[dict[str, str], tuple[str, ...]]]:
    """Each checkpoint's names after the key rules (merged name -> its key) and the steps taken.

    Without a prefix to strip or add, the wrapper prefixes (`module.`, `_orig_mod.`, `model.`)
    each checkpoint's keys all carry are stripped when that makes more names common to all:
    a DataParallel checkpoint merges with a plain state_dict.
    """

    def apply(ckpt: Checkpoint, strip: tuple[str, ...]) -> tuple[dict[str, str], tuple[str, ...]]:
        kept, steps = replace(rules, strip_prefix=strip).apply(t.name for t in ckpt.tensors)
        return {new: old for old, new in kept.items()}, tuple(steps)

    plain = [apply(c, rules.strip_prefix) for c in ckpts]
    if rules.strip_prefix or rules.add_prefix:
        return plain
    unwrapped = [apply(c, tuple(p for p, _ in wrapper_prefixes(c.prefix))) for c in ckpts]

    def common(names: list[tuple[dict[str, str], tuple[str, ...]]]) -> int:
        return len(set.intersection(*(set(keys) for keys, _ in names)))

    return unwrapped if common(unwrapped) > common(plain) else plain


# -- the plan: names, shapes and dtypes only -------------------------------------------------
@dataclass(frozen=True)
class Taken:
    """An output tensor that is not merged: one checkpoint's own, and why."""

    side: int  # index into the plan's sides
    why: str  # its dtype (never averaged), or how the inputs differ (--strict false)


@dataclass
class MergePlan:
    """What the output holds and where each tensor comes from, decided from the headers."""

    sides: list[Side]  # the base first when there is one, then the inputs (the newest last)
    entries: list[Entry]  # what is written, in order (tied names left out of safetensors outputs)
    merged: list[str]  # output names merged from every input
    kept: dict[str, Taken]  # never averaged (integer, bool): the last input's
    unmerged: dict[str, Taken]  # --strict false: keys the inputs do not hold alike
    aliases: dict[str, str]  # output alias -> output name stored
    cast: dict[str, int]  # "float32 -> bfloat16" -> tensors
    mixed: dict[str, tuple[str, ...]]  # merged names whose dtype differs between inputs -> the dtypes
    copied: dict[str, Taken] = field(default_factory=dict)  # lora: unchanged, or replaced by an adapter's
    deltas: dict[str, list[Delta]] = field(default_factory=dict)  # lora: merged name -> what is added
    starts: dict[str, int] = field(
        default_factory=dict
    )  # lora: name -> the side the deltas add to (not the base)

    @property
    def inputs(self) -> list[int]:
        return [i for i, s in enumerate(self.sides) if s.role == "input"]

    @property
    def adapters(self) -> list[int]:
        return [i for i, s in enumerate(self.sides) if s.role == "adapter"]

    @property
    def base(self) -> int | None:
        return 0 if self.sides[0].role == "base" else None

    def taken(self, name: str) -> Taken | None:
        return self.kept.get(name) or self.unmerged.get(name) or self.copied.get(name)


def plan_merge(sides: list[Side], request: MergeRequest, kind: str) -> MergePlan:
    """The output's names, dtypes and ties, and where each comes from, from headers alone.

    Raises:
        SurgeryError: (strict) an input whose keys or shapes differ from the first checkpoint's,
            naming the first few differences; a tensor surgery cannot rebuild.
    """
    reference = sides[0]
    inputs = [i for i, s in enumerate(sides) if s.role == "input"]
    order = list(dict.fromkeys(name for side in sides for name in side.keys))
    if not order:
        raise UsageError(reference.ckpt.path, "no tensors left after --include/--exclude")
    apart = {i: differences(reference, side) for i, side in enumerate(sides) if i}
    differing = [i for i, found in apart.items() if found]
    if request.strict and differing:
        raise _mismatch(sides, apart, differing)
    merged: list[str] = []
    kept: dict[str, Taken] = {}
    unmerged: dict[str, Taken] = {}
    mixed: dict[str, tuple[str, ...]] = {}
    written: dict[str, TensorInfo] = {}  # what each output tensor is like before any cast
    for name in order:
        holders = [i for i, s in enumerate(sides) if name in s.keys]
        infos = [sides[i].info(name) for i in holders]
        if len(holders) < len(sides) or len({t.shape for t in infos}) > 1:
            source = holders[0]  # the base or the first input, when it holds the name
            missing = [str(s.ckpt.path) for s in sides if name not in s.keys]
            why = f"not in {missing[0]}" if missing else "shapes differ"
            unmerged[name] = Taken(source, why)
            written[name] = sides[source].info(name)
        elif all(t.dtype in FLOATING for t in infos):
            merged.append(name)
            written[name] = infos[0]  # the base's or the first input's dtype
            if len({t.dtype for t in infos}) > 1:
                mixed[name] = tuple(t.dtype for t in infos)
        else:
            written[name] = sides[inputs[-1]].info(name)
            kept[name] = Taken(inputs[-1], written[name].dtype)
        taken = kept.get(name) or unmerged.get(name)
        for side in [sides[taken.side]] if taken else sides:  # what is read for it
            check_readable(side, name)
    dtypes, cast = casts({name: info.dtype for name, info in written.items()}, request.dtype)
    aliases = {} if kind == "dcp" else _ties(sides, merged, kept, unmerged)
    entries = [
        Entry(name, written[name].shape, dtypes[name])
        for name in order
        if not (name in aliases and kind.endswith("safetensors"))
    ]
    return MergePlan(sides, entries, merged, kept, unmerged, aliases, cast, mixed)


def check_readable(side: Side, name: str) -> None:
    """Refuse, before any work, a tensor to be read that surgery cannot rebuild from its bytes.

    Raises:
        SurgeryError: naming the tensor and what it is.
    """
    if side.info(name).note:
        raise SurgeryError(
            side.ckpt.path,
            f"tensor {side.keys[name]!r} is {side.info(name).note}",
            hint="leave it out with --exclude",
        )


def casts(dtypes: Mapping[str, str], dtype: str | None) -> tuple[dict[str, str], dict[str, int]]:
    """Each output tensor's dtype with `dtype` applied to the floating ones, and the casts made
    ("float32 -> bfloat16" -> tensors)."""
    cast: dict[str, int] = {}
    out = dict(dtypes)
    for name, own in dtypes.items():
        if dtype and own in FLOATING and own != dtype:
            change = f"{own} -> {dtype}"
            cast[change] = cast.get(change, 0) + 1
            out[name] = dtype
    return out, cast


@dataclass(frozen=True)
class Differences:
    """How one checkpoint's names and shapes differ from the first's."""

    missing: list[str]
    extra: list[str]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, the first's shape, this one's)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.shapes)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"lacks {len(self.missing)} of its keys ({few_names(self.missing)})")
        if self.extra:
            parts.append(f"holds {plural(len(self.extra), 'key')} it does not ({few_names(self.extra)})")
        if self.shapes:
            shown = ", ".join(f"{n} {list(here)} vs {list(there)}" for n, there, here in self.shapes[:SHOWN])
            more = f" and {len(self.shapes) - SHOWN} more" if len(self.shapes) > SHOWN else ""
            verb = "differs" if len(self.shapes) == 1 else "differ"
            parts.append(f"{plural(len(self.shapes), 'shape')} {verb} ({shown}{more})")
        return "; ".join(parts)


def differences(reference: Side, side: Side) -> Differences:
    return Differences(
        [n for n in reference.keys if n not in side.keys],
        [n for n in side.keys if n not in reference.keys],
        [
            (n, reference.info(n).shape, side.info(n).shape)
            for n in side.keys
            if n in reference.keys and side.info(n).shape != reference.info(n).shape
        ],
    )


def few_names(names: list[str]) -> str:
    groups = group_names(names)
    return ", ".join(groups[:SHOWN]) + (f" and {len(groups) - SHOWN} more" if len(groups) > SHOWN else "")


def _mismatch(sides: list[Side], apart: dict[int, Differences], differing: list[int]) -> SurgeryError:
    """The error for inputs that do not hold the same keys and shapes: the first such input, and
    how it differs from the first checkpoint."""
    first = differing[0]
    others = f"; {plural(len(differing) - 1, 'more checkpoint')} differ too" if len(differing) > 1 else ""
    return SurgeryError(
        sides[first].ckpt.path,
        f"does not match {sides[0].ckpt.path}: {apart[first].describe()}{others}",
        hint="checkpoints of one architecture merge; --strict false merges the keys all hold alike "
        "and takes the others from the base or the first input",
    )


def _ties(
    sides: Sequence[Side], merged: list[str], kept: dict[str, Taken], unmerged: dict[str, Taken]
) -> dict[str, str]:
    """Names tied (one tensor) in every checkpoint, both written alike: alias -> the name stored.
    They are merged once and stay one tensor in the output."""
    common: dict[str, str] | None = None
    for side in sides:
        here = side.ties
        common = here if common is None else {a: k for a, k in common.items() if here.get(a) == k}

    def recipe(name: str) -> Any:
        taken = kept.get(name) or unmerged.get(name)
        return "merged" if name in merged else taken.side if taken else None

    return {a: k for a, k in (common or {}).items() if recipe(a) is not None and recipe(a) == recipe(k)}


# -- the report -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeInput:
    """A checkpoint the merge read, as the report shows it."""

    path: str
    role: str  # "input" or "base"
    format: str
    container: tuple[str, ...] | None
    recorded: dict[str, float]  # epoch, global_step, step, as recorded beside the state_dict
    steps: tuple[str, ...]  # what the key rules did to its names
    weight: float | None = None  # weighted: its share, normalised
    files: dict[str, str | None] = field(default_factory=dict)  # every file read -> its sha256 (once written)

    def describe(self) -> str:
        where = ".".join(self.container or ()) or "(top level)"
        parts = [f"{self.path}: {where} ({self.format})"]
        if self.recorded:
            parts.append(", ".join(f"{k} {v:g}" for k, v in self.recorded.items()))
        if self.weight is not None:
            parts.append(f"weight {self.weight:.4g}")
        return "; ".join(parts + list(self.steps))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "role": self.role,
            "format": self.format,
            "container": list(self.container) if self.container is not None else None,
            "recorded": self.recorded,
            "steps": list(self.steps),
            "weight": self.weight,
            "files": [{"path": p, "sha256": digest} for p, digest in self.files.items()],
        }


@dataclass(frozen=True)
class Selection:
    """Which of the inputs `last` kept, and what ordered them."""

    last: int
    of: int
    by: str  # "epoch", "epoch, global_step", or "name"
    left_out: tuple[str, ...]

    def describe(self) -> str:
        by = f"by {self.by}" if self.by == "name" else f"by the {self.by} recorded in each"
        return f"the {self.last} newest of {self.of} {by}"

    def to_json(self) -> dict[str, Any]:
        return {"last": self.last, "of": self.of, "by": self.by, "left_out": list(self.left_out)}


@dataclass(frozen=True)
class MergeReport:
    """What a merge read, how it merged, and what it wrote."""

    inputs: tuple[MergeInput, ...]  # the base first when there is one, then the inputs merged in order
    output: str
    output_format: str
    options: MergeRequest
    tensors: int
    bytes_out: int
    merged: int  # tensors merged from every input
    kept: dict[str, str]  # never averaged: name -> its dtype, from `kept_from`
    kept_from: str | None
    unmerged: dict[str, tuple[str, str]]  # --strict false: name -> (the checkpoint it is from, why)
    selection: Selection | None = None
    cast: dict[str, int] = field(default_factory=dict)
    mixed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> each input's dtype
    aliases: dict[str, str] = field(default_factory=dict)
    adapters: tuple[AdapterUse, ...] = ()  # lora: each adapter, what it does
    replaced: dict[str, str] = field(default_factory=dict)  # lora: name -> the adapter whose tensor it is
    unchanged: int = 0  # lora: tensors no adapter touches, copied from the base
    lossy: dict[str, CastLosses] = field(default_factory=dict)  # name -> what its cast lost past rounding
    shards: tuple[str, ...] = ()
    seconds: float = 0.0
    written: bool = False
    verified: int | None = None

    @property
    def method(self) -> str:
        """The method and its parameters, in words: `mean of 5 inputs`."""
        request, params = self.options, self.options.params
        n = sum(i.role == "input" for i in self.inputs)
        if request.method == "lora":
            sign, verb = ("-", "unmerged") if request.unmerge else ("+", "merged")
            weights = f", weights {', '.join(f'{w:g}' for w in params.weights)}" if params.weights else ""
            return f"LoRA {verb}: base {sign} the adapters' s·B·A ({plural(len(self.adapters), 'adapter')}{weights})"
        if request.method == "mean":
            return f"mean of {n} inputs"
        if request.method == "weighted":
            return f"weighted mean of {n} inputs, weights {', '.join(f'{w:.4g}' for w in normalised(params.weights))}"
        if request.method == "task-arithmetic":
            return f"task arithmetic: base + {params.scale:g} x the sum of {n} task vectors (input - base)"
        if request.method == "ties":
            return (
                f"TIES: base + {params.scale:g} x the disjoint mean of {n} task vectors, each trimmed to its "
                f"largest {params.density:.0%} by magnitude, signs elected by their sum"
            )
        return f"SLERP at t = {params.t:g} (lerp where the two are nearly colinear)"

    def summary(self) -> str:
        if self.lossy and not self.written:
            return f"refused: the cast of {plural(len(self.lossy), 'tensor')} loses values; nothing written"
        text = f"{plural(self.tensors, 'tensor')}, {human_bytes(self.bytes_out)}"
        text = f"wrote {text} in {self.seconds:.2f} s" if self.written else f"would write {text} (--dry-run)"
        if self.adapters:
            parts = [f"{self.merged} changed by the adapters"]
            parts += [f"{len(self.replaced)} replaced whole"] * bool(self.replaced)
            return f"{text}: {', '.join([*parts, f'{self.unchanged} unchanged'])}"
        parts = [f"{self.merged} merged"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept from the {'newest' if self.selection else 'last'} input")
        if self.unmerged:
            parts.append(f"{len(self.unmerged)} not merged (--strict false)")
        return f"{text}: {', '.join(parts)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "summary": self.summary(),
            "method": self.options.method_json(),
            "inputs": [i.to_json() for i in self.inputs],
            "selection": self.selection.to_json() if self.selection else None,
            "output": self.output,
            "output_format": self.output_format,
            "options": self.options.rules_json(),
            "tensors": self.tensors,
            "bytes": self.bytes_out,
            "merged": self.merged,
            "kept": {name: {"dtype": dtype, "from": self.kept_from} for name, dtype in self.kept.items()},
            "not_merged": {name: {"from": src, "why": why} for name, (src, why) in self.unmerged.items()},
            "dtypes_differ": {name: list(d) for name, d in self.mixed.items()},
            "cast": self.cast,
            "lossy_cast": {name: losses.to_json() for name, losses in self.lossy.items()},
            "aliases": self.aliases,
            **(
                {
                    "adapters": [a.to_json() for a in self.adapters],
                    "replaced": self.replaced,
                    "unchanged": self.unchanged,
                }
                if self.adapters
                else {}
            ),
            "shards": list(self.shards),
            "seconds": round(self.seconds, 3),
            "written": self.written,
            "verified": self.verified,
        }


# -- the library calls ------------------------------------------------------------------------
def merge(
    inputs: Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    method: str | None = None,
    weights: Sequence[float] | str = (),
    base: str | Path | None = None,
    scale: float | None = None,
    density: float | None = None,
    t: float | None = None,
    dtype: str | None = None,
    strict: bool = True,
    last: int | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    add_prefix: str | None = None,
    rename: Sequence[str | Rename] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    format: str = "auto",
    shard_size: str | int | None = None,
    adapters: Sequence[str | Path] = (),
    unmerge: bool = False,
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    trust: bool = False,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> MergeReport:
    """Merge checkpoints of one model into `out`, streaming, atomically (`merge_file` with a request).

    Args:
        inputs: two checkpoints or more, any formats (a glob such as `runs/*.pt` stands for its matches).
        method: mean (default; weighted when `weights` are given) | weighted | task-arithmetic | ties | slerp.
        weights: weighted: one per input, normalised to sum 1.
        base: task-arithmetic and ties: the checkpoint the inputs were fine-tuned from.
        scale: task-arithmetic and ties: λ, the task vectors' scale (1).
        density: ties: the share of each task vector's elements kept, by magnitude (0.2).
        t: slerp: from 0 (the first input) to 1 (the second) (0.5).
        dtype: bf16 | fp16 | fp32 | fp64: every floating tensor written (else each its own).
        strict: refuse inputs whose keys or shapes differ (else merge what all hold alike).
        last: merge only the N newest inputs, by the epoch or step each records, else by name.
        key, strip_prefix, add_prefix, rename, include, exclude: as for `surgery.convert`, on every input.
        format, shard_size: the output, as for `surgery.convert` (no hf folder).
        adapters: PEFT LoRA adapter folders to merge into the one input, the base (`weights`:
            each adapter's factor, 1 each); an adapter tensor that lands on nothing is an error.
        unmerge: subtract the adapters instead (a merged model back to its base).
        verify: re-read the output before it is put in place; every tensor must be as merged.
        trust: read the tensors of inputs with unsafe findings (never executed).
        progress: called once with (tensors, bytes) to announce the work; returns the function
            told how many bytes each written tensor added.

    Raises:
        BadArgument: a parameter that cannot work, named.
        UsageError: an output that would lose data (an input, or existing without `force`).
        SurgeryError: an unreadable or unsafe input, inputs that differ (strict), a failed write
            (nothing is left behind).

    Example:
        >>> surgery.merge(["run/epoch8.pt", "run/epoch9.pt", "run/epoch10.pt"], "averaged.safetensors")
        >>> surgery.merge("base.safetensors", "merged.safetensors", adapters=["lora-run/"])
    """
    fields = {k: v for k, v in locals().items() if k not in ("inputs", "progress")}
    fields["inputs"] = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    fields["adapters"] = [str(p) for p in adapters]
    fields["out"] = str(out)
    return merge_file(MergeRequest.from_fields(fields), progress=progress)


def merge_file(
    request: MergeRequest, *, progress: Callable[[int, int], Callable[[int], None]] | None = None
) -> MergeReport:
    """`surgery merge` as a library call: the request's inputs merged into its output.

    Args:
        progress: called once with (tensors, bytes) to announce the work; returns the
            function told how many bytes each written tensor added.
    """
    if request.adapters:
        from surgery.commands.adapters import plan_adapter_merge

        plan, report, files = plan_adapter_merge(request)
    else:
        plan, report, files = _plan_inputs(request)
    if request.dry_run:
        return report
    return write_merge(plan, report, request, files, progress)


def _plan_inputs(request: MergeRequest) -> tuple[MergePlan, MergeReport, list[Path]]:
    """Open the inputs (headers only), check the output's place, plan the merge: the plan, the
    report of what would be written, and every file read."""
    paths = expand(request.inputs)
    check_counts(request, len(paths))
    opened = [open_headers(p, key=request.keys.key) for p in paths]  # headers only, where ranges read them
    # --last's left-out ones too: never written over (a URL's files are not on this disk)
    given_files = [p for c in opened if c.remote is None for p in c.files]
    selection = None
    if request.last is not None:
        ordered, by = by_age(opened)
        cut = len(ordered) - request.last
        selection = Selection(request.last, len(paths), by, tuple(str(c.path) for c in ordered[:cut]))
        opened = ordered[cut:]
    checkpoints = [open_trusted(c, trust=request.trust, purpose="merge") for c in opened]
    roles = ["input"] * len(checkpoints)
    if request.base is not None:
        base = open_trusted(request.base, key=request.keys.key, trust=request.trust, purpose="merge")
        checkpoints, roles = [base, *checkpoints], ["base", *roles]
    out = Path(request.out)
    kind = output_format(out, request)
    files = list(dict.fromkeys(p for c in checkpoints for p in c.files))
    check_output(out, kind, given_files + files, force=request.force)
    sides = [
        Side(c, role, keys, steps)
        for c, role, (keys, steps) in zip(checkpoints, roles, named(checkpoints, request.keys), strict=True)
    ]
    plan = plan_merge(sides, request, kind)
    return plan, _report(plan, request, out, kind, selection), files


def check_output(out: Path, kind: str, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that would overwrite an input, or exist already (without `force`)."""
    check = check_folder_destination if kind in FOLDERS else check_destination
    check(out, list(dict.fromkeys(inputs)), force=force)


def write_merge(
    plan: MergePlan,
    report: MergeReport,
    request: MergeRequest,
    files: Sequence[Path],
    progress: Callable[[int, int], Callable[[int], None]] | None,
) -> MergeReport:
    """Write the planned output, one tensor at a time, atomically; hash every file read meanwhile."""
    _check_expansion(plan)
    from surgery.commands.port_files import SourceDigests

    out, kind = Path(report.output), report.output_format
    with SourceDigests(files) as digests:  # hashed beside the imports; the header holds the digests
        import torch  # noqa: F401 - while the inputs are hashed

        started = time.perf_counter()
        sha256 = {str(p): d for p, d in digests.result().items()}
        report = replace(
            report, inputs=tuple(replace(i, files={p: sha256[p] for p in i.files}) for i in report.inputs)
        )
        tick = progress(len(plan.entries), report.bytes_out) if progress is not None else None
        src = _Merged(
            plan, request, streams=kind.endswith("safetensors") or streams_torch(plan.entries), tick=tick
        )
        checked: list[int] = []

        def check(written: Path) -> None:  # before the rename: an output that fails is never put in place
            digests.check_unchanged()
            if src.lossy and not request.allow_lossy_cast:
                raise LossyCast(out, replace(report, lossy=dict(src.lossy)), dict(src.lossy))
            if request.verify:
                checked.append(_verify(written, plan, src, where=out))

        metadata = _provenance(plan, request, sha256)
        shards = WRITERS[kind](Output(out, kind, plan, src, metadata, check), request)
    return replace(
        report,
        lossy=dict(src.lossy),
        shards=tuple(shards),
        seconds=time.perf_counter() - started,
        written=True,
        verified=checked[0] if checked else None,
    )


def check_counts(request: MergeRequest, given_inputs: int) -> None:
    """Enough inputs for the method, and as many weights as inputs merged.

    Raises:
        BadArgument: naming `inputs`, `last` or `weights`.
    """
    method = METHODS[request.method]
    if request.last is not None and request.last > given_inputs:
        raise BadArgument("last", f"--last {request.last}, but {plural(given_inputs, 'input')} given")
    count = request.last if request.last is not None else given_inputs
    least = 1 if method.needs_base or method.inputs == 1 else 2
    if request.adapters and count != 1:
        raise BadArgument("inputs", f"--adapter merges adapters into one checkpoint, the base: {count} given")
    if count < least:
        what = "a checkpoint besides the base" if method.needs_base else "at least two checkpoints"
        raise BadArgument("inputs", f"name {what} to merge ({count} given)")
    if method.inputs is not None and count != method.inputs:
        raise BadArgument(
            "inputs", f"{request.method} merges exactly {method.inputs} checkpoints, not {count}"
        )
    weighed = (len(request.adapters), "adapter") if request.adapters else (count, "input")
    if request.weights and len(request.weights) != weighed[0]:
        raise BadArgument(
            "weights",
            f"{plural(len(request.weights), 'weight')} for {plural(*weighed)}: give one per {weighed[1]}",
        )


def _report(
    plan: MergePlan, request: MergeRequest, out: Path, kind: str, selection: Selection | None
) -> MergeReport:
    shares = normalised(request.weights) if request.weights else ()
    inputs = []
    for i, side in enumerate(plan.sides):
        weight = shares[plan.inputs.index(i)] if shares and side.role == "input" else None
        ckpt = side.ckpt
        files = dict.fromkeys(str(p) for p in ckpt.files)
        inputs.append(
            MergeInput(
                str(ckpt.path),
                side.role,
                ckpt.format,
                ckpt.container,
                recorded(ckpt),
                side.steps,
                weight,
                files,
            )
        )
    newest_input = str(plan.sides[plan.inputs[-1]].ckpt.path)
    return MergeReport(
        tuple(inputs),
        str(out),
        kind,
        request,
        tensors=len(plan.entries) + (len(plan.aliases) if kind.endswith("safetensors") else 0),
        bytes_out=sum(e.nbytes for e in plan.entries if e.name not in plan.aliases),
        merged=len(plan.merged),
        kept={name: taken.why for name, taken in plan.kept.items()},
        kept_from=newest_input if plan.kept else None,
        unmerged={name: (str(plan.sides[t.side].ckpt.path), t.why) for name, t in plan.unmerged.items()},
        selection=selection,
        cast=plan.cast,
        mixed=plan.mixed,
        aliases=plan.aliases,
    )


def _check_expansion(plan: MergePlan) -> None:
    """Refuse an output of more than MAX_OUTPUT_RATIO times the largest input's files: views
    that repeat stored bytes (stride 0) would be merged element by element, for days.

    Raises:
        SurgeryError: naming the largest output tensor and the sizes.
    """
    nbytes = sum(e.nbytes for e in plan.entries if e.name not in plan.aliases)
    stored = max(sum(p.stat().st_size for p in s.ckpt.files) for s in plan.sides)
    if nbytes <= MAX_OUTPUT_RATIO * stored:
        return
    largest = max(plan.entries, key=lambda e: e.nbytes)
    raise SurgeryError(
        plan.sides[0].ckpt.path,
        f"the output would be {human_bytes(nbytes)}, {nbytes / max(stored, 1):,.0f}x the largest input "
        f"({human_bytes(stored)}): tensor {largest.name!r} alone is {human_bytes(largest.nbytes)}",
        hint="views that repeat their bytes (stride 0) are merged in full: leave the tensor out with --exclude",
    )


# -- the tensors, one at a time -----------------------------------------------------------------
class _Merged:
    """Hands the writer each output tensor: merged piece by piece from every input (float64,
    then cast to its dtype), or one checkpoint's own (as raw bytes where they lie as they are),
    released once written. Keeps the sha256 of every tensor it made, for `verify`."""

    def __init__(
        self, plan: MergePlan, request: MergeRequest, *, streams: bool, tick: Callable[[int], None] | None
    ):
        self.plan, self.request, self.streams, self.tick = plan, request, streams, tick
        self.entries = {e.name: e for e in plan.entries}
        self.digests: dict[str, str] = {}  # output name -> the sha256 of the bytes made
        self.lossy: dict[str, CastLosses] = {}  # output name -> what its cast lost past rounding

    def get(self, name: str) -> torch.Tensor | RawBytes | Pieces:
        import torch

        entry = self.entries[name]
        dtype = getattr(torch, entry.dtype)
        taken = self.plan.taken(name)
        if taken is not None:
            side = self.plan.sides[taken.side]
            key = side.keys[name]
            where = side.ckpt.byte_range(key)
            if where is not None and self.streams and side.info(name).dtype == entry.dtype:
                return RawBytes(*where)
            own = side.info(name).dtype
            pieces = self._cast(name, side.ckpt.pieces(key, PIECE), own, entry.dtype, narrowing=True)
        else:
            sides = self.plan.sides
            inputs = [_stream(sides[i], name) for i in self.plan.inputs]
            adapters = self.plan.adapters
            inputs += [_delta(sides[adapters[d.adapter]], d) for d in self.plan.deltas.get(name, ())]
            start = self.plan.starts.get(name, 0)  # PEFT's saved copy of a layer's weight, else the base
            base = _stream(sides[start], name) if self.plan.base is not None else None
            merged = merge_pieces(self.request.method, inputs, base, self.request.params)
            own = sides[0].info(name).dtype  # the base's, or the first input's
            pieces = self._cast(name, merged, own, entry.dtype, narrowing=own != entry.dtype)
        chunks = self._hashed(name, pieces)
        if self.streams:
            return Pieces(chunks)
        flat = [torch.frombuffer(chunk, dtype=torch.uint8) for chunk in chunks]
        if not flat:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.cat(flat).view(dtype).reshape(entry.shape)

    def _cast(
        self, name: str, pieces: Iterator[torch.Tensor], own: str, dtype: str, *, narrowing: bool
    ) -> Iterator[torch.Tensor]:
        """The pieces cast to the output's dtype, what each cast lost past rounding kept in
        `lossy`: overflow to inf and NaN always (a merged value out of its dtype's range), values
        flushed to zero when the output's dtype is narrower than the tensor's own (`dtype`)."""
        import torch

        from surgery.casts import CastLosses, count_losses, may_lose, tally

        target = getattr(torch, dtype)
        for piece in pieces:
            cast = piece.to(target, copy=True)
            source = str(piece.dtype).removeprefix("torch.")
            if may_lose(source, dtype):
                lost = count_losses(
                    piece.view(torch.uint8).numpy(), cast.view(torch.uint8).numpy(), source, dtype
                )
                lost = CastLosses(own, dtype, lost.overflow, lost.nan, lost.flushed if narrowing else 0)
                tally(self.lossy, name, lost)
            yield cast

    def _hashed(self, name: str, pieces: Iterator[torch.Tensor]) -> Iterator[memoryview]:
        """Each piece's bytes, their sha256 kept once the last has gone by."""
        import torch

        digest = hashlib.sha256()
        for piece in pieces:
            chunk = memoryview(piece.contiguous().view(torch.uint8).numpy())
            digest.update(chunk)
            yield chunk
        self.digests[name] = digest.hexdigest()

    def done(self, name: str) -> None:
        for side in self.plan.sides:
            if name in side.keys:
                side.ckpt.release(side.keys[name])
        for delta in self.plan.deltas.get(name, ()):
            factors = self.plan.sides[self.plan.adapters[delta.adapter]].ckpt
            for key in filter(None, (delta.a, delta.b)):
                factors.release(key)
        if self.tick is not None and name not in self.plan.aliases:  # a tied name's bytes are its kept name's
            self.tick(self.entries[name].nbytes)


def _stream(side: Side, name: str) -> Stream:
    """A checkpoint's tensor as flat pieces, read afresh at each call."""
    key = side.keys[name]
    return lambda: side.ckpt.pieces(key, PIECE)


def _delta(side: Side, delta: Delta) -> Stream:
    """An adapter's delta to one tensor as flat float64 pieces, made afresh at each call."""

    def read() -> Iterator[torch.Tensor]:
        a = side.ckpt.tensor(delta.a) if delta.a is not None else None
        return lora_delta(delta.layout, a, side.ckpt.tensor(delta.b), delta.scaling, PIECE)

    return read


def _verify(written: Path, plan: MergePlan, src: _Merged, where: Path) -> int:
    """Re-read every tensor of the output: a merged one must hold the bytes made (its sha256),
    one taken from a checkpoint that checkpoint's. Returns how many were checked."""
    import torch

    from surgery.commands.diff import same_tensor

    reread = open_checkpoint(written)
    names = [e.name for e in plan.entries] + [a for a in plan.aliases if a not in src.entries]
    present = {t.name for t in reread.tensors}
    for name in names:
        if name not in present:
            raise SurgeryError(where, f"verify: tensor {name!r} is not in the output")
        made = plan.aliases.get(name, name)
        if made in src.digests:
            digest = hashlib.sha256()
            for piece in reread.pieces(name, PIECE):
                digest.update(memoryview(piece.view(torch.uint8).numpy()))
            same = digest.hexdigest() == src.digests[made]
        else:
            side = plan.sides[plan.taken(made).side]  # copied as raw bytes
            same = same_tensor(side.ckpt, side.keys[made], reread, name)
        if not same:
            raise SurgeryError(where, f"verify: tensor {name!r} is not what was merged")
    return len(names)


def _provenance(plan: MergePlan, request: MergeRequest, sha256: dict[str, str]) -> dict[str, str]:
    """Where the output came from: every checkpoint read with its role and every file with its
    sha256, the method and its parameters, the key rules."""
    origins = {str(f): s.ckpt.origin(f) for s in plan.sides for f in s.ckpt.files}  # a download's: its URL
    meta = {
        "format": "pt",
        "surgery.version": __version__,
        "surgery.merge": json.dumps(request.method_json()),
        "surgery.inputs": json.dumps(
            [
                {
                    "path": str(s.ckpt.path),
                    "role": s.role,
                    "container": ".".join(s.ckpt.container or ()) or "(top level)",
                    "recorded": recorded(s.ckpt),
                }
                for s in plan.sides
            ]
        ),
        "surgery.source_files": json.dumps(
            [
                {"path": origins.get(p) or str(Path(p).resolve()), "sha256": digest}
                for p, digest in sha256.items()
            ]
        ),
        "surgery.rules": json.dumps(request.rules_json()),
    }
    if plan.aliases:
        meta[ALIASES_KEY] = json.dumps(plan.aliases)
    return meta
