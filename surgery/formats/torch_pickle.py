"""What torch's pickles mean, modelled without torch.

The known table maps every global torch's own `weights_only` loader allows
(rebuild functions, storage and tensor classes, dtypes, a few containers and
plain-data classes) to stand-ins that record a tensor's storage, offset, shape,
stride and dtype, or an object's arguments and state. Nothing named is ever
imported. Everything else a pickle names stays an unknown `Global` for
`surgery.formats.safety` to judge. `DIFFERENCES_FROM_TORCH` lists, with the reason, each
name where this table and torch's differ; tests/test_allowlist.py keeps it exact.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from surgery.dtypes import BY_NAME, BY_STORAGE, BY_TENSOR_CLASS, QUANTIZED, DType
from surgery.formats.pickle_vm import Call, Global, Known

UINT8 = BY_NAME["uint8"]


@dataclass(frozen=True)
class StorageType:
    """A storage class such as `torch.FloatStorage`; dtype None means untyped bytes."""

    dtype: DType | None


@dataclass(eq=False)
class StorageRef:
    """A storage a pickle refers to by persistent id: bytes that live elsewhere."""

    key: str
    dtype: DType | None
    location: str
    numel: int  # elements of `dtype`, or bytes when untyped
    view_offset: int = 0  # legacy views: where this view starts in its root, in bytes
    root: StorageRef | None = None  # legacy views: the storage they view
    data: DataLocation | None = None  # set by the format reader on root storages

    @property
    def nbytes(self) -> int:
        return self.numel * (self.dtype.itemsize if self.dtype else 1)

    @property
    def base(self) -> StorageRef:
        return self.root or self


@dataclass(frozen=True)
class DataLocation:
    """Where a storage's bytes lie in a file."""

    path: str
    offset: int  # of the first byte, from the start of the file
    size: int  # bytes there
    byteswap: bool = False  # written on a machine of the other byte order
    member: str | None = None  # a compressed zip member to inflate instead of slicing
    compressed: int = 0  # a compressed member's bytes in the file, from `offset`
    crc: int | None = None  # a compressed member's CRC-32, checked when it is inflated


@dataclass(eq=False)
class TensorRef:
    """A tensor as the pickle describes it; no data is read."""

    storage: StorageRef | None
    offset: int  # in elements of `dtype`
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType
    requires_grad: bool = False
    parameter: bool = False
    unusual: str | None = None  # what a plain read of the bytes would not reproduce
    bits: dict[str, bool] | None = None  # conj/neg bits torch sets after the view
    # A tensor saved in pieces (DCP, sharded by distributed training): each piece
    # with its offsets in this tensor; `storage` then has no bytes of its own.
    chunks: tuple[tuple[tuple[int, ...], TensorRef], ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return (self.numel * self.dtype.bits + 7) // 8

    def extent(self) -> int:
        """Bytes of the storage, from its start, that this view reaches."""
        if self.numel == 0:
            return 0
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=False))
        return (last + 1) * self.dtype.itemsize

    def build(self, state: Any) -> None:
        """BUILD on a tensor, read as `Tensor.__setstate__` does: a 4-tuple is a
        legacy `set_(storage, offset, size, stride)` (torch before 0.4 pickled a
        tensor as `torch.FloatTensor()` and this), a 5-tuple a legacy Variable
        `(data, _, _, requires_grad, hooks)`, a 3-tuple `(requires_grad, _, hooks)`.
        Other states (a Parameter's attributes) change nothing surgery reads."""
        if not isinstance(state, tuple):
            return
        if len(state) == 4:
            view = _tensor(*state, dtype=self.dtype)
            storage = view.storage
            if storage is not None and storage.dtype not in (None, self.dtype):
                raise ValueError(f"set_ of a {self.dtype.name} tensor to a {storage.dtype.name} storage")
            self._become(view)
        elif len(state) == 5 and isinstance(state[0], TensorRef):
            self._become(state[0])
            self.requires_grad = bool(state[3])
        elif len(state) == 3:
            self.requires_grad = bool(state[0])

    def _become(self, view: TensorRef) -> None:
        """Take `view`'s data; requires_grad and parameter stay as BUILD found them."""
        self.storage, self.offset, self.dtype = view.storage, view.offset, view.dtype
        self.shape, self.stride = view.shape, view.stride
        self.unusual, self.bits = view.unusual, view.bits


@dataclass(frozen=True)
class Unsupported:
    """A tensor kind that only torch itself can rebuild (sparse, nested, ...)."""

    kind: str


@dataclass(frozen=True)
class Opaque:
    """A stored value surgery does not rebuild, described in a few words
    (`bytes`, "1261 bytes, a damaged torch.save archive")."""

    kind: str
    summary: str


def contiguous_strides(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of `shape` (a size-0 dimension counts as 1, as torch does)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


INT64_MAX = 2**63 - 1
MAX_DIMS = 64  # torch's own kernels stop well below this


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise ValueError(f"{what} must be a tuple of at most {MAX_DIMS} ints, got {describe_value(value)}")
    if not all(type(v) is int and 0 <= v <= INT64_MAX for v in value):
        raise ValueError(f"{what} must hold ints in 0..2**63-1, got {describe_value(value)}")
    return tuple(value)


def checked_numel(shape: tuple[int, ...]) -> int:
    """Elements of `shape`, refused beyond int64 (as torch would)."""
    numel = math.prod(shape)
    if numel > INT64_MAX:
        raise ValueError(f"shape {describe_value(shape)} holds more than 2**63 elements")
    return numel


def describe_value(value: Any) -> str:
    text = repr(value) if isinstance(value, (tuple, list, int)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: DType | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise ValueError(f"storage is a {type(storage).__name__}, not a storage")
    if type(offset) is not int or not 0 <= offset <= INT64_MAX:
        raise ValueError(f"storage offset must be an int in 0..2**63-1, got {describe_value(offset)}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"size has {len(shape)} dims, stride {len(strides)}")
    checked_numel(shape)
    dtype = dtype or storage.dtype or UINT8
    return TensorRef(storage, offset, shape, strides, dtype)


def _rebuild_tensor(storage, storage_offset, size, stride) -> TensorRef:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
) -> TensorRef:
    tensor = _tensor(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad)
    _set_metadata(tensor, metadata)
    return tensor


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
) -> TensorRef:
    if not isinstance(dtype, DType):
        raise ValueError("dtype argument is not a torch dtype")
    tensor = _tensor(storage, storage_offset, size, stride, dtype)
    tensor.requires_grad = bool(requires_grad)
    _set_metadata(tensor, metadata)
    return tensor


def _set_metadata(tensor: TensorRef, metadata: Any) -> None:
    """The conj/neg bits torch.save records; anything else is not rebuilt."""
    if not metadata:
        return
    if (
        isinstance(metadata, dict)
        and metadata.keys() <= {"conj", "neg"}
        and all(type(v) is bool for v in metadata.values())
        and (tensor.dtype.name.startswith("complex") or not metadata.get("conj"))
    ):
        tensor.bits = dict(metadata)
    else:
        tensor.unusual = "tensor metadata " + describe_keys(metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> Any:
    if not isinstance(data, TensorRef):
        return Unsupported("parameter")
    return replace(data, requires_grad=bool(requires_grad), parameter=True)


def _parameter(data=None, requires_grad=True) -> Any:
    return _rebuild_parameter(data, requires_grad, None)


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad, backward_hooks):
    tensor = _tensor(storage, storage_offset, size, stride)
    tensor.unusual = "quantized"
    return tensor


def _rebuild_meta(dtype, size, stride, requires_grad=False) -> TensorRef:
    if not isinstance(dtype, DType):
        raise ValueError("dtype argument is not a torch dtype")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    checked_numel(shape)
    return TensorRef(None, 0, shape, strides, dtype, bool(requires_grad), unusual="meta (no data)")


def _rebuild_from_type_v2(func, new_type, args, state) -> Any:
    if not isinstance(func, Known) or not isinstance(args, tuple):
        raise ValueError("expects a known rebuild function and a tuple")
    result = func.fn(*args)
    if isinstance(result, TensorRef) and new_type is not TENSOR_CLASS:
        if new_type is PARAMETER_CLASS:
            result = replace(result, parameter=True)
        elif not isinstance(new_type, Known):
            result.unusual = f"tensor subclass {getattr(new_type, 'qualname', new_type)}"
    elif isinstance(result, Unsupported) and isinstance(new_type, Known) and new_type is not PARAMETER_CLASS:
        result = Unsupported(new_type.name.rsplit(".", 1)[1])  # `DTensor` says more than `wrapper_subclass`
    return result


def _rebuild_device_tensor_from_cpu_tensor(data, dtype, device, requires_grad) -> Any:
    """A tensor of a device that saves through a CPU copy (XLA, MTIA): that copy, read
    on the CPU as `map_location="cpu"` would; a change of dtype is not rebuilt."""
    if not isinstance(data, TensorRef) or data.dtype is not dtype:
        return Unsupported("device_tensor_from_cpu_tensor")
    return replace(data, requires_grad=bool(requires_grad))


EMPTY_LEGACY_TENSOR = "an empty legacy tensor (torch.FloatTensor() style, never given a storage)"


def _legacy_tensor(dtype: DType) -> Callable[..., Any]:
    """`torch.FloatTensor(...)` and its kin. Torch before 0.4 pickled a tensor as
    `FloatTensor()` followed by BUILD with its view (see `TensorRef.build`); one
    storage argument views that whole storage. Other forms build a tensor from
    numbers in the pickle or allocate one: listed as unsupported, not rebuilt."""

    def build(*args: Any) -> Any:
        if not args:
            return TensorRef(None, 0, (0,), (1,), dtype, unusual=EMPTY_LEGACY_TENSOR)
        if len(args) == 1 and isinstance(args[0], StorageRef):
            storage = args[0]
            if storage.dtype not in (None, dtype):
                raise ValueError(f"a {dtype.name} tensor of a {storage.dtype.name} storage")
            return TensorRef(storage, 0, (storage.nbytes // dtype.itemsize,), (1,), dtype)
        return Unsupported("legacy tensor constructor")

    return build


def _record(qualname: str) -> Known:
    """A plain-data class torch allowlists (an exception, a DTensor's placement): kept
    as the record of its arguments and state that any object is, with no finding."""
    module, name = qualname.rsplit(".", 1)
    func = Global(module, name)
    return Known(qualname, lambda *args, **kwargs: Call(func, args, kwargs or None, 0))


def _unsupported(qualname: str, kind: str) -> Known:
    return Known(qualname, lambda *a, **k: Unsupported(kind))


def _bytes_like(kind: type) -> Any:
    """bytes()/bytearray() of data; of a length they would allocate from nothing."""

    def build(source=b"", *rest):
        if isinstance(source, int):
            raise ValueError(f"{kind.__name__} of a length is refused: it allocates without data")
        return kind(source, *rest) if rest else kind(source)

    return build


def _encode(text, encoding="utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
        raise ValueError("only str with latin1, utf-8 or ascii")
    return text.encode(encoding)


def _set(items=()) -> set:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise ValueError("set() of something that is not a sequence")
    return set(items)


def _complex(real=0.0, imag=0.0) -> complex:
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise ValueError("complex() of something that is not a number")
    return complex(real, imag)


def _ordered_dict(items=()) -> dict:
    if isinstance(items, dict):
        return dict(items)
    if not isinstance(items, (list, tuple)):
        raise ValueError("OrderedDict() of something that is not a sequence")
    return dict(items)


def _layout(name: Any) -> Constant:
    """torch pickles a layout as `_get_layout(str(layout))`, e.g. `'torch.strided'`."""
    if not isinstance(name, str) or not name.replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"layout name must be a plain string, got {describe_value(name)}")
    return Constant(name if name.startswith("torch.") else f"torch.{name}")


def describe_keys(mapping: Any) -> str:
    if isinstance(mapping, dict):
        return "{" + ", ".join(str(k) for k in list(mapping)[:5]) + "}"
    return type(mapping).__name__


@dataclass(frozen=True)
class Constant:
    """An allowed torch global that is a value, not a function (a layout, a qscheme)."""

    qualname: str


TENSOR_CLASS = Constant("torch.Tensor")
PARAMETER_CLASS = Known("torch.nn.parameter.Parameter", _parameter)


def _known_table() -> dict[str, Any]:
    """Every global torch's `weights_only` loader accepts, each as a stand-in.

    The groups follow torch's `_weights_only_unpickler._get_allowed_globals`, then
    the classes torch allowlists with `add_safe_globals` when its own modules are
    imported (`torch.distributed`, `torch.nested`, `torch._dynamo`).
    """
    table: dict[str, Any] = {}

    def add(name: str, fn: Callable[..., Any]) -> None:
        table[name] = Known(name, fn)

    # Tensor rebuild functions (torch._utils), and the one for subclasses.
    add("torch._utils._rebuild_tensor", _rebuild_tensor)
    add("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2)
    add("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3)
    add("torch._utils._rebuild_parameter", _rebuild_parameter)
    add("torch._utils._rebuild_parameter_with_state", _rebuild_parameter)
    add("torch._utils._rebuild_qtensor", _rebuild_qtensor)
    add("torch._utils._rebuild_meta_tensor_no_storage", _rebuild_meta)
    add("torch._utils._rebuild_device_tensor_from_cpu_tensor", _rebuild_device_tensor_from_cpu_tensor)
    add("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2)
    for kind in ("sparse_tensor", "nested_tensor", "wrapper_subclass", "device_tensor_from_numpy"):
        table[f"torch._utils._rebuild_{kind}"] = _unsupported(f"torch._utils._rebuild_{kind}", kind)
    # Python values.
    add("collections.OrderedDict", _ordered_dict)
    add("collections.Counter", _ordered_dict)
    add("_codecs.encode", _encode)
    add("builtins.bytearray", _bytes_like(bytearray))
    add("builtins.bytes", _bytes_like(bytes))  # see DIFFERENCES_FROM_TORCH
    add("builtins.set", _set)
    add("builtins.complex", _complex)
    # torch values.
    add("torch.Size", lambda dims=(): _ints(dims, "torch.Size"))
    add("torch.device", lambda *a: ":".join(str(x) for x in a))
    add("torch.serialization._get_layout", _layout)
    table["torch.Tensor"] = TENSOR_CLASS
    table[PARAMETER_CLASS.name] = PARAMETER_CLASS
    for qscheme in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                    "per_channel_symmetric", "per_channel_affine_float_qparams"):  # fmt: skip
        table[f"torch.{qscheme}"] = Constant(f"torch.{qscheme}")
    # dtypes, storage classes (legacy typed ones also under torch.cuda, except
    # the quantized ones, which torch has no CUDA classes for) and tensor classes.
    for dtype in BY_NAME.values():
        table[f"torch.{dtype.name}"] = dtype
    for storage, dtype in BY_STORAGE.items():
        table[f"torch.{storage}"] = StorageType(dtype)
        if dtype.name not in QUANTIZED:
            table[f"torch.cuda.{storage}"] = StorageType(dtype)
    table["torch.storage.UntypedStorage"] = StorageType(None)
    # TypedStorage names no dtype: torch cannot load a storage of that type either.
    add("torch.storage.TypedStorage", lambda *a, **k: Unsupported("storage built by the pickle"))
    for cls, dtype in BY_TENSOR_CLASS.items():
        add(f"torch.{cls}", _legacy_tensor(dtype))
        add(f"torch.cuda.{cls}", _legacy_tensor(dtype))
        if dtype.name != "bool":  # torch has no sparse bool tensor class
            table[f"torch.sparse.{cls}"] = _unsupported(f"torch.sparse.{cls}", "sparse_tensor")
            table[f"torch.cuda.sparse.{cls}"] = _unsupported(f"torch.cuda.sparse.{cls}", "sparse_tensor")
    # Allowlisted by torch itself on import (add_safe_globals): exceptions and
    # stack summaries (torch.distributed sends them between ranks), DTensors and
    # their specs, jagged nested tensors, a dynamo shape range.
    exceptions = sorted(
        {t.__name__ for t in vars(builtins).values() if isinstance(t, type) and issubclass(t, BaseException)}
    )
    for name in [f"builtins.{n}" for n in exceptions] + _TORCH_RECORDS:
        table[name] = _record(name)
    for name, kind in _TORCH_TENSOR_SUBCLASSES.items():
        table[name] = _unsupported(name, kind)
    return table


_TORCH_RECORDS = [
    "traceback.StackSummary",
    "traceback.FrameSummary",
    "torch.distributed._mesh_layout._MeshLayout",
    "torch.distributed._mesh_layout._FlatLayout",
    "torch.distributed._serialization._Entry",
    "torch.distributed.device_mesh.DeviceMesh",
    "torch.distributed.tensor._dtensor_spec.DTensorSpec",
    "torch.distributed.tensor._dtensor_spec.ShardOrderEntry",
    "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "torch.distributed.tensor.placement_types.Partial",
    "torch.distributed.tensor.placement_types.Replicate",
    "torch.distributed.tensor.placement_types.Shard",
    "torch.distributed.tensor.placement_types._StridedShard",
    "torch._dynamo.decorators._DimRange",
]
_TORCH_TENSOR_SUBCLASSES = {
    "torch.distributed.tensor.DTensor": "DTensor",
    "torch.nested._internal.nested_tensor.NestedTensor": "nested_tensor",
    "torch.nested._internal.nested_tensor._rebuild_njt": "nested_tensor",
}

# Each name where surgery's table and the installed torch's weights_only allowlist
# (`_get_allowed_globals()` and what torch registers with `add_safe_globals` when
# its modules are imported) differ, and why. tests/test_allowlist.py fails on any
# difference not listed here, and on any entry here that is no longer a difference.
# Globals a loading program adds with `add_safe_globals` cannot be known from a
# file: surgery reports them unsafe, as torch.load(weights_only=True) without them.
DIFFERENCES_FROM_TORCH: dict[str, str] = {
    "builtins.bytes": (
        "surgery accepts: pickle protocols 0-2 write b'' as a call of `bytes()`, which builds "
        "nothing but bytes; torch refuses such files"
    ),
}


KNOWN: dict[str, Any] = _known_table()

# TorchScript archives pickle their module objects with these helpers as well.
TORCHSCRIPT_KNOWN: dict[str, Any] = {
    **KNOWN,
    **{
        f"torch.jit._pickle.{name}": Known(f"torch.jit._pickle.{name}", fn)
        for name, fn in {
            "build_intlist": lambda x: x,
            "build_doublelist": lambda x: x,
            "build_boollist": lambda x: x,
            "build_tensorlist": lambda x: x,
            "build_complexlist": lambda x: x,
            "restore_type_tag": lambda value, type_str=None: value,
        }.items()
    },
}


class StorageTable:
    """Turns persistent ids into shared `StorageRef`s, one per storage key.

    torch zip ids are `('storage', type, key, location, numel)`; legacy ids add
    a sixth item, `(view_key, offset, size)` or None, for storage views.
    """

    def __init__(self) -> None:
        self.storages: dict[str, StorageRef] = {}

    def __call__(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"persistent id is a {type(pid).__name__}, not a tuple")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:  # legacy: a pickled module's class and source
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise ValueError(f"unsupported persistent id {pid[0]!r} with {len(pid)} items")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, StorageType):
            raise ValueError(f"storage type is {getattr(storage_type, 'qualname', storage_type)!r}")
        if not isinstance(key, str) or not isinstance(location, str):
            raise ValueError("storage key and location must be strings")
        if type(numel) is not int or numel < 0:
            raise ValueError("storage size must be a non-negative int")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = StorageRef(key, storage_type.dtype, location, numel)
        if view is None:
            return root
        if (
            not isinstance(view, tuple)
            or len(view) != 3
            or not all(type(v) is int and v >= 0 for v in view[1:])
        ):
            raise ValueError("legacy storage view must be (key, offset, size)")
        itemsize = root.dtype.itemsize if root.dtype else 1
        return StorageRef(key, root.dtype, location, view[2], view[1] * itemsize, root=root)


def is_module_state(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in ("_parameters", "_buffers", "_modules"))


__all__ = [
    "Global",
    "KNOWN",
    "Opaque",
    "TORCHSCRIPT_KNOWN",
    "StorageRef",
    "StorageTable",
    "StorageType",
    "TensorRef",
    "Unsupported",
]
