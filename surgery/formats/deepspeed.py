"""DeepSpeed ZeRO checkpoint folders, consolidated without DeepSpeed and without running anything.

`engine.save_checkpoint(dir)` writes `dir/latest` (the tag) and `dir/<tag>/` holding
`torch.save` archives: the model states (`mp_rank_00_model_states.pt` at stage 1 and 2, one
`zero_pp_rank_R_mp_rank_00_model_states.pt` per rank at stage 3) with the module's buffers,
`param_shapes` and the frozen parameters; and one `*_optim_states.pt` per data-parallel rank
holding that rank's flat partitions of the fp32 master weights
(`single_partition_of_fp32_groups` at stages 1 and 2, `fp32_flat_groups` at stage 3).

DeepSpeed's `zero_to_fp32.py` loads them all with `torch.load(weights_only=False)` (they name
DeepSpeed's classes: `LossScaler`, `ZeroStageEnum`, `fragment_address`) and concatenates
every partition in memory. Here each file goes through the torch zip reader with those classes
modelled as records; `plan_zero` decides from names, shapes and partition sizes alone which
elements of which partition form each tensor, slicing exactly as `zero_to_fp32` does; the
reading half makes each piece a view of its partition's bytes in the file, so convert, diff,
port and merge assemble one parameter at a time from mapped bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.dtypes import BY_NAME, DType
from surgery.errors import CorruptCheckpoint, NotFound, SurgeryError, UnsupportedTensor
from surgery.formats.base import Scan, carrying, mapped, named_file
from surgery.formats.dcp import Record
from surgery.formats.pickle_vm import Known, describe
from surgery.formats.torch_pickle import KNOWN, StorageRef, TensorRef, contiguous_strides
from surgery.formats.torchzip import scan_zip
from surgery.text import plural
from surgery.values import Finding

LATEST = "latest"
MAX_LATEST_BYTES = 4096
MODEL_STATES = "*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"
FLOAT32 = BY_NAME["float32"]

# DeepSpeed's own classes in its pickles: read as records, never imported.
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
# Where each stage keeps a rank's flat fp32 partitions (one per parameter group).
PARTITIONS_KEY = {
    1: "single_partition_of_fp32_groups",
    2: "single_partition_of_fp32_groups",
    3: "fp32_flat_groups",
}


# -- planning: names, shapes and partition sizes -> which elements form each tensor (pure) --------


@dataclass(frozen=True)
class Source:
    """A stored tensor that pieces come from: a rank's flat fp32 partition of a parameter
    group, a rank's fragment of a frozen parameter, or a tensor of the module (a buffer)."""

    kind: str  # "partition" | "fragment" | "module"
    rank: int
    key: int | str  # the group's index, or the tensor's name


@dataclass(frozen=True)
class Run:
    """`length` consecutive elements of a source's flat tensor, from element `start`."""

    source: Source
    start: int
    length: int


@dataclass(frozen=True)
class Placement:
    """One tensor of the consolidated state_dict: its flat elements, in order.

    `whole`: the stored tensor as it is instead (a buffer; a frozen parameter at stages 1 and 2).
    """

    name: str
    role: str  # "buffer" | "frozen" | "trainable"
    shape: tuple[int, ...] | None
    runs: tuple[Run, ...] = ()
    whole: Source | None = None


@dataclass(frozen=True)
class ZeroLayout:
    """What the files say, as plain data: the input of `plan_zero`."""

    stage: int
    world_size: int
    param_shapes: tuple[dict[str, tuple[int, ...]], ...]  # per parameter group, in order
    partition_numels: tuple[tuple[int, ...], ...]  # [rank][group]
    alignment_paddings: tuple[tuple[int, ...], ...] | None  # [group][param], ZeRO-1/2 only
    module_names: tuple[str, ...]  # rank 0's module state_dict, in order
    buffer_names: frozenset[str]
    frozen_shapes: dict[str, tuple[int, ...]]
    fragment_numels: tuple[dict[str, int], ...]  # [rank] frozen name -> elements stored there
    shared: dict[str, str]  # alias -> the name it shares


@dataclass(frozen=True)
class ZeroPlan:
    """The consolidated state_dict in `zero_to_fp32`'s order: buffers, frozen parameters,
    trainable parameters; a shared name maps to the very Placement of the name it shares."""

    entries: tuple[tuple[str, Placement], ...]

    @property
    def aliases(self) -> dict[str, str]:
        return {name: p.name for name, p in self.entries if name != p.name}


def plan_zero(layout: ZeroLayout) -> ZeroPlan:
    """Which partition elements form which tensor, as `zero_to_fp32.py` slices them.

    Stages 1 and 2: a group's partitions, rank after rank, are one flat vector; each
    parameter takes its numel from it in `param_shapes` order, then its alignment padding.
    Stage 3: every parameter is split in `ceil(numel / world_size)` elements per rank, at
    the same offset in each rank's flat groups; the pieces, rank after rank, cut to numel.

    Raises:
        ValueError: the shapes and the partitions disagree (says how).

    Example:
        >>> layout = ZeroLayout(2, 2, ({"w": (3,)},), ((2,), (2,)), None, (), frozenset(), {}, ({},), {})
        >>> [(r.source.rank, r.start, r.length) for r in plan_zero(layout).entries[0][1].runs]
        [(0, 0, 2), (1, 0, 1)]
    """
    entries: dict[str, Placement] = {}
    for name in layout.module_names:
        if name in layout.buffer_names:
            entries[name] = Placement(name, "buffer", None, whole=Source("module", 0, name))
    frozen = _frozen_stage3 if layout.stage == 3 else _frozen_whole
    for name, shape in layout.frozen_shapes.items():
        entries[name] = frozen(layout, name, shape)
    trainable = _trainable_stage3 if layout.stage == 3 else _trainable_flat
    for placement in trainable(layout):
        entries[placement.name] = placement
    for alias, name in layout.shared.items():
        if name in entries:
            entries[alias] = entries[name]
    return ZeroPlan(tuple(entries.items()))


def _frozen_whole(layout: ZeroLayout, name: str, shape: tuple[int, ...]) -> Placement:
    """Stages 1 and 2 keep each frozen parameter whole in the model states."""
    if name not in layout.fragment_numels[0]:
        raise ValueError(
            f"frozen parameter {name!r} is in frozen_param_shapes but not in frozen_param_fragments"
        )
    return Placement(name, "frozen", None, whole=Source("fragment", 0, name))


def _frozen_stage3(layout: ZeroLayout, name: str, shape: tuple[int, ...]) -> Placement:
    """Stage 3 splits a frozen parameter too: one fragment per rank, padded at the end."""
    runs = []
    for rank, numels in enumerate(layout.fragment_numels):
        if name not in numels:
            raise ValueError(f"frozen parameter {name!r} has no fragment in rank {rank}'s model states")
        runs.append(Run(Source("fragment", rank, name), 0, numels[name]))
    return Placement(name, "frozen", shape, _cut(runs, math.prod(shape), name))


def _trainable_flat(layout: ZeroLayout) -> list[Placement]:
    groups = len(layout.partition_numels[0]) if layout.partition_numels else 0
    if len(layout.param_shapes) != groups:
        raise ValueError(
            f"param_shapes has {len(layout.param_shapes)} parameter groups, the partitions {groups}"
        )
    out = []
    for group, shapes in enumerate(layout.param_shapes):
        segments = [
            (Source("partition", rank, group), numels[group])
            for rank, numels in enumerate(layout.partition_numels)
        ]
        available = sum(n for _, n in segments)
        paddings = layout.alignment_paddings[group] if layout.alignment_paddings is not None else None
        if paddings is not None and len(paddings) != len(shapes):
            raise ValueError(
                f"group {group} has {len(shapes)} parameters but {len(paddings)} alignment paddings"
            )
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            out.append(Placement(name, "trainable", shape, _slice(segments, offset, numel, name)))
            offset += numel + (paddings[index] if paddings is not None else 0)
        align = 2 * layout.world_size  # ZeRO-2 pads each group to a multiple of 2 * world size
        if _round_up(offset, align) != _round_up(available, align):
            raise ValueError(
                f"parameter group {group}: param_shapes take {offset} elements, "
                f"its partitions hold {available}"
            )
    return out


def _trainable_stage3(layout: ZeroLayout) -> list[Placement]:
    ranks = layout.partition_numels
    if any(numels != ranks[0] for numels in ranks):
        raise ValueError(
            "the ranks' flat fp32 groups differ in size: each rank holds an equal share at stage 3"
        )
    out = []
    offset = 0
    for shapes in layout.param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            share = -(-numel // layout.world_size)
            runs = []
            for rank, numels in enumerate(ranks):
                runs.extend(
                    _slice(
                        [(Source("partition", rank, g), n) for g, n in enumerate(numels)], offset, share, name
                    )
                )
            out.append(Placement(name, "trainable", shape, _cut(runs, numel, name)))
            offset += share
    if offset != sum(ranks[0]):
        raise ValueError(
            f"param_shapes take {offset} elements of each rank's partitions, which hold {sum(ranks[0])}"
        )
    return out


def _slice(segments: list[tuple[Source, int]], start: int, length: int, name: str) -> tuple[Run, ...]:
    """Elements [start, start + length) of the segments laid end to end, as runs."""
    runs, position = [], 0
    end = start + length
    for source, size in segments:
        lo, hi = max(start, position), min(end, position + size)
        if lo < hi:
            runs.append(Run(source, lo - position, hi - lo))
        position += size
    if position < end:
        raise ValueError(f"{name!r} reaches element {end} of partitions holding {position}")
    return tuple(runs)


def _cut(runs: list[Run], numel: int, name: str) -> tuple[Run, ...]:
    """The first `numel` elements of the runs: the padding at the end dropped."""
    out, left = [], numel
    for run in runs:
        if left <= 0:
            break
        out.append(Run(run.source, run.start, min(run.length, left)))
        left -= run.length
    if left > 0:
        raise ValueError(f"{name!r} needs {numel} elements, its pieces hold {numel - left}")
    return tuple(out)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def blocks(
    shape: tuple[int, ...], start: int, length: int
) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Flat elements [start, start + length) of a C-ordered tensor of `shape` as blocks
    (flat start, offsets, sizes), in order: each block is one contiguous run of elements,
    so a piece of a flat partition fills it as a plain view.

    Example:
        >>> [(o, s) for _, o, s in blocks((7, 5), 3, 20)]
        [((0, 3), (1, 2)), ((1, 0), (3, 5)), ((4, 0), (1, 3))]
    """
    if not shape:
        return [(0, (), ())] if length else []
    inner = contiguous_strides(shape)
    out, position, end = [], start, start + length
    while position < end:
        index = tuple((position // step) % max(n, 1) for step, n in zip(inner, shape, strict=True))
        dim = len(shape) - 1  # step along the outermost dim whose blocks start here and fit
        while dim > 0 and position % inner[dim - 1] == 0 and position + inner[dim - 1] <= end:
            dim -= 1
        count = min((end - position) // inner[dim], shape[dim] - index[dim])
        out.append((position, index, (1,) * dim + (count,) + shape[dim + 1 :]))
        position += count * inner[dim]
    return out


# -- reading: the files -> a layout -> tensor stand-ins over the partitions' bytes -----------------


def is_deepspeed_folder(folder: Path) -> bool:
    """A folder `engine.save_checkpoint` wrote: its `latest` file, or the tag folder itself."""
    return (folder / LATEST).is_file() or any(folder.glob(MODEL_STATES))


def scan_deepspeed(path: Path, *, verify: bool = False) -> Scan:
    """Read a DeepSpeed ZeRO checkpoint: the consolidated state_dict as views of the partitions.

    Args:
        path: the folder `engine.save_checkpoint(dir)` was given (its `latest` names the tag
            folder) or the tag folder (`global_step1000`) itself.
        verify: also check every storage's CRC.

    Returns:
        A `Scan` of format "deepspeed" whose root is `{"module": the consolidated state_dict,
        "zero_stage": ..., ...}`; each tensor a view of one partition's bytes, or chunks of
        several (a parameter split between ranks), assembled when read.

    Raises:
        NotFound: the tag folder, the model states or the optimizer partitions are missing.
        CorruptCheckpoint: a file is damaged, or the files disagree with each other.

    Example:
        >>> scan_deepspeed(Path("checkpoints")).description
        'DeepSpeed ZeRO-3 checkpoint global_step1: 2 data-parallel ranks, ...'
    """
    findings: list[Finding] = []
    with carrying(findings):
        return _scan_deepspeed(Path(path), verify, findings)


def _scan_deepspeed(path: Path, verify: bool, findings: list[Finding]) -> Scan:
    folder = _tag_folder(path)
    model_files, optim_files = _files(folder)
    seen: set[str] = set()
    known = _known(seen)
    models = [_read(p, verify, known, findings) for p in model_files]
    optims = [_read(p, verify, known, findings) for p in optim_files]
    model = _model_states(model_files[0], models[0])
    stage, world_size, partitions, paddings = _optim_states(folder, optim_files, optims)
    fragments = [_fragments(p, root) for p, root in zip(model_files, models, strict=True)]
    if stage == 3 and len(fragments) != world_size:
        raise NotFound(
            folder,
            f"ZeRO-3 over {world_size} ranks keeps one model states file per rank; "
            f"the folder holds {len(fragments)}",
        )
    layout = ZeroLayout(
        stage=stage,
        world_size=world_size,
        param_shapes=model.param_shapes,
        partition_numels=tuple(tuple(t.numel for t in groups) for groups in partitions),
        alignment_paddings=paddings,
        module_names=tuple(model.module),
        buffer_names=model.buffer_names,
        frozen_shapes=model.frozen_shapes,
        fragment_numels=tuple(
            {k: t.numel for k, t in f.items()} for f in (fragments if stage == 3 else fragments[:1])
        ),
        shared=model.shared,
    )
    try:
        plan = plan_zero(layout)
    except ValueError as exc:
        raise CorruptCheckpoint(folder, f"the DeepSpeed files disagree: {exc}") from None
    state_dict = _tensors(folder, plan, _sources(model.module, fragments, partitions))
    findings.extend(_notices(folder, seen, [n for n in model.module if n not in state_dict], model_files[0]))
    roles = {
        role: sum(p.role == role for n, p in plan.entries if n == p.name)
        for role in ("trainable", "frozen", "buffer")
    }
    info = {
        "tag": folder.name,
        "zero_stage": stage,
        "dp_world_size": world_size,
        "ds_version": model.ds_version,
        "optimizer": model.optimizer,
        "model_files": [p.name for p in model_files],
        "optim_files": [p.name for p in optim_files],
        "fp32_partitions": [[t.numel for t in groups] for groups in partitions],
        "trainable": roles["trainable"],
        "frozen": roles["frozen"],
        "buffers": roles["buffer"],
        "shared": plan.aliases,
    }
    root = {
        "module": state_dict,
        **model.extras,
        "zero_stage": stage,
        "dp_world_size": world_size,
        "optimizer": model.optimizer,
    }
    description = (
        f"DeepSpeed ZeRO-{stage} checkpoint {folder.name}: {plural(world_size, 'data-parallel rank')}, "
        f"fp32 master weights in {plural(len(optim_files), 'optimizer partition file')} ({model.optimizer}); "
        f"{plural(roles['trainable'], 'trainable parameter')}, {roles['frozen']} frozen, "
        f"{plural(roles['buffer'], 'buffer')}"
    )
    files = ([path / LATEST] if folder != path else []) + model_files + optim_files
    return Scan(folder, "deepspeed", description, root, findings, {"deepspeed": info}, files)


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The model states and the optimizer partitions, each in rank order."""
    model_files = _natural(folder.glob(MODEL_STATES))
    optim_files = _natural(folder.glob(OPTIM_STATES))
    if not model_files:
        raise NotFound(folder, f"no {MODEL_STATES} file: not a DeepSpeed checkpoint folder")
    parallel = [
        p.name for p in [*model_files, *optim_files] if re.search(r"mp_rank_(?!00)\d+|^layer_\d+-", p.name)
    ]
    if parallel:
        raise UnsupportedTensor(
            folder,
            f"a tensor- or pipeline-parallel checkpoint ({parallel[0]}): surgery consolidates "
            "data-parallel ZeRO checkpoints only",
            hint="zero_to_fp32.py does not merge model-parallel ranks either; use the framework's own converter",
        )
    if not optim_files:
        raise NotFound(
            folder,
            f"no {OPTIM_STATES} files: ZeRO keeps the fp32 weights in the optimizer partitions",
            hint=f"inspect {model_files[0].name} for the module's own copy of the weights",
        )
    return model_files, optim_files


def _notices(folder: Path, seen: set[str], left_out: list[str], model_file: Path) -> list[Finding]:
    """DeepSpeed's classes read as records; module tensors the fp32 state_dict leaves out."""
    out = []
    if seen:
        names = ", ".join(sorted(n.rsplit(".", 1)[1] for n in seen))
        out.append(
            Finding(
                "notice",
                f"DeepSpeed's own classes ({names}) read as plain records: torch.load needs "
                "weights_only=False and deepspeed installed for these files, surgery neither",
                str(folder),
            )
        )
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        out.append(
            Finding(
                "notice",
                f"{plural(len(left_out), 'tensor')} of the module not in the fp32 state_dict ({shown}): "
                "DeepSpeed recorded no shape for them (frozen parameters at ZeRO-1), zero_to_fp32 leaves "
                f"them out too; the module's own copy is in {model_file.name}",
                str(folder),
            )
        )
    return out


def _tag_folder(path: Path) -> Path:
    """The folder holding the files: the one `latest` names, or `path` itself."""
    latest = path / LATEST
    if not latest.is_file():
        return path
    if latest.stat().st_size > MAX_LATEST_BYTES:
        raise CorruptCheckpoint(latest, f"over {MAX_LATEST_BYTES} bytes: not a DeepSpeed tag")
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(latest, f"not a DeepSpeed tag ({exc})") from None
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or "\0" in tag:
        raise CorruptCheckpoint(latest, f"names {tag[:60]!r}, which is not a folder name")
    folder = path / tag
    if not folder.is_dir():
        raise NotFound(latest, f"names the tag {tag!r}, but the folder holds no such folder")
    if folder.resolve().parent != path.resolve():
        raise CorruptCheckpoint(latest, f"names the tag {tag!r}, a link leading outside the folder")
    return folder


def _natural(paths: Any) -> list[Path]:
    """Files in `zero_to_fp32`'s order: numbers compared as numbers (rank 10 after rank 9)."""
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _known(seen: set[str]) -> dict[str, Any]:
    """torch's globals, and DeepSpeed's classes as records (each name used is noted in `seen`)."""

    def record(qualname: str) -> Known:
        kind = qualname.rsplit(".", 1)[1]

        def build(*args: Any, **kwargs: Any) -> Record:
            seen.add(qualname)
            return Record(kind, args)

        return Known(qualname, build)

    return {**KNOWN, **{name: record(name) for name in DEEPSPEED_CLASSES}}


def _read(path: Path, verify: bool, known: dict[str, Any], findings: list[Finding]) -> Any:
    """One file's stand-in tree, its findings kept."""
    try:
        named_file(path.parent, path.parent, path.name, "the checkpoint folder holds")
        with mapped(path) as data:
            sub = scan_zip(path, data, verify=verify, known=known)
    except SurgeryError as exc:
        findings.extend(f for f in exc.findings if f not in findings)
        raise
    findings.extend(sub.findings)
    return sub.root


@dataclass(frozen=True)
class _ModelStates:
    """Rank 0's model states, checked: what the plan needs, as plain data."""

    module: dict[str, TensorRef]
    buffer_names: frozenset[str]
    param_shapes: tuple[dict[str, tuple[int, ...]], ...]
    frozen_shapes: dict[str, tuple[int, ...]]
    shared: dict[str, str]
    ds_version: str | None
    optimizer: str  # the type ds_config names
    extras: dict[str, Any]  # what inspect lists beside the state_dict


SHOWN_BESIDE = ("global_steps", "global_samples", "skipped_steps", "ds_version", "ds_config")


def _model_states(path: Path, root: Any) -> _ModelStates:
    if not isinstance(root, dict) or not isinstance(root.get("module"), dict):
        raise CorruptCheckpoint(path, "not DeepSpeed model states: no 'module' state_dict")
    for key in ("buffer_names", "param_shapes"):
        if key not in root:
            raise CorruptCheckpoint(path, f"not DeepSpeed ZeRO model states: no {key!r}")
    module = {k: v for k, v in root["module"].items() if isinstance(k, str) and isinstance(v, TensorRef)}
    buffers = root["buffer_names"]
    if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
        raise CorruptCheckpoint(path, "buffer_names is not a list of names")
    groups = root["param_shapes"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CorruptCheckpoint(path, "param_shapes is not a list of {name: shape} dicts")
    frozen = root.get("frozen_param_shapes") or {}
    shared = root.get("shared_params") or {}
    if not isinstance(frozen, dict) or not isinstance(shared, dict):
        raise CorruptCheckpoint(path, "frozen_param_shapes and shared_params must be dicts")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise CorruptCheckpoint(path, "shared_params must map names to names")
    missing = [b for b in buffers if b not in module]
    if missing:
        raise CorruptCheckpoint(path, f"buffer {missing[0]!r} is named in buffer_names but not in the module")
    version, config = root.get("ds_version"), root.get("ds_config")
    return _ModelStates(
        module=module,
        buffer_names=frozenset(buffers),
        param_shapes=tuple({name: _shape(path, name, s) for name, s in g.items()} for g in groups),
        frozen_shapes={name: _shape(path, name, s) for name, s in frozen.items()},
        shared=dict(shared),
        ds_version=version if isinstance(version, str) else None,
        optimizer=_optimizer_kind(config if isinstance(config, dict) else {}),
        extras={key: root[key] for key in SHOWN_BESIDE if key in root},
    )


def _shape(path: Path, name: Any, shape: Any) -> tuple[int, ...]:
    if not isinstance(name, str):
        raise CorruptCheckpoint(path, f"a parameter name is a {type(name).__name__}, not a string")
    if not isinstance(shape, (tuple, list)) or not all(type(n) is int and 0 <= n < 2**63 for n in shape):
        raise CorruptCheckpoint(path, f"the shape of {name!r} is not a tuple of sizes")
    return tuple(shape)


def _fragments(path: Path, root: Any) -> dict[str, TensorRef]:
    fragments = root.get("frozen_param_fragments") if isinstance(root, dict) else None
    if fragments is None:
        return {}
    if not isinstance(fragments, dict) or not all(isinstance(v, TensorRef) for v in fragments.values()):
        raise CorruptCheckpoint(path, "frozen_param_fragments is not a dict of tensors")
    return fragments


def _optim_states(
    folder: Path, paths: list[Path], roots: list[Any]
) -> tuple[int, int, list[list[TensorRef]], tuple[tuple[int, ...], ...] | None]:
    """(stage, world size, each rank's flat fp32 partitions, alignment paddings)."""
    states = []
    for path, root in zip(paths, roots, strict=True):
        state = root.get("optimizer_state_dict") if isinstance(root, dict) else None
        if not isinstance(state, dict) or "zero_stage" not in state:
            raise CorruptCheckpoint(
                path, "not a DeepSpeed ZeRO optimizer partition: no optimizer_state_dict.zero_stage"
            )
        states.append(state)
    stage = _int(states[0]["zero_stage"])
    if type(stage) is not int or stage not in PARTITIONS_KEY:
        raise CorruptCheckpoint(
            paths[0], f"ZeRO stage {describe(stage)}: only stages 1, 2 and 3 keep fp32 partitions"
        )
    count = states[0].get("partition_count")
    counts = count if isinstance(count, list) else [count]
    if not counts or not all(type(c) is int and c > 0 for c in counts):
        raise CorruptCheckpoint(paths[0], "partition_count is not a number of ranks")
    world_size = max(counts)  # expert groups may count fewer ranks: zero_to_fp32 takes the largest
    if world_size != len(paths):
        raise NotFound(
            folder,
            f"ZeRO over {world_size} data-parallel ranks keeps {world_size} {OPTIM_STATES} files; "
            f"the folder holds {len(paths)}: a partition is missing (a rank did not save, or an older checkpoint was overwritten)",
        )
    key = PARTITIONS_KEY[stage]
    partitions = []
    for path, state in zip(paths, states, strict=True):
        if _int(state["zero_stage"]) != stage:
            raise CorruptCheckpoint(
                path, f"ZeRO stage {describe(_int(state['zero_stage']))}, rank 0's file says {stage}"
            )
        groups = state.get(key)
        if not isinstance(groups, list) or not all(_flat(t) for t in groups):
            raise CorruptCheckpoint(path, f"{key} is not a list of flat tensors")
        partitions.append(groups)
    if any(len(groups) != len(partitions[0]) for groups in partitions):
        raise CorruptCheckpoint(
            folder, "the ranks' partition files hold different numbers of parameter groups"
        )
    paddings = states[0].get("param_alignment_paddings")
    if paddings is not None:
        if not isinstance(paddings, list) or not all(
            isinstance(g, list) and all(type(n) is int and n >= 0 for n in g) for g in paddings
        ):
            raise CorruptCheckpoint(paths[0], "param_alignment_paddings is not a list of lists of sizes")
        paddings = tuple(tuple(g) for g in paddings)
    return stage, world_size, partitions, paddings


def _int(value: Any) -> Any:
    """An int, or the value of a pickled `ZeroStageEnum(n)`."""
    if isinstance(value, Record) and value.kind == "ZeroStageEnum" and len(value.args) == 1:
        return value.args[0]
    return value


def _flat(ref: Any) -> bool:
    """A 1-D tensor whose elements lie one after the other."""
    return isinstance(ref, TensorRef) and len(ref.shape) == 1 and (ref.stride == (1,) or ref.numel <= 1)


def _optimizer_kind(config: dict) -> str:
    optimizer = config.get("optimizer")
    kind = optimizer.get("type") if isinstance(optimizer, dict) else None
    return kind if isinstance(kind, str) else "optimizer not named in ds_config"


def _sources(
    module: dict[str, TensorRef], fragments: list[dict[str, TensorRef]], partitions: list[list[TensorRef]]
) -> dict[Source, TensorRef]:
    out: dict[Source, TensorRef] = {Source("module", 0, k): v for k, v in module.items()}
    for rank, frags in enumerate(fragments):
        out.update({Source("fragment", rank, k): v for k, v in frags.items()})
    for rank, groups in enumerate(partitions):
        out.update({Source("partition", rank, g): t for g, t in enumerate(groups)})
    return out


def _tensors(folder: Path, plan: ZeroPlan, sources: dict[Source, TensorRef]) -> dict[str, TensorRef]:
    """Each planned tensor as a stand-in over the stored bytes; a shared name is the same one."""
    built: dict[int, TensorRef] = {}
    out: dict[str, TensorRef] = {}
    for name, placement in plan.entries:
        if id(placement) not in built:
            try:
                built[id(placement)] = _tensor(placement, sources)
            except ValueError as exc:
                raise CorruptCheckpoint(folder, f"tensor {placement.name!r}: {exc}") from None
        out[name] = built[id(placement)]
    return out


def _tensor(placement: Placement, sources: dict[Source, TensorRef]) -> TensorRef:
    if placement.whole is not None:  # a stored tensor as it is; buffers become float32, as zero_to_fp32 does
        whole = sources[placement.whole]
        floating = whole.dtype.name.startswith(("float", "bfloat"))
        if placement.role == "buffer" and floating and whole.dtype != FLOAT32:
            return _assembled(
                placement.name, FLOAT32, whole.shape, whole, ((tuple(0 for _ in whole.shape), whole),)
            )
        return whole
    stored = [sources[run.source] for run in placement.runs]
    dtypes = {ref.dtype for ref in stored}
    if len(dtypes) > 1:
        raise ValueError(f"its pieces are of different dtypes ({', '.join(sorted(d.name for d in dtypes))})")
    dtype = stored[0].dtype if stored else FLOAT32
    for run, ref in zip(placement.runs, stored, strict=True):
        if ref.unusual or ref.bits or run.start + run.length > ref.numel:
            raise ValueError(
                f"its piece of {_label(run.source)} lies outside that tensor's {ref.numel} elements"
            )
    shape = placement.shape or ()
    if len(stored) == 1:  # one piece: a plain view, copied as the file holds it
        return _view(stored[0], placement.runs[0].start, shape)
    chunks, position = [], 0
    for run, ref in zip(placement.runs, stored, strict=True):
        for start, offsets, sizes in blocks(shape, position, run.length):
            chunks.append((offsets, _view(ref, run.start + start - position, sizes)))
        position += run.length
    return _assembled(placement.name, dtype, shape, stored[0], tuple(chunks))


def _view(flat: TensorRef, start: int, shape: tuple[int, ...]) -> TensorRef:
    """Elements of a flat tensor from `start`, seen with `shape`: its storage, not a copy."""
    return TensorRef(flat.storage, flat.offset + start, shape, contiguous_strides(shape), flat.dtype)


def _assembled(name: str, dtype: DType, shape: tuple[int, ...], like: TensorRef, chunks: tuple) -> TensorRef:
    """A tensor copied together from pieces when read (cast to `dtype` on the way)."""
    location = like.storage.location if like.storage else "cpu"
    storage = StorageRef(f"{name} ({len(chunks)} pieces)", dtype, location, math.prod(shape))
    return TensorRef(storage, 0, shape, contiguous_strides(shape), dtype, chunks=chunks)


def _label(source: Source) -> str:
    if source.kind == "partition":
        return f"rank {source.rank}'s fp32 partition of group {source.key}"
    if source.kind == "fragment":
        return f"rank {source.rank}'s fragment of {source.key!r}"
    return f"the module's {source.key!r}"
