"""`surgery extract`: what a fine-tune changed, written as a PEFT LoRA adapter folder that PEFT
itself loads (`PeftModel.from_pretrained`) and `surgery merge BASE --adapter` merges back.

Each changed weight of a linear or conv layer becomes its difference's truncated SVD at the rank
asked (the best approximation of that rank), with `lora_alpha = r` so PEFT's scaling is 1; what
PEFT cannot hold as factors is kept whole (`plans.extract`). Two passes over the checkpoints, one
tensor pair at a time: the first finds what changed and makes the factors (small: r × (in + out)
each), the second writes them with the whole tensors read again. The report says, per layer, the
share of the difference the rank leaves out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from surgery import __version__
from surgery.commands.convert import FLOATING
from surgery.commands.merge import DTYPES, Side, differences, few_names, named
from surgery.commands.requests import Request, given
from surgery.errors import BadArgument, SurgeryError
from surgery.formats.checkpoint import open_trusted
from surgery.plans.adapters import PEFT_PREFIX
from surgery.plans.extract import ExtractLayout, extract_layout
from surgery.plans.keys import KeyRules, Rename
from surgery.text import human_bytes, plural
from surgery.values import Entry
from surgery.writers.outputs import atomic_folder, check_folder_destination

if TYPE_CHECKING:
    import torch

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ExtractRequest(Request):
    """Everything `surgery extract` does, as one value.

    Example:
        >>> surgery.extract_file(ExtractRequest("tuned.safetensors", "base.safetensors", "lora/", rank=16))
    """

    finetuned: str
    base: str
    out: str
    rank: int
    fan_in_fan_out: bool = False  # 2-D weights are GPT-2 Conv1D's (in, out)
    dtype: str | None = None  # the factors' dtype (else each weight's own)
    keys: KeyRules = KeyRules()
    dry_run: bool = False
    force: bool = False
    trust: bool = False

    FILE_FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "finetuned": str,
        "base": str,
        "out": str,
        "rank": int,
        "fan_in_fan_out": bool,
        "dtype": str,
        **KeyRules.FILE_FIELDS,
    }

    def __post_init__(self) -> None:
        if not self.out:
            raise BadArgument("out", "say which folder to write the adapter to (-o DIR)")
        if not self.base:
            raise BadArgument("base", "say which checkpoint was fine-tuned (--base BASE)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BadArgument("rank", f"the LoRA rank is a positive integer, not {self.rank!r}")
        if self.dtype is not None and self.dtype not in FLOATING:
            raise BadArgument("dtype", f"{self.dtype!r} is not one of bf16, fp16, fp32, fp64")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, file: str | None = None, from_file: frozenset = frozenset()
    ) -> ExtractRequest:
        fields = given(fields)
        dtype = fields.get("dtype")
        if dtype is not None and str(dtype).lower() not in DTYPES:
            raise BadArgument("dtype", f"{dtype!r} is not one of bf16, fp16, fp32, fp64")
        rank = fields.get("rank")
        if rank is None:
            raise BadArgument("rank", "say the LoRA rank (--rank R)")
        return cls(
            finetuned=str(fields.get("finetuned") or ""),
            base=str(fields.get("base") or ""),
            out=str(fields.get("out") or ""),
            rank=rank,
            fan_in_fan_out=bool(fields.get("fan_in_fan_out")),
            dtype=None if dtype is None else DTYPES[str(dtype).lower()],
            keys=KeyRules.from_fields(fields),
            dry_run=bool(fields.get("dry_run")),
            force=bool(fields.get("force")),
            trust=bool(fields.get("trust")),
        )


def share(error: float) -> str:
    """A relative error in words: 1.25%, or 3.1e-08 when it rounds to no percent."""
    return f"{error:.2%}" if error >= 1e-4 else f"{error:.1e}"


@dataclass(frozen=True)
class LayerError:
    """How well the rank holds one layer's difference: ‖Δ - B A‖ / ‖Δ‖."""

    name: str
    error: float


@dataclass(frozen=True)
class ExtractReport:
    """What `surgery extract` found changed and wrote."""

    finetuned: str
    base: str
    output: str
    rank: int
    tensors: int  # in the checkpoints
    changed: int
    lora: dict[str, str]  # weight -> layout
    biases: list[str]
    modules: list[str]  # modules_to_save
    errors: tuple[LayerError, ...]  # every LoRA layer, the worst first
    bytes_out: int = 0
    bytes_model: int = 0
    files: dict[str, str | None] = field(default_factory=dict)  # every file read -> its sha256
    seconds: float = 0.0
    written: bool = False

    def summary(self) -> str:
        worst = f", at most {share(self.errors[0].error)} of a layer's change left out" if self.errors else ""
        what = f"{plural(len(self.lora), 'LoRA layer')} at rank {self.rank}{worst}"
        what += f", {plural(len(self.modules), 'module')} whole" if self.modules else ""
        what += f", {len(self.biases)} LoRA-layer bias{'es' * (len(self.biases) != 1)}" if self.biases else ""
        size = f"{human_bytes(self.bytes_out)} ({self.bytes_out / max(self.bytes_model, 1):.1%} of the model)"
        text = f"wrote {size} in {self.seconds:.2f} s" if self.written else f"would write {size} (--dry-run)"
        return f"{text}: {self.changed} of {plural(self.tensors, 'tensor')} changed; {what}"

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "summary": self.summary(),
            "finetuned": self.finetuned,
            "base": self.base,
            "output": self.output,
            "rank": self.rank,
            "tensors": self.tensors,
            "changed": self.changed,
            "lora": self.lora,
            "biases": self.biases,
            "modules_to_save": self.modules,
            "errors": {e.name: round(e.error, 6) for e in self.errors},
            "bytes": self.bytes_out,
            "bytes_model": self.bytes_model,
            "files": [{"path": p, "sha256": d} for p, d in self.files.items()],
            "seconds": round(self.seconds, 3),
            "written": self.written,
        }


def extract(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int,
    fan_in_fan_out: bool = False,
    dtype: str | None = None,
    key: str | None = None,
    strip_prefix: tuple[str, ...] | list[str] = (),
    add_prefix: str | None = None,
    rename: tuple[str | Rename, ...] | list[str | Rename] = (),
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    dry_run: bool = False,
    force: bool = False,
    trust: bool = False,
) -> ExtractReport:
    """Write what `finetuned` changed from `base` as a PEFT LoRA adapter folder `out`.

    Args:
        rank: the LoRA rank r; each layer's difference is its best rank-r approximation.
        fan_in_fan_out: 2-D weights are stored (in, out), as GPT-2's Conv1D.
        dtype: the factors' dtype (else each weight's own).
        key, strip_prefix, add_prefix, rename, include, exclude: as for `surgery.convert`, on both
            checkpoints; the names after them are the adapter's module names.

    Raises:
        BadArgument: a parameter that cannot work, named.
        SurgeryError: unreadable or unsafe inputs, checkpoints whose keys or shapes differ, nothing
            changed, changes a PEFT adapter cannot hold (nothing is written).

    Example:
        >>> surgery.extract("tuned.safetensors", "base.safetensors", "lora/", rank=16)
    """
    fields = {k: v for k, v in locals().items()}
    fields.update(finetuned=str(finetuned), base=str(base), out=str(out))
    return extract_file(ExtractRequest.from_fields(fields))


def extract_file(
    request: ExtractRequest, *, progress: Callable[[int, int], Callable[[int], None]] | None = None
) -> ExtractReport:
    """`surgery extract` as a library call."""
    import torch

    started = time.perf_counter()
    tuned = open_trusted(request.finetuned, key=request.keys.key, trust=request.trust, purpose="extract")
    base = open_trusted(request.base, key=request.keys.key, trust=request.trust, purpose="extract")
    out = Path(request.out)
    files = list(dict.fromkeys([*tuned.files, *base.files]))
    check_folder_destination(out, files, force=request.force)
    sides = [
        Side(c, role, keys, steps)
        for c, role, (keys, steps) in zip(
            (tuned, base), ("input", "base"), named([tuned, base], request.keys), strict=True
        )
    ]
    tuned_side, base_side = sides
    _check_same(tuned_side, base_side)
    names = list(tuned_side.keys)
    shapes = {n: tuned_side.info(n).shape for n in names}
    tied_keys = {key for pair in tuned.aliases.items() for key in pair}  # either half of a pair: whole
    tied = {name for name, key in tuned_side.keys.items() if key in tied_keys}
    tick = progress(len(names), sum(tuned_side.info(n).nbytes for n in names)) if progress else None
    changed: list[str] = []
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[LayerError] = []
    for name in names:  # the first pass: what changed, and the factors of what changed
        a, b = _pair(tuned_side, base_side, name)
        if not torch.equal(a, b):
            changed.append(name)
            kind = extract_layout(
                [name], {name: shapes[name]}, fan_in_fan_out=request.fan_in_fan_out, tied=tied
            ).lora
            if name in kind and a.dtype.is_floating_point:
                from surgery.models.merges import lora_factors

                fa, fb, error = lora_factors(a.double() - b.double(), kind[name], request.rank)
                dtype = getattr(torch, request.dtype) if request.dtype else a.dtype
                deltas[name] = (fa.to(dtype), fb.to(dtype))
                errors.append(LayerError(name, error))
        del a, b
        tuned.release(tuned_side.keys[name])
        base.release(base_side.keys[name])
        if tick is not None:
            tick(tuned_side.info(name).nbytes)
    if not changed:
        raise SurgeryError(tuned.path, f"holds the same values as {base.path}: there is nothing to extract")
    layout = extract_layout(changed, shapes, fan_in_fan_out=request.fan_in_fan_out, tied=tied)
    not_floating = [n for n in layout.lora if n not in deltas]
    if not_floating:
        raise SurgeryError(tuned.path, f"weights that are not floating changed: {few_names(not_floating)}")
    keys = _keys_of(layout)
    entries = _entries(keys, deltas, tuned_side)
    report = ExtractReport(
        str(tuned.path),
        str(base.path),
        str(out),
        request.rank,
        len(names),
        len(changed),
        layout.lora,
        layout.biases,
        layout.modules,
        tuple(sorted(errors, key=lambda e: -e.error)),
        bytes_out=sum(e.nbytes for e in entries),
        bytes_model=sum(tuned_side.info(n).nbytes for n in names),
        files=dict.fromkeys(str(p) for p in files),
    )
    if request.dry_run:
        return replace(report, seconds=time.perf_counter() - started)
    from surgery.commands.port_files import SourceDigests

    with SourceDigests(files) as digests:  # the sha256 of both checkpoints, in the adapter's header
        sha256 = {str(p): d for p, d in digests.result().items()}
        metadata = {
            "format": "pt",
            "surgery.version": __version__,
            "surgery.extract": json.dumps({"rank": request.rank, "fan_in_fan_out": request.fan_in_fan_out}),
            "surgery.source_files": json.dumps(
                [{"path": str(Path(p).resolve()), "sha256": d} for p, d in sha256.items()]
            ),
        }
        _write(out, entries, _getter(keys, deltas, tuned_side), metadata, _config(request, layout, base.path))
        digests.check_unchanged()
    return replace(report, files=sha256, seconds=time.perf_counter() - started, written=True)


def _write(
    out: Path,
    entries: list[Entry],
    get: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    config: dict[str, Any],
) -> None:
    """The adapter folder, atomically: its safetensors file and its config."""
    from surgery.writers import write_state_dict

    with atomic_folder(out, size=sum(e.nbytes for e in entries)) as tmp:
        write_state_dict(tmp / WEIGHTS, entries, get, metadata, safetensors=True)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _getter(
    keys: Mapping[str, tuple[str, int | None]],
    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    tuned: Side,
) -> Callable[[str], torch.Tensor]:
    """The adapter's tensor of a key: a factor made in the first pass, or the fine-tune's own, read again."""

    def get(key: str) -> torch.Tensor:
        name, factor = keys[key]
        if factor is not None:
            return deltas[name][factor]
        return tuned.ckpt.tensor(tuned.keys[name]).detach().contiguous()

    return get


def _check_same(tuned: Side, base: Side) -> None:
    """The two checkpoints hold the same names and shapes.

    Raises:
        SurgeryError: naming the first differences (as merge names them).
    """
    found = differences(base, tuned)
    if found:
        raise SurgeryError(
            tuned.ckpt.path,
            f"is not a fine-tune of {base.ckpt.path} as it stands: it {found.describe()}",
            hint="an adapter changes values only; --exclude leaves tensors out of both",
        )


def _pair(tuned: Side, base: Side, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuned.ckpt.tensor(tuned.keys[name]), base.ckpt.tensor(base.keys[name])


def _keys_of(layout: ExtractLayout) -> dict[str, tuple[str, int | None]]:
    """Each adapter key -> (the checkpoint's name, 0 for A, 1 for B, None for the tensor whole)."""
    keys: dict[str, tuple[str, int | None]] = {}
    for name in layout.lora:
        module = name.rpartition(".")[0]
        keys[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (name, 0)
        keys[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (name, 1)
    for name in layout.biases:
        module = name.rpartition(".")[0]
        keys[f"{PEFT_PREFIX}{module}.base_layer.bias"] = (name, None)
    for name in layout.whole:
        keys[f"{PEFT_PREFIX}{name}"] = (name, None)
    return keys


def _entries(
    keys: Mapping[str, tuple[str, int | None]], deltas: Mapping[str, Any], tuned: Side
) -> list[Entry]:
    """What the adapter file holds, in order: each key's shape and dtype."""
    out = []
    for key, (name, factor) in keys.items():
        if factor is None:
            info = tuned.info(name)
            out.append(Entry(key, info.shape, info.dtype))
        else:
            tensor = deltas[name][factor]
            out.append(Entry(key, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    return out


def _config(request: ExtractRequest, layout: ExtractLayout, base: Path) -> dict[str, Any]:
    """The adapter_config.json PEFT reads: scaling 1 (lora_alpha = r), the layers by full name."""
    return {
        "peft_type": "LORA",
        "r": request.rank,
        "lora_alpha": request.rank,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": request.fan_in_fan_out,
        "target_modules": layout.targets,
        "modules_to_save": layout.modules or None,
        "bias": "lora_only" if layout.biases else "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": str(base),
        "rank_pattern": {},
        "alpha_pattern": {},
    }
