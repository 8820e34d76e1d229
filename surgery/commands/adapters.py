"""`surgery merge BASE --adapter DIR`: PEFT LoRA adapters merged into a base checkpoint (or,
with `unmerge`, taken out of a merged one), streamed.

An adapter folder is what PEFT's `save_pretrained` writes: `adapter_config.json` beside
`adapter_model.safetensors` (or `adapter_model.bin`, read by the restricted reader, never run).
Which base tensor each adapter tensor changes is planned from names and shapes alone
(`plans.adapters`), so `--dry-run` shows it and an adapter that lands on nothing is refused
before any work. The merge then runs through `merge`'s machinery: each changed tensor is the
base's, piece by piece, plus each adapter's s·B·A made a block of rows at a time, in float64,
written in the base's dtype (or `dtype`); every other tensor is copied as it lies.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from surgery.commands.convert import FLOATING, output_format
from surgery.commands.merge import (
    MergeInput,
    MergePlan,
    MergeReport,
    MergeRequest,
    Side,
    Taken,
    casts,
    check_counts,
    check_output,
    check_readable,
    expand,
    named,
)
from surgery.errors import CorruptCheckpoint, NotFound, SurgeryError
from surgery.formats.base import is_hub
from surgery.formats.checkpoint import Checkpoint, open_trusted
from surgery.plans.adapters import AdapterPlan, AdapterTensors, AdapterUse, Delta, LoraConfig, plan_adapters
from surgery.values import Entry

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # as PEFT saves them, preferred first


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter folder, opened: its config and its tensors (headers only)."""

    path: str  # as given
    config: LoraConfig
    ckpt: Checkpoint
    config_file: Path

    @property
    def files(self) -> list[Path]:
        return [*self.ckpt.files, self.config_file]


def read_adapter(path: str | Path, *, trust: bool = False) -> Adapter:
    """Open an adapter folder (or its weights file, the config beside it), or one on the Hub
    (`hf://USER/ADAPTER[@REVISION][/FOLDER]`: its config and weights downloaded into the Hub
    cache, then read as a folder; a `.bin` is judged there, as on disk).

    Raises:
        NotFound: no folder, or no config or weights file in it.
        CorruptCheckpoint: a config that is not JSON.
        SurgeryError: not a LoRA config, an unsafe `.bin` (without `trust`), unreadable weights.
    """
    if is_hub(str(path)):
        from surgery.formats.download import download_hub_folder

        given = download_hub_folder(str(path), ((CONFIG,), WEIGHTS))
    else:
        given = Path(path)
    if not given.exists():
        raise NotFound(path, "no such adapter folder")
    folder = given.parent if given.is_file() else given
    config_file = folder / CONFIG
    if not config_file.is_file():
        raise NotFound(path, f"holds no {CONFIG}: not a PEFT adapter folder")
    weights = [given] if given.is_file() and given.name != CONFIG else [folder / w for w in WEIGHTS]
    weights = [w for w in weights if w.is_file()]
    if not weights:
        raise NotFound(path, f"holds no {' or '.join(WEIGHTS)}")
    try:
        doc = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(config_file, f"is not a readable JSON config ({e})") from None
    config = LoraConfig.from_json(doc, str(config_file))
    return Adapter(str(path), config, open_trusted(weights[0], trust=trust, purpose="merge"), config_file)


def plan_adapter_merge(request: MergeRequest) -> tuple[MergePlan, MergeReport, list[Path]]:
    """Open the base and the adapters (headers only), check the output's place, plan the merge:
    the plan, the report of what would be written, and every file read.

    Raises:
        SurgeryError: an unreadable or unsafe base or adapter; adapter tensors that land on
            nothing or do not fit (`plans.adapters.plan_adapters`).
    """
    paths = expand(request.inputs)
    check_counts(request, len(paths))
    base = open_trusted(paths[0], key=request.keys.key, trust=request.trust, purpose="merge")
    adapters = [read_adapter(a, trust=request.trust) for a in request.adapters]
    out = Path(request.out)
    kind = output_format(out, request)
    files = list(dict.fromkeys([*base.files, *(f for a in adapters for f in a.files)]))
    check_output(out, kind, files, force=request.force)
    [(keys, steps)] = named([base], request.keys)
    side = Side(base, "base", keys, steps)
    weights = request.weights or (1.0,) * len(adapters)
    sign = -1.0 if request.unmerge else 1.0
    lora = plan_adapters(
        [
            AdapterTensors(a.path, a.config, {t.name: t.shape for t in a.ckpt.tensors}, sign * w)
            for a, w in zip(adapters, weights, strict=True)
        ],
        {name: side.info(name).shape for name in keys},
        unmerge=request.unmerge,
    )
    plan = _plan(side, adapters, lora, request, kind)
    uses = tuple(
        AdapterUse(
            a.path,
            a.ckpt.format,
            a.config,
            w,
            dict(Counter(d.layout for ds in lora.deltas.values() for d in ds if d.adapter == i)),
            sum(r.adapter == i for r in lora.replaced.values()),
            lora.renamed,
        )
        for i, (a, w) in enumerate(zip(adapters, weights, strict=True))
    )
    inputs = (
        MergeInput(str(base.path), "base", base.format, base.container, {}, steps, None, _files(base.files)),
        *(
            MergeInput(a.path, "adapter", a.ckpt.format, None, {}, lora.renamed, w, _files(a.files))
            for a, w in zip(adapters, weights, strict=True)
        ),
    )
    report = MergeReport(
        inputs,
        str(out),
        kind,
        request,
        tensors=len(plan.entries) + (len(plan.aliases) if kind.endswith("safetensors") else 0),
        bytes_out=sum(e.nbytes for e in plan.entries if e.name not in plan.aliases),
        merged=sum(name not in plan.aliases for name in plan.merged),  # a tied pair: one tensor
        kept={},
        kept_from=None,
        unmerged={},
        cast=plan.cast,
        aliases=plan.aliases,
        adapters=uses,
        replaced={name: adapters[r.adapter].path for name, r in lora.replaced.items()},
        unchanged=sum(t.why == "unchanged" for t in plan.copied.values()),
    )
    return plan, report, files


def _files(paths: list[Path]) -> dict[str, str | None]:
    return dict.fromkeys(str(p) for p in paths)


def _plan(
    side: Side, adapters: list[Adapter], lora: AdapterPlan, request: MergeRequest, kind: str
) -> MergePlan:
    """The merge's plan: the base's names, in its order; tensors with deltas merged, tensors an
    adapter replaces taken from it, the rest copied. Tied names stay tied unless an adapter
    replaces one of them; a delta to either lands on both.

    Raises:
        SurgeryError: a delta to a tensor that is not floating; a tensor surgery cannot rebuild.
    """
    ties = side.ties
    whole = {n for n in lora.replaced if n not in lora.deltas}  # not PEFT's copy of a layer's base weight
    ties = {a: k for a, k in ties.items() if a not in whole and k not in whole}
    deltas: dict[str, list[Delta]] = dict(lora.deltas)
    for alias, kept in ties.items():  # one tensor: what changes one name changes the other
        both = [*deltas.get(kept, ()), *deltas.get(alias, ())]
        if both:
            deltas[kept] = deltas[alias] = both
    sides = [side] + [
        Side(a.ckpt, "adapter", {n: r.key for n, r in lora.replaced.items() if r.adapter == i}, lora.renamed)
        for i, a in enumerate(adapters)
    ]
    written: dict[str, str] = {}
    copied: dict[str, Taken] = {}
    starts: dict[str, int] = {}
    for name in side.keys:
        info = side.info(name)
        if name in deltas and info.dtype not in FLOATING:
            raise SurgeryError(
                side.ckpt.path,
                f"tensor {side.keys[name]!r} is {info.dtype}: a LoRA delta adds to floating weights",
            )
        replacement = lora.replaced.get(name)
        if replacement is not None and name in deltas:  # PEFT's copy of the layer's base weight
            starts[name] = 1 + replacement.adapter
        elif replacement is not None:
            copied[name] = Taken(1 + replacement.adapter, f"from {adapters[replacement.adapter].path}")
        elif name not in deltas:
            copied[name] = Taken(0, "unchanged")
        read = copied[name].side if name in copied else starts.get(name, 0)
        check_readable(sides[read], name)
        written[name] = info.dtype  # the base's dtype, a replacement's too
    dtypes, cast = casts(written, request.dtype)
    aliases = {} if kind == "dcp" else ties
    entries = [
        Entry(name, side.info(name).shape, dtypes[name])
        for name in side.keys
        if not (name in aliases and kind.endswith("safetensors"))
    ]
    merged = [name for name in side.keys if name in deltas]
    return MergePlan(sides, entries, merged, {}, {}, aliases, cast, {}, copied, deltas, starts)
