"""What torch's pickles mean, modelled without torch.

The known table maps the globals torch's own `weights_only` loader allows
(rebuild functions, storage types, dtypes, a few containers) to stand-ins that
record a tensor's storage, offset, shape, stride and dtype. Everything else a
pickle names stays an unknown `Global` for `surgery.safety` to judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from surgery.dtypes import BY_NAME, BY_STORAGE, DType
from surgery.formats.pickle_vm import Global, Known

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
        """BUILD on a tensor (Parameter state, legacy set_): nothing to record."""


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
    return result


def _unsupported(kind: str) -> Known:
    return Known(f"torch._utils._rebuild_{kind}", lambda *a, **k: Unsupported(kind))


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
    table: dict[str, Any] = {}
    for name, fn in {
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_qtensor": _rebuild_qtensor,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "collections.OrderedDict": _ordered_dict,
        "collections.Counter": _ordered_dict,
        "torch.Size": lambda dims=(): _ints(dims, "torch.Size"),
        "torch.device": lambda *a: ":".join(str(x) for x in a),
        "torch.serialization._get_layout": _layout,
        "_codecs.encode": _encode,
        "builtins.bytearray": _bytes_like(bytearray),
        "builtins.bytes": _bytes_like(bytes),  # empty bytes at protocols 0-2
        "builtins.set": _set,
        "builtins.complex": _complex,
    }.items():
        table[name] = Known(name, fn)
    for kind in ("sparse_tensor", "nested_tensor", "wrapper_subclass",
                 "device_tensor_from_numpy", "device_tensor_from_cpu_tensor"):  # fmt: skip
        known = _unsupported(kind)
        table[known.name] = known
    table[PARAMETER_CLASS.name] = PARAMETER_CLASS
    for dtype in BY_NAME.values():
        table[f"torch.{dtype.name}"] = dtype
    for storage, dtype in BY_STORAGE.items():
        table[f"torch.{storage}"] = StorageType(dtype)
        table[f"torch.cuda.{storage}"] = StorageType(dtype)
    table["torch.storage.UntypedStorage"] = StorageType(None)
    table["torch.UntypedStorage"] = StorageType(None)
    table["torch.Tensor"] = TENSOR_CLASS
    for qscheme in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                    "per_channel_symmetric", "per_channel_affine_float_qparams"):  # fmt: skip
        table[f"torch.{qscheme}"] = Constant(f"torch.{qscheme}")
    return table


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
