"""`surgery sanitize`: a checkpoint that `torch.load(weights_only=True)` accepts, from one it refuses.

Since torch 2.6 `weights_only=True` is the default, and training checkpoints that pickle an
`argparse.Namespace`, numpy scalars, a config class or a whole module stop loading; the
usual answer, `weights_only=False`, runs whatever the pickle says. Here the pickle is read
by the restricted machine (nothing imported, nothing run) and written again with plain
data only:

- tensors keep their storages, bytes, offsets, strides and sharing exactly: each storage's
  bytes are copied as they lie in the source;
- dicts, lists, tuples, sets, `collections.OrderedDict` (with a state_dict's `_metadata`),
  str, int, float, bool, None, bytes and torch dtypes are kept;
- other objects become plain values where their pickled state allows: an object with a
  dict state (`argparse.Namespace`, a config class) its attributes as a dict, a pickled
  `nn.Module` its state_dict, a numpy scalar its int/float, a numpy array a tensor, a path
  its str, an object built from one argument (an enum value) that argument;
- anything that would run code (`os.system`, a call of a call) and what cannot be rebuilt
  is dropped.

Every change is reported: where, what it was, what it became.
"""

from __future__ import annotations

import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery import __version__
from surgery.dtypes import DType
from surgery.errors import CorruptCheckpoint, UsageError
from surgery.formats import Scan, pickle_vm
from surgery.formats import scan as read_source
from surgery.formats.base import mapped
from surgery.formats.numpy_pickle import (
    NDARRAY,
    NO_DATA,
    NumpyArray,
    NumpyDType,
    PickledBytes,
    fill_array,
    scalar_value,
)
from surgery.formats.pickle_vm import Call, Global, Known, Refused, describe
from surgery.formats.safety import classify
from surgery.formats.torch_pickle import (
    KNOWN,
    Constant,
    DataLocation,
    Opaque,
    StorageRef,
    StorageTable,
    StorageType,
    TensorRef,
    Unsupported,
    is_module_state,
)
from surgery.writers.pickle import StorageOut, TensorOut, dumps

SOURCES = ("torch-zip", "torch-legacy", "torch-tar", "pickle")
# Read again with OrderedDict unmodelled: it comes back as a call whose items and state
# (a state_dict's `_metadata`) are kept, so the output holds the same OrderedDicts.
SANITIZE_KNOWN = {
    k: v for k, v in KNOWN.items() if k not in ("collections.OrderedDict", "collections.Counter")
}
_NUMPY = ("numpy.core", "numpy._core")
_PATHS = frozenset(
    f"pathlib.{kind}{name}"
    for kind in ("", "_local.")
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
)


@dataclass(frozen=True)
class Change:
    """One object that was not plain data: where it was, what it was, what it became."""

    where: str  # dotted path in the saved object ("args", "cfg.optim"), "(top level)"
    what: str  # "argparse.Namespace", "numpy.float64", "os.system(...)"
    became: str  # "dict of 2 attributes (lr, epochs)", "float 0.913", "dropped: ..."
    dropped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "what": self.what, "became": self.became, "dropped": self.dropped}

    def __str__(self) -> str:
        return f"{self.where}: {self.what} -> {self.became}"


@dataclass(frozen=True)
class SanitizeReport:
    """What `sanitize` kept, changed and dropped, and what it wrote."""

    source: str
    source_format: str
    output: str
    tensors: int
    storages: int
    bytes_out: int
    changes: tuple[Change, ...] = ()
    written: bool = False
    seconds: float = 0.0

    @property
    def made_plain(self) -> list[Change]:
        return [c for c in self.changes if not c.dropped]

    @property
    def dropped(self) -> list[Change]:
        return [c for c in self.changes if c.dropped]

    def summary(self) -> str:
        """`wrote 14 tensors (6.4 KiB) in 0.01 s; 3 objects made plain, 1 dropped`."""
        from surgery.text import human_bytes

        tensors = f"{self.tensors} tensor{'' if self.tensors == 1 else 's'} ({human_bytes(self.bytes_out)})"
        text = (
            f"wrote {tensors} in {self.seconds:.2f} s"
            if self.written
            else f"would write {tensors} (--dry-run)"
        )
        if not self.changes:
            return text + "; nothing to change: every value was already plain data"
        made = len(self.made_plain)
        return text + f"; {made} object{'' if made == 1 else 's'} made plain, {len(self.dropped)} dropped"

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "source": self.source,
            "source_format": self.source_format,
            "output": self.output,
            "tensors": self.tensors,
            "storages": self.storages,
            "bytes": self.bytes_out,
            "changes": [c.to_json() for c in self.changes],
            "written": self.written,
            "seconds": round(self.seconds, 3),
        }


def sanitize(
    source: str | Path, out: str | Path, *, force: bool = False, dry_run: bool = False
) -> SanitizeReport:
    """Rewrite `source` as a torch file of plain data and tensors only, without running anything.

    Args:
        source: a torch file (zip, legacy, or the pre-0.4 tar format) or a plain pickle.
        out: the torch file to write (atomically: a temporary file renamed when complete).
        force: replace an existing `out` (never the source).
        dry_run: report what would change; write nothing.

    Returns:
        A `SanitizeReport`; `torch.load(out, weights_only=True)` reads the file it wrote.

    Raises:
        SurgeryError: the source cannot be read, is corrupt, or holds no pickle to rewrite
            (safetensors, DCP, TorchScript); `out` exists without `force`.

    Example:
        >>> report = sanitize("checkpoint.pth", "checkpoint-clean.pth")
        >>> [str(c) for c in report.changes]
        ["args: argparse.Namespace -> dict of 2 attributes (lr, epochs)"]
    """
    start = time.perf_counter()
    src, out = Path(source), Path(out)
    scanned = read_source(src)
    if scanned.format not in SOURCES:
        raise UsageError(
            src,
            f"a {scanned.format} checkpoint holds no pickled objects to sanitize",
            hint="surgery convert writes it as a torch or safetensors file",
        )
    corrupt = [f for f in scanned.findings if f.severity == "corrupt"]
    if corrupt:
        raise CorruptCheckpoint(
            src, f"the source is corrupt: {corrupt[0].message}", hint="surgery inspect says more"
        )
    if out.suffix == ".safetensors":
        raise UsageError(
            out,
            "sanitize writes a torch file",
            hint="name OUT .pt or .pth; surgery convert writes safetensors",
        )
    if not dry_run:
        from surgery.writers.outputs import check_destination

        check_destination(out, [src], force=force)
    with mapped(src) as data:
        root = _reread(scanned, data)
        plain = _Plain(src)
        tree = plain.convert(root)
    pickled = dumps(tree)
    storages = list(plain.storages.values())
    if not dry_run:
        _write(out, src, pickled, storages, plain.sources, plain.changes)
    return SanitizeReport(
        str(src),
        scanned.format,
        str(out),
        plain.tensors,
        len(storages),
        sum(s.nbytes for s in storages),
        tuple(plain.changes),
        written=not dry_run,
        seconds=time.perf_counter() - start,
    )


# -- reading the pickle again --------------------------------------------------------------


def _reread(scanned: Scan, data: memoryview) -> Any:
    """The source's object pickle through the machine again, OrderedDict and numpy unmodelled,
    over the storages the scan located (so every tensor's bytes are where the scan found them)."""
    path = scanned.path
    if scanned.format == "torch-tar":
        from surgery.formats.torch_tar import read_tar

        parts = read_tar(path, data, [])
        member = parts.members["pickle"]
        return _run(path, data[: member.end], member.start, parts.persistent)
    table = StorageTable()
    table.storages.update(_located_storages(scanned.root))
    if scanned.format == "torch-zip":
        return _run(path, _data_pkl(path, data, scanned.metadata.get("archive", "archive")), 0, table)
    start = 0
    if scanned.format == "torch-legacy":  # after the magic number, protocol version and sys info
        for _ in range(3):
            start = pickle_vm.run(data, start=start, known=KNOWN).end
    return _run(path, data, start, table)


def _run(path: Path, data: bytes | memoryview, start: int, persistent: Any) -> Any:
    try:
        return pickle_vm.run(data, start=start, known=SANITIZE_KNOWN, persistent_load=persistent).value
    except pickle_vm.PickleError as exc:  # the scan read it: the file changed since
        raise CorruptCheckpoint(path, f"the pickle no longer reads: {exc}") from None


def _data_pkl(path: Path, data: memoryview, archive: str) -> bytes | memoryview:
    """The archive's data.pkl, read as the scan read it (its first copy, inflation bounded)."""
    from surgery.formats.torchzip import _member_bytes, _read_local_header, _Window

    wanted = f"{archive}/data.pkl".lower()
    info = next(i for i in zipfile.ZipFile(_Window(data)).infolist() if i.filename.lower() == wanted)
    return _member_bytes(path, data, _read_local_header(data, info), [])


def _located_storages(root: Any) -> dict[str, StorageRef]:
    """Every root storage in the scanned tree, by key."""
    found: dict[str, StorageRef] = {}
    for node in _nodes(root):
        storage = (
            node.storage if isinstance(node, TensorRef) else node if isinstance(node, StorageRef) else None
        )
        if storage is not None:
            found.setdefault(storage.base.key, storage.base)
    return found


def _nodes(root: Any) -> Iterator[Any]:
    """Every value in a stand-in tree once, calls' arguments included; iterative."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        elif isinstance(node, Call):
            stack.extend((node.func, *node.args, *(node.kwargs or {}).values(), node.state, *node.items))
            stack.extend(v for pair in node.entries for v in pair)


# -- making it plain -----------------------------------------------------------------------

_DROP = object()  # a value left out: a dict loses the entry, a sequence holds None there


class _Plain:
    """Turns a stand-in tree into plain data and `TensorOut`s, reporting each change."""

    def __init__(self, source: Path):
        self.source = source
        self.changes: list[Change] = []
        self.storages: dict[int, StorageOut] = {}  # id(source root storage) -> output storage
        self.sources: dict[str, DataLocation] = {}  # output storage key -> where its bytes are
        self.tensors = 0
        self._alive: list[StorageRef] = []  # source storages by id: kept alive so ids stay unique

    def convert(self, root: Any) -> Any:
        """Iterative: containers are made first and filled later (so shared and self-referencing
        ones stay so); a tuple is made when its items are, and one that contains itself is dropped."""
        memo: dict[int, Any] = {}
        holder: list[Any] = [None]
        open_tuples: set[int] = set()
        stack: list[tuple] = [(root, "", holder, 0)]
        while stack:
            task = stack.pop()
            if task[0] is _FINISH:
                _, obj, items, parent, slot = task
                open_tuples.discard(id(obj))
                value = tuple(None if v is _DROP else v for v in items)
                memo[id(obj)] = value
                _put(parent, slot, value)
                continue
            obj, where, parent, slot = task
            if id(obj) in memo:
                _put(parent, slot, memo[id(obj)])
                continue
            if type(obj) is tuple and id(obj) in open_tuples:
                self._change(where, "a tuple that contains itself", "dropped", dropped=True)
                _put(parent, slot, _DROP)
                continue
            value, children = self._one(obj, where)
            if isinstance(value, _Instead):  # the object becomes another stand-in: convert that here
                stack.append((value.value, where, parent, slot))
                continue
            if type(obj) is tuple and value is _TUPLE_PENDING:
                items: list[Any] = [None] * len(obj)
                open_tuples.add(id(obj))
                stack.append((_FINISH, obj, items, parent, slot))
                stack.extend(
                    (item, _child(where, str(i)), items, i) for i, item in reversed(list(enumerate(obj)))
                )
                continue
            if isinstance(obj, (dict, list, set, Call, TensorRef)):
                memo[id(obj)] = value
            _put(parent, slot, value)
            for child, child_where, container, key in reversed(children):
                stack.append((child, child_where, container, key))
        return holder[0]

    def _one(self, obj: Any, where: str) -> tuple[Any, list[tuple[Any, str, Any, Any]]]:
        """(the plain value, its children still to convert: (stand-in, where, container, slot))."""
        if obj is None or type(obj) in (bool, int, float, complex, str, bytes, bytearray):
            return obj, []
        if type(obj) is tuple:
            return (_TUPLE_PENDING, []) if obj else ((), [])
        if type(obj) is dict:
            return self._dict(obj.items(), where, {})
        if type(obj) is list:
            out: list[Any] = [None] * len(obj)
            return out, [(item, _child(where, str(i)), out, i) for i, item in enumerate(obj)]
        if type(obj) in (set, frozenset):
            plain = {self._key(item, where) for item in obj}
            if type(obj) is frozenset:
                self._change(where, "frozenset", "set (torch's loader has no frozenset)")
            return plain, []
        if isinstance(obj, TensorRef):
            return self._tensor(obj, where), []
        if isinstance(obj, StorageRef):
            return self._storage(obj), []
        if isinstance(obj, DType):
            return obj, []
        if isinstance(obj, Call):
            return self._call(obj, where)
        if isinstance(obj, (Global, Known, Constant, StorageType)):
            name = getattr(obj, "qualname", None) or getattr(obj, "name", None) or type(obj).__name__
            self._change(where, f"a reference to {name}", f"str {name!r}")
            return str(name), []
        reason = obj.reason if isinstance(obj, Refused) else obj.summary if isinstance(obj, Opaque) else ""
        kind = obj.kind if isinstance(obj, (Unsupported, Opaque)) else type(obj).__name__
        self._change(where, kind, f"dropped{': ' + reason if reason else ''}", dropped=True)
        return _DROP, []

    def _dict(self, items: Any, where: str, out: dict) -> tuple[Any, list]:
        children = []
        for key, value in items:
            plain_key = self._key(key, where)
            out[plain_key] = None  # in the source's order; filled when converted
            children.append((value, _child(where, str(plain_key)), out, plain_key))
        return out, children

    def _key(self, key: Any, where: str) -> Any:
        """Dict keys and set items: hashable plain values; anything else becomes its text."""
        if key is None or type(key) in (bool, int, float, complex, str, bytes):
            return key
        if type(key) is tuple and all(k is None or type(k) in (bool, int, float, str, bytes) for k in key):
            return key
        text = describe(key)
        self._change(where, f"key {text}", f"str {text!r}")
        return text

    # -- tensors -----------------------------------------------------------------------------
    def _tensor(self, ref: TensorRef, where: str) -> Any:
        if ref.unusual or ref.storage is None:
            self._change(
                where,
                f"tensor ({ref.unusual or 'no data'})",
                "dropped: surgery does not rebuild it",
                dropped=True,
            )
            return _DROP
        storage = self._storage(ref.storage)
        start = ref.storage.view_offset + ref.offset * ref.dtype.itemsize
        if start % ref.dtype.itemsize:
            self._change(where, "tensor at an unaligned offset", "dropped", dropped=True)
            return _DROP
        self.tensors += 1
        return TensorOut(
            storage,
            start // ref.dtype.itemsize,
            ref.shape,
            ref.stride,
            ref.dtype,
            ref.requires_grad,
            ref.parameter,
            dict(ref.bits) if ref.bits else None,
        )

    def _storage(self, ref: StorageRef) -> StorageOut:
        base = ref.base
        held = self.storages.get(id(base))
        if held is None:
            key = str(len(self.storages))
            nbytes = base.nbytes
            if base.data is None or base.data.size < nbytes:
                raise CorruptCheckpoint(self.source, f"storage {base.key!r} is not in the file whole")
            held = self.storages[id(base)] = StorageOut(key, base.dtype, nbytes)
            self.sources[key] = base.data
            self._alive.append(base)
        return held

    # -- objects -----------------------------------------------------------------------------
    def _call(self, call: Call, where: str) -> tuple[Any, list]:
        func = call.func
        while isinstance(func, Call):
            func = func.func
        if isinstance(call.func, Call) or not isinstance(func, Global):
            self._change(where, describe(call), "dropped: it calls the result of another call", dropped=True)
            return _DROP, []
        name = func.qualname
        severity, reason = classify(func.module, func.name)
        if severity == "danger":
            self._change(where, describe(call), f"dropped: {reason}", dropped=True)
            return _DROP, []
        if name == "collections.OrderedDict":
            ordered: OrderedDict = OrderedDict()
            pairs = (
                [p for p in call.args[0] if isinstance(p, (tuple, list)) and len(p) == 2] if call.args else []
            )
            value, children = self._dict([*pairs, *call.entries], where, ordered)
            if isinstance(call.state, dict):  # a state_dict's `_metadata`: set as attributes, as torch does
                attributes = _Attributes(ordered)
                children += [
                    (v, _child(where, str(k)), attributes, k)
                    for k, v in call.state.items()
                    if isinstance(k, str)
                ]
            return value, children
        if name.startswith(_NUMPY) or name in ("numpy.dtype", "numpy.ndarray"):
            return self._numpy(call, name, where)
        if (
            name in ("builtins.frozenset", "builtins.set")
            and len(call.args) == 1
            and isinstance(call.args[0], list)
        ):
            self._change(
                where, name.removeprefix("builtins."), "set (torch's loader reads sets, not frozensets)"
            )
            return {self._key(item, where) for item in call.args[0]}, []
        if name in _PATHS and call.args and all(isinstance(a, str) for a in call.args):
            text = "/".join(call.args).replace("//", "/")
            self._change(where, name, f"str {text!r}")
            return text, []
        if name == "copyreg._reconstructor" and call.args and isinstance(call.args[0], Global):
            name = call.args[0].qualname
            if call.state is None and len(call.args) == 3 and call.args[2] is not None:
                return self._became(call.args[2], name, "its value", where)
        state = call.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] if isinstance(state[1], dict) else {})}
        if is_module_state(state):
            return self._module(call, name, where)
        if call.entries:
            self._change(where, name, f"dict of its {len(call.entries)} items")
            return self._dict(call.entries, where, {})
        if call.items:
            self._change(where, name, f"list of its {len(call.items)} items")
            out: list[Any] = [None] * len(call.items)
            return out, [(item, _child(where, str(i)), out, i) for i, item in enumerate(call.items)]
        if isinstance(state, dict):
            shown = ", ".join(str(k) for k in list(state)[:4]) + (", ..." if len(state) > 4 else "")
            count = f"{len(state)} attribute{'' if len(state) == 1 else 's'}"
            self._change(where, name, f"dict of its {count}" + (f" ({shown})" if shown else ""))
            return self._dict(state.items(), where, {})
        if state is not None:
            return self._became(state, name, "its pickled state", where)
        if len(call.args) == 1:
            return self._became(call.args[0], name, "its argument", where)
        if not call.args:
            self._change(where, name, "an empty dict (it has no state)")
            return {}, []
        return self._became(list(call.args), name, "the list of its arguments", where)

    def _became(self, value: Any, what: str, how: str, where: str) -> tuple[Any, list]:
        shown = f" {describe(value)}" if not isinstance(value, (dict, list, tuple, Call)) else ""
        self._change(where, what, f"{how}{shown}")
        return _Instead(value), []

    def _module(self, call: Call, name: str, where: str) -> tuple[Any, list]:
        """A pickled nn.Module: its state_dict, with the names `module.state_dict()` gives."""
        from surgery.formats.containers import flatten

        tensors, _, _ = flatten(call)
        out: OrderedDict = OrderedDict()
        children = []
        for key, ref in tensors:
            out[key] = None
            children.append((ref, _child(where, key), out, key))
        self._change(where, name, f"its state_dict ({len(tensors)} tensors)")
        return out, children

    def _numpy(self, call: Call, name: str, where: str) -> tuple[Any, list]:
        """numpy's own rebuild functions, replayed as data: arrays become tensors, scalars values."""
        short = name.rsplit(".", 1)[-1]
        if short == "scalar" and len(call.args) == 2:
            dtype = _numpy_dtype(call.args[0])
            value = scalar_value(dtype, call.args[1]) if dtype is not None else None
            if value is not None and not (dtype is not None and dtype.is_object):
                kind = f"numpy.{dtype.dtype.name if dtype and dtype.dtype else dtype.code if dtype else '?'}"
                self._change(where, kind, f"{type(value).__name__} {value!r}")
                return value, []
        array = _numpy_array(call, short)
        if array is not None and array.raw is not None and array.storage is not None:
            storage = array.storage
            storage.data = PickledBytes(
                str(self.source),
                0,
                len(array.raw),
                array.big_endian != (sys.byteorder == "big"),
                raw=array.raw,
            )
            self._change(where, f"numpy.ndarray {list(array.shape)} {array.dtype.name}", "tensor")
            return self._tensor(array, where), []
        if array is not None and array.objects is not None:
            self._change(where, f"numpy object array of {len(array.objects)}", "list")
            out: list[Any] = [None] * len(array.objects)
            return out, [(item, _child(where, str(i)), out, i) for i, item in enumerate(array.objects)]
        if short == "dtype" and isinstance(dtype := _numpy_dtype(call), NumpyDType):
            text = dtype.dtype.name if dtype.dtype else dtype.code
            self._change(where, "numpy.dtype", f"str {text!r}")
            return text, []
        self._change(where, describe(call), "dropped: not a numeric array or scalar", dropped=True)
        return _DROP, []

    def _change(self, where: str, what: str, became: str, *, dropped: bool = False) -> None:
        self.changes.append(Change(where or "(top level)", what, became, dropped))


def _numpy_dtype(value: Any) -> NumpyDType | None:
    """A `numpy.dtype(code, ...)` call, with its BUILD state, as the stand-in the models use."""
    if not (
        isinstance(value, Call) and isinstance(value.func, Global) and value.func.qualname == "numpy.dtype"
    ):
        return None
    if not value.args or not isinstance(value.args[0], str):
        return None
    dtype = NumpyDType(value.args[0])
    dtype.build(value.state)
    return dtype


def _numpy_array(call: Call, short: str) -> NumpyArray | None:
    """`_reconstruct(ndarray, ...)` with its BUILD state, or `_frombuffer(data, dtype, shape, order)`."""
    array = NumpyArray(None, 0, (0,), (1,), KNOWN["torch.uint8"], unusual=NO_DATA)
    if short == "_reconstruct" and call.args and isinstance(call.args[0], Global):
        if call.args[0].qualname != NDARRAY.qualname or not isinstance(call.state, tuple):
            return None
        state = call.state[1:] if len(call.state) == 5 else call.state
        if len(state) != 4:
            return None
        fill_array(array, state[0], _numpy_dtype(state[1]), bool(state[2]), state[3])
        return array
    if short == "_frombuffer" and len(call.args) >= 3:
        order = call.args[3] if len(call.args) > 3 else "C"
        fill_array(array, call.args[2], _numpy_dtype(call.args[1]), order == "F", call.args[0])
        return array
    return None


_FINISH = object()
_TUPLE_PENDING = object()


@dataclass
class _Attributes:
    """Where an OrderedDict's pickled attributes go (`_metadata`): set on it as converted."""

    target: OrderedDict


@dataclass
class _Instead:
    """A stand-in to convert in place of the object it came from (an enum value's argument)."""

    value: Any


def _child(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _put(container: Any, slot: Any, value: Any) -> None:
    """A converted value into its place; a dropped one leaves a dict entry out, else None."""
    if isinstance(container, _Attributes):
        if value is not _DROP:
            setattr(container.target, slot, value)
    elif isinstance(container, dict):
        if value is _DROP:
            container.pop(slot, None)
        else:
            container[slot] = value
    else:  # a list, the items of a tuple being made, or the root's holder
        container[slot] = None if value is _DROP else value


# -- writing ---------------------------------------------------------------------------------


def _write(
    out: Path,
    source: Path,
    pickled: bytes,
    storages: list[StorageOut],
    sources: dict[str, DataLocation],
    changes: list[Change],
) -> None:
    """A torch zip archive as torch.save lays it out, written atomically; checked before it
    replaces OUT: read back, it must hold nothing but tensors and plain data."""
    import json

    from surgery.values import Entry
    from surgery.writers.copy import Pieces, RawBytes
    from surgery.writers.outputs import atomic
    from surgery.writers.torch_archive import PROVENANCE_MEMBER, _write_archive

    def get(key: str) -> RawBytes | Pieces:
        return _storage_bytes(sources[key], next(s for s in storages if s.key == key))

    provenance = {
        "surgery.version": __version__,
        "surgery.sanitized_from": source.name,
        "surgery.changes": json.dumps([c.to_json() for c in changes]),
    }
    entries = [Entry(s.key, (s.nbytes,), "uint8") for s in storages]
    with atomic(out, _check_plain) as f:
        extra = {PROVENANCE_MEMBER: json.dumps(provenance, indent=1).encode()}
        _write_archive(f, pickled, entries, {s.key: s.key for s in storages}, get, None, extra)


def _storage_bytes(data: DataLocation, storage: StorageOut) -> Any:
    """A storage's bytes as the writer takes them: a file range copied as it lies, else pieces."""
    from surgery.writers.copy import Pieces, RawBytes

    n = storage.nbytes
    unit = (
        (storage.dtype.itemsize // (2 if storage.dtype.name.startswith("complex") else 1))
        if storage.dtype
        else 1
    )
    if isinstance(data, PickledBytes):
        raw = data.raw[:n]
        return Pieces([_swapped(raw, unit) if data.byteswap else raw])
    if data.member is not None:
        return Pieces(_swapped_pieces(_inflated(data, n), unit, data.byteswap))
    if data.byteswap and unit > 1:
        return Pieces(_swapped_pieces(_ranges(data, n), unit, True))
    return RawBytes(data.path, data.offset, n)


def _ranges(data: DataLocation, n: int, chunk: int = 8 << 20) -> Iterator[bytes]:
    import os

    with open(data.path, "rb") as f:
        for start in range(0, n, chunk):
            yield os.pread(f.fileno(), min(chunk, n - start), data.offset + start)


def _inflated(data: DataLocation, n: int, chunk: int = 8 << 20) -> Iterator[bytes]:
    """A deflated zip member's first `n` bytes, inflated piece by piece from where its data
    starts; its CRC is not checked, as torch does not check it."""
    import os
    import zlib

    inflater = zlib.decompressobj(-15)
    left, pos = n, data.offset
    with open(data.path, "rb") as f:
        while left:
            piece = inflater.unconsumed_tail or os.pread(f.fileno(), chunk, pos)
            if not inflater.unconsumed_tail:
                pos += len(piece)
            try:
                out = inflater.decompress(piece, min(chunk, left))
            except zlib.error as exc:
                raise CorruptCheckpoint(data.path, f"member {data.member} does not inflate: {exc}") from None
            if not out and (not piece or inflater.eof):
                raise CorruptCheckpoint(data.path, f"member {data.member} ends before its {n} bytes")
            left -= len(out)
            yield out


def _swapped_pieces(pieces: Iterator[bytes], unit: int, swap: bool) -> Iterator[bytes]:
    carry = b""
    for piece in pieces:
        if not swap or unit == 1:
            yield piece
            continue
        piece = carry + piece
        cut = len(piece) - len(piece) % unit
        carry = piece[cut:]
        yield _swapped(piece[:cut], unit)
    if carry:
        yield carry


def _swapped(raw: bytes, unit: int) -> bytes:
    """Each `unit`-byte element reversed: the other byte order."""
    if unit == 1:
        return raw
    import array

    items = array.array({2: "H", 4: "I", 8: "Q"}[unit], raw)
    items.byteswap()
    return items.tobytes()


def _check_plain(tmp: Path) -> None:
    """Read back before it replaces OUT: nothing but tensors and plain data, as promised."""
    from surgery.errors import SurgeryError

    blocking = [f for f in read_source(tmp).findings if f.severity in ("danger", "unsafe", "corrupt")]
    if blocking:
        raise SurgeryError(tmp, f"internal error: the rewritten pickle is not plain: {blocking[0]}")
