"""torch.distributed.checkpoint (DCP) folders: a `.metadata` pickle and `*.distcp` files.

`dcp.save` flattens the state_dict to dotted names (fqns) and writes one pickle,
`.metadata`, that says for every fqn what it is (a tensor's size, dtype and
chunks, or bytes), where each item lies (`.distcp` file, offset, length) and how
the fqns nest again (`planner_data`: fqn -> path of keys in the saved dict).
Each tensor chunk is a whole `torch.save` archive embedded in its `.distcp` file;
other values (ints, strings, objects) are `torch.save`d there too, and DCP
loads those with `torch.load(weights_only=False)`.

Here `.metadata` goes through the pickle machine with DCP's classes modelled as
plain records (any other global is a finding, as in every pickle), and each
embedded archive through the torch zip reader, so every tensor's bytes are
located in its `.distcp` file and read from there on demand, never unpickled.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.dtypes import DType
from surgery.errors import CorruptCheckpoint, NotFound, SurgeryError
from surgery.formats import pickle_vm
from surgery.formats.base import Scan, carrying, mapped, named_file
from surgery.formats.legacy import MAGIC_NUMBER, scan_legacy
from surgery.formats.pickle_vm import Known
from surgery.formats.safety import findings_for
from surgery.formats.torch_pickle import (
    KNOWN,
    Opaque,
    StorageRef,
    StorageTable,
    TensorRef,
    checked_numel,
    describe_value,
)
from surgery.formats.torchzip import scan_zip
from surgery.values import Finding

METADATA_NAME = ".metadata"
MAX_METADATA_BYTES = 1 << 30
MAX_PATH_ITEMS = 64  # nesting of the saved dict; real ones stay under 5
MAX_CHUNKS_CHECKED = 4096  # chunks of one tensor checked pairwise for overlaps

_DCP = "torch.distributed.checkpoint"
_RECORD_CLASSES = (
    f"{_DCP}.metadata.Metadata",
    f"{_DCP}.metadata.TensorStorageMetadata",
    f"{_DCP}.metadata.BytesStorageMetadata",
    f"{_DCP}.metadata.ChunkStorageMetadata",
    f"{_DCP}.metadata.TensorProperties",
    f"{_DCP}.metadata.MetadataIndex",
    f"{_DCP}.metadata.StorageMeta",
    f"{_DCP}.filesystem._StorageInfo",
    f"{_DCP}.filesystem._StoragePrefix",
    # torch < 2.2 kept TensorProperties with the sharded tensor code
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
)
_ENUMS = (
    f"{_DCP}.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING",
)
_PATHS = (
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "pathlib.Path",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
)


class Record:
    """A DCP metadata object (`TensorStorageMetadata`, `_StorageInfo`, ...): its
    class name and the state BUILD gave it. Nothing of the class runs."""

    __slots__ = ("kind", "args", "state")

    def __init__(self, kind: str, args: tuple):
        self.kind, self.args = kind, args
        self.state: Any = None

    def build(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] if isinstance(state[1], dict) else {})}
        self.state = state

    def get(self, name: str, position: int | None = None) -> Any:
        """A field by name (dataclass state), or by position (a tuple state)."""
        if isinstance(self.state, dict):
            return self.state.get(name)
        if isinstance(self.state, tuple) and position is not None and position < len(self.state):
            return self.state[position]
        return None

    def __repr__(self) -> str:
        return f"<{self.kind}>"


def _record(qualname: str) -> Known:
    kind = qualname.rsplit(".", 1)[1]
    return Known(qualname, lambda *args, **kwargs: Record(kind, args))


def _enum_value(value: Any = None) -> int:
    if type(value) is not int:
        raise ValueError(f"memory format encoding must be an int, got {describe_value(value)}")
    return value


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise ValueError("path parts must be strings")
    return "/".join(parts).replace("//", "/")


DCP_KNOWN: dict[str, Any] = {
    **KNOWN,
    **{name: _record(name) for name in _RECORD_CLASSES},
    **{name: Known(name, _enum_value) for name in _ENUMS},
    **{name: Known(name, _path) for name in _PATHS},
}


@dataclass
class _Item:
    """Where one stored piece of an fqn lies."""

    fqn: str
    offset: tuple[int, ...] | None  # chunk offsets for tensors, None for bytes
    file: str  # relative to the folder
    start: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class _Reading:
    folder: Path
    meta_path: Path
    verify: bool
    findings: list[Finding]
    files: dict[str, tuple[Path, memoryview]] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)  # ids of _Items read


def scan_dcp(folder: Path, *, verify: bool = False) -> Scan:
    """Read a torch.distributed.checkpoint folder's metadata: no tensor data, nothing run.

    Args:
        folder: the folder `dcp.save(state_dict, checkpoint_id=folder)` wrote.
        verify: also check the CRCs of every embedded archive's storages.

    Returns:
        A `Scan` of format "dcp" whose root is the saved dict, nested again as
        it was saved (`{"model": {"conv.weight": ...}, "epoch": 3}`), each tensor's
        bytes located in its `.distcp` file.

    Raises:
        NotFound: `.metadata` or a `.distcp` file it names is missing.
        CorruptCheckpoint: `.metadata` is not DCP metadata, or names files outside the folder.

    Example:
        >>> scan_dcp(Path("checkpoints/step_1000")).description
        'torch.distributed.checkpoint folder: 122 tensors in 1 .distcp file'
    """
    findings: list[Finding] = []
    with carrying(findings):
        return _scan_dcp(Path(folder), verify, findings)


def _scan_dcp(folder: Path, verify: bool, findings: list[Finding]) -> Scan:
    meta_path = folder / METADATA_NAME
    if not meta_path.is_file():
        raise NotFound(folder, f"no {METADATA_NAME} file: not a torch.distributed.checkpoint folder")
    if meta_path.stat().st_size > MAX_METADATA_BYTES:
        raise CorruptCheckpoint(folder, f".metadata is over {MAX_METADATA_BYTES} bytes: not DCP metadata")
    with mapped(meta_path) as data:
        metadata = _read_metadata(meta_path, data, findings)
    where = str(meta_path)
    entries, items = _entries(metadata, where, findings)
    reading = _Reading(folder, meta_path, verify, findings)
    with ExitStack() as stack:
        for name in _checked_files(folder, meta_path, items):
            path = folder / name
            reading.files[name] = (path, stack.enter_context(mapped(path)))
        flat: dict[str, Any] = {}
        tensors = chunked = 0
        by_fqn: dict[str, list[_Item]] = {}
        for item in items:
            by_fqn.setdefault(item.fqn, []).append(item)
        for fqn, entry in entries.items():
            pieces = by_fqn.get(fqn, [])
            if isinstance(entry, Record) and entry.kind == "TensorStorageMetadata":
                ref = _tensor(reading, fqn, entry, pieces)
                if ref is not None:
                    flat[fqn] = ref
                    tensors += 1
                    chunked += ref.chunks is not None or "chunks" in (ref.unusual or "")
            elif isinstance(entry, Record) and entry.kind == "BytesStorageMetadata":
                flat[fqn] = _bytes_value(reading, fqn, pieces)
            else:
                findings.append(
                    Finding(
                        "corrupt",
                        f"item {fqn!r} is described by a {_kind(entry)}, not a tensor or bytes",
                        where,
                    )
                )
        unused = [item for item in items if id(item) not in reading.used and item.fqn not in entries]
        if unused:
            names = ", ".join(sorted({repr(item.fqn) for item in unused})[:5])
            findings.append(
                Finding(
                    "notice", f"{len(unused)} stored items belong to no entry of the metadata: {names}", where
                )
            )
    root = _unflatten(flat, metadata.get("planner_data"), where, findings)
    distcp = list(reading.files)
    files = [meta_path, *(path for path, _ in reading.files.values())]
    description = (
        f"torch.distributed.checkpoint folder: {tensors} tensors in {len(distcp)} "
        f".distcp file{'s' if len(distcp) != 1 else ''}"
    )
    info: dict[str, Any] = {"distcp_files": distcp, "items": len(entries), "tensors": tensors}
    if chunked:
        info["chunked_tensors"] = chunked
    version = metadata.get("version")
    if isinstance(version, str):
        info["dcp_version"] = version
    storage_meta = metadata.get("storage_meta")
    if isinstance(storage_meta, Record) and isinstance(storage_meta.get("save_id"), str):
        info["save_id"] = storage_meta.get("save_id")
    return Scan(folder, "dcp", description, root, findings, info, files)


# -- .metadata ----------------------------------------------------------------------------------


def _read_metadata(meta_path: Path, data: memoryview, findings: list[Finding]) -> Record:
    where = str(meta_path)
    try:
        result = pickle_vm.run(data, known=DCP_KNOWN)
    except pickle_vm.PickleError as exc:
        findings.extend(findings_for(exc.partial, where, known=DCP_KNOWN))  # type: ignore[attr-defined]
        raise CorruptCheckpoint(
            meta_path.parent, f"its torch.distributed.checkpoint .metadata is not a valid pickle: {exc}"
        ) from None
    findings.extend(findings_for(result, where, known=DCP_KNOWN))
    if result.end < len(data):
        findings.append(Finding("notice", f"{len(data) - result.end} bytes follow the pickle's STOP", where))
    value = result.value
    if not isinstance(value, Record) or value.kind != "Metadata" or not isinstance(value.state, dict):
        raise CorruptCheckpoint(
            meta_path.parent,
            ".metadata is not the metadata of a torch.distributed.checkpoint: "
            f"its pickle holds {pickle_vm.describe(value)}",
        )
    if not isinstance(value.get("state_dict_metadata"), dict):
        raise CorruptCheckpoint(meta_path.parent, ".metadata has no state_dict_metadata dict")
    return value


def _entries(metadata: Record, where: str, findings: list[Finding]) -> tuple[dict[str, Any], list[_Item]]:
    """The fqns with what they are, and every stored piece with where it lies."""
    entries = {k: v for k, v in metadata.get("state_dict_metadata").items() if isinstance(k, str)}
    if len(entries) != len(metadata.get("state_dict_metadata")):
        findings.append(Finding("corrupt", "state_dict_metadata has keys that are not strings", where))
    storage = metadata.get("storage_data")
    if not isinstance(storage, dict):
        raise CorruptCheckpoint(
            Path(where).parent, ".metadata has no storage_data: where the items lie is unknown"
        )
    items: list[_Item] = []
    bad = 0
    for key, info in storage.items():
        item = _item(key, info)
        if item is None:
            bad += 1
        else:
            items.append(item)
    if bad:
        findings.append(
            Finding(
                "corrupt", f"{bad} storage_data entries are not (MetadataIndex, _StorageInfo) pairs", where
            )
        )
    return entries, items


def _item(key: Any, info: Any) -> _Item | None:
    if not (isinstance(key, Record) and key.kind == "MetadataIndex"):
        return None
    if not (isinstance(info, Record) and info.kind == "_StorageInfo"):
        return None
    fqn, offset = key.get("fqn"), key.get("offset")
    path, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
    transforms = info.get("transform_descriptors") or ()
    if not isinstance(fqn, str) or not isinstance(path, str):
        return None
    if not all(type(v) is int and 0 <= v < 2**63 for v in (start, length)):
        return None
    if offset is not None and not (
        isinstance(offset, tuple) and all(type(v) is int and v >= 0 for v in offset)
    ):
        return None
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        return None
    return _Item(fqn, offset, path, start, length, tuple(transforms))


def _checked_files(folder: Path, meta_path: Path, items: list[_Item]) -> list[str]:
    """The `.distcp` files the metadata names, each inside the folder and present."""
    names = list(dict.fromkeys(item.file for item in items))
    missing = []
    for name in names:
        try:
            named_file(folder, folder, name, ".metadata names file")
        except NotFound:
            missing.append(name)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise NotFound(
            folder, f".metadata names {shown}, which {'is' if len(missing) == 1 else 'are'} missing"
        )
    return names


# -- tensors ------------------------------------------------------------------------------------


def _tensor(reading: _Reading, fqn: str, entry: Record, pieces: list[_Item]) -> TensorRef | None:
    """The tensor `fqn` from its metadata and its stored chunk(s)."""
    where = str(reading.meta_path)
    props = entry.get("properties")
    dtype = props.get("dtype", 0) if isinstance(props, Record) else None
    size = entry.get("size")
    chunks = entry.get("chunks")
    try:
        if not isinstance(dtype, DType):
            raise ValueError(f"dtype is {describe_value(dtype)}")
        shape = _shape(size, "size")
        if not isinstance(chunks, list) or not chunks:
            raise ValueError("no chunks")
        spans = [
            (_shape(c.get("offsets"), "chunk offsets"), _shape(c.get("sizes"), "chunk sizes"))
            if isinstance(c, Record) and c.kind == "ChunkStorageMetadata"
            else _bad_chunk(c)
            for c in chunks
        ]
    except ValueError as exc:
        reading.findings.append(Finding("corrupt", f"tensor {fqn!r}: unreadable metadata ({exc})", where))
        return None
    for offsets, sizes in spans:
        if (
            len(offsets) != len(shape)
            or len(sizes) != len(shape)
            or any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True))
        ):
            reading.findings.append(
                Finding(
                    "corrupt",
                    f"tensor {fqn!r}: chunk at {list(offsets)} lies outside its size {list(shape)}",
                    where,
                )
            )
            return _placeholder(fqn, dtype, shape, "chunks outside the tensor")
    by_offset = {item.offset: item for item in pieces}
    refs = []
    for offsets, sizes in spans:
        item = by_offset.get(offsets)
        if item is None:
            reading.findings.append(
                Finding("corrupt", f"tensor {fqn!r}: chunk at {list(offsets)} is not in storage_data", where)
            )
            refs.append(None)
            continue
        reading.used.add(id(item))
        refs.append(_chunk(reading, fqn, item, dtype, sizes))
    if len(spans) == 1 and spans[0][1] == shape:
        return refs[0] or _placeholder(fqn, dtype, shape, None, _key(by_offset.get(spans[0][0])))
    note = f"saved in {len(spans)} chunks (sharded by distributed training)"
    problem = _tiling_problem(spans, shape)
    if problem is None and any(ref is None for ref in refs):
        problem = f"{sum(ref is None for ref in refs)} cannot be read"
    if problem is not None:
        broken = _placeholder(fqn, dtype, shape, f"{note}; {problem}", f"{len(spans)} chunks")
        broken.chunks = ()  # chunked, but not assembled
        return broken
    whole = _placeholder(fqn, dtype, shape, None, f"{len(spans)} chunks")
    whole.chunks = tuple((offsets, ref) for (offsets, _), ref in zip(spans, refs, strict=True) if ref)
    return whole


def _tiling_problem(
    spans: list[tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...]
) -> str | None:
    """Why the chunks do not cover the tensor exactly once, or None."""
    covered = sum(math.prod(sizes) for _, sizes in spans)
    if covered != math.prod(shape):
        return f"they cover {covered} of its {math.prod(shape)} elements"
    if len(spans) > MAX_CHUNKS_CHECKED:
        return f"over {MAX_CHUNKS_CHECKED} chunks: not assembled"
    nonempty = [span for span in spans if math.prod(span[1])]
    for i, (a_off, a_size) in enumerate(nonempty):
        for b_off, b_size in nonempty[i + 1 :]:
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size, strict=True)
            ):
                return f"chunks at {list(a_off)} and {list(b_off)} overlap"
    return None


def _bad_chunk(chunk: Any) -> tuple:
    raise ValueError(f"a chunk is a {_kind(chunk)}")


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_PATH_ITEMS:
        raise ValueError(f"{what} is {describe_value(value)}")
    if not all(type(v) is int and 0 <= v < 2**63 for v in value):
        raise ValueError(f"{what} is {describe_value(value)}")
    checked_numel(value)
    return value


def _chunk(
    reading: _Reading, fqn: str, item: _Item, dtype: DType, sizes: tuple[int, ...]
) -> TensorRef | None:
    """The tensor in one embedded `torch.save` archive, checked against its metadata."""
    sub = _embedded(reading, fqn, item)
    if sub is None:
        return None
    label = _label(reading, item)
    ref = sub.root
    if not isinstance(ref, TensorRef):
        reading.findings.append(
            Finding("corrupt", f"tensor {fqn!r}: its archive holds {_kind(ref)}, not a tensor", label)
        )
        return None
    if ref.shape != sizes or ref.dtype != dtype:
        reading.findings.append(
            Finding(
                "corrupt",
                f"tensor {fqn!r}: the .distcp holds {ref.dtype.name} {list(ref.shape)}, "
                f"the metadata declares {dtype.name} {list(sizes)}",
                label,
            )
        )
        return None
    base = ref.storage.base if ref.storage else None
    if base is not None:
        base.key = _key(item)
        if base.data is not None and base.data.member is not None:
            ref.unusual = "a compressed storage inside a .distcp file"
    return ref


def _placeholder(
    fqn: str, dtype: DType, shape: tuple[int, ...], unusual: str | None, key: str | None = None
) -> TensorRef:
    """A tensor known from the metadata alone: listed, with no bytes to read."""
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    storage = StorageRef(key or f"{fqn} (chunks)", dtype, "cpu", math.prod(shape))
    return TensorRef(storage, 0, shape, tuple(reversed(stride)), dtype, unusual=unusual)


def _key(item: _Item | None) -> str | None:
    return f"{item.file}@{item.start}" if item else None


# -- embedded archives and bytes ----------------------------------------------------------------


def _label(reading: _Reading, item: _Item) -> str:
    return f"{reading.folder / item.file} byte {item.start} ({item.fqn})"


def _slice(reading: _Reading, item: _Item) -> memoryview | None:
    path, data = reading.files[item.file]
    end = item.start + item.length
    if end > len(data):
        reading.findings.append(
            Finding(
                "corrupt",
                f"item {item.fqn!r} lies at bytes {item.start}..{end} of a {len(data)}-byte file: truncated?",
                str(path),
            )
        )
        return None
    if item.transforms:
        reading.findings.append(
            Finding(
                "notice",
                f"item {item.fqn!r} is stored through {', '.join(item.transforms)}: not read",
                str(path),
            )
        )
        return None
    return data[item.start : end]


def _embedded(reading: _Reading, fqn: str, item: _Item) -> Scan | None:
    data = _slice(reading, item)
    if data is None:
        return None
    path, _ = reading.files[item.file]
    label = _label(reading, item)
    try:
        sub = scan_zip(path, data, verify=reading.verify, base=item.start, label=label)
    except SurgeryError as exc:
        reading.findings.extend(f for f in exc.findings if f not in reading.findings)
        reading.findings.append(Finding("corrupt", f"item {fqn!r}: {exc.message}", label))
        return None
    reading.findings.extend(sub.findings)
    return sub


def _bytes_value(reading: _Reading, fqn: str, pieces: list[_Item]) -> Any:
    """A non-tensor value: what `torch.load` would rebuild, as stand-ins, never run.

    DCP loads every bytes item with `torch.load(weights_only=False)`: a zip as the
    torch.save archive `dcp.save` writes, anything else as a pickle from its first
    byte, whatever its protocol. So every item is read by one of the two here.
    """
    where = str(reading.meta_path)
    if len(pieces) != 1:
        reading.findings.append(
            Finding("corrupt", f"bytes item {fqn!r} has {len(pieces)} stored pieces, expected 1", where)
        )
        if not pieces:
            return Opaque("bytes", "not stored")
    item = pieces[0]
    reading.used.add(id(item))
    if item.transforms:
        reading.findings.append(
            Finding(
                "unsafe",
                f"bytes item {fqn!r} is stored through {', '.join(item.transforms)}: torch.load"
                "(weights_only=False) unpickles what that decodes to, which surgery cannot decode to check",
                _label(reading, item),
            )
        )
        return Opaque("bytes", f"{item.length} bytes through {', '.join(item.transforms)}, not read")
    data = _slice(reading, item)
    if data is None:
        return Opaque("bytes", f"{item.length} bytes, not read")
    if bytes(data[:4]) == b"PK\x03\x04":  # what torch.load takes for a zip (`_is_zipfile`)
        sub = _embedded(reading, fqn, item)
        if sub is None:
            return Opaque("bytes", f"{item.length} bytes, a damaged torch.save archive")
        return sub.root
    return _pickled_bytes(reading, fqn, item, data)


def _pickled_bytes(reading: _Reading, fqn: str, item: _Item, data: memoryview) -> Opaque:
    """A bytes item that is not a zip: torch.load's legacy reader unpickles it from
    its first byte, and goes on to the rest of a legacy (pre-1.6) stream when that
    first pickle is the magic number. Every pickle torch would run is scanned."""
    label = _label(reading, item)
    try:
        first = pickle_vm.run(data, known=KNOWN, persistent_load=StorageTable())
    except pickle_vm.PickleError as exc:
        reading.findings.extend(findings_for(exc.partial, label, known=KNOWN))  # type: ignore[attr-defined]
        reading.findings.append(
            Finding(
                "corrupt",
                f"bytes item {fqn!r} is neither a torch.save archive nor a valid pickle "
                f"(torch.load unpickles it up to the error): {exc}",
                label,
            )
        )
        return Opaque("bytes", f"{item.length} bytes, a broken pickle")
    if type(first.value) is not int or first.value != MAGIC_NUMBER:
        reading.findings.extend(findings_for(first, label, known=KNOWN))
        reading.findings.append(
            Finding(
                "corrupt",
                f"bytes item {fqn!r} is a pickle, not a torch.save archive: "
                "torch.load(weights_only=False) runs it, then fails",
                label,
            )
        )
        return Opaque("bytes", f"{item.length} bytes, a pickle")
    try:
        legacy = scan_legacy(Path(label), data)
    except SurgeryError as exc:
        reading.findings.extend(f for f in exc.findings if f not in reading.findings)
        reading.findings.append(Finding("corrupt", f"bytes item {fqn!r}: {exc.message}", label))
        return Opaque("bytes", f"{item.length} bytes, a damaged legacy torch.save stream")
    reading.findings.extend(legacy.findings)  # the magic number's pickle among them
    return Opaque("bytes", f"{item.length} bytes, a legacy torch.save stream (not read)")


# -- nesting ------------------------------------------------------------------------------------


def _unflatten(flat: dict[str, Any], planner: Any, where: str, findings: list[Finding]) -> dict[str, Any]:
    """The saved dict again, as torch's `unflatten_state_dict` rebuilds it from `planner_data`.

    An fqn whose path is missing, malformed or clashes with another is kept
    under its flat name, and noted.
    """
    mapping = planner if isinstance(planner, dict) else {}
    root: dict[str, Any] = {}
    misplaced: list[str] = []
    for fqn, value in flat.items():
        path = mapping.get(fqn)
        if not _valid_path(path, fqn, len(flat)) or not _set_element(root, path, value):
            if fqn in root:
                misplaced.append(fqn)
                continue
            if mapping:
                misplaced.append(fqn)
            root[fqn] = value
    if misplaced:
        shown = ", ".join(repr(n) for n in misplaced[:5]) + (" ..." if len(misplaced) > 5 else "")
        findings.append(
            Finding(
                "notice",
                f"planner_data does not place {len(misplaced)} items ({shown}): listed under their flat names",
                where,
            )
        )
    return root


def _valid_path(path: Any, fqn: str, limit: int) -> bool:
    if not isinstance(path, tuple) or not path or len(path) > MAX_PATH_ITEMS or not isinstance(path[0], str):
        return False
    if not all(isinstance(p, str) or (type(p) is int and 0 <= p <= limit) for p in path):
        return False
    return ".".join(map(str, path)) == fqn


def _set_element(root: dict[str, Any], path: tuple, value: Any) -> bool:
    """torch's `set_element`: dicts for str keys, lists (padded with None) for ints.
    False when the path runs into a value already there."""
    node: Any = root
    for key, nxt in zip(path, [*path[1:], None], strict=True):
        if isinstance(node, dict) != isinstance(key, str):
            return False
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
        current = node[key] if isinstance(node, list) else node.get(key)
        if nxt is None:
            if current is not None:
                return False
            node[key] = value
            return True
        if current is None:
            current = node[key] = {} if isinstance(nxt, str) else []
        elif type(current) not in (dict, list):
            return False
        node = current
    return False


def _kind(value: Any) -> str:
    if isinstance(value, Record):
        return value.kind
    return pickle_vm.describe(value) if value is not None else "None"
