"""numpy objects inside pickles, modelled without numpy: dtypes, arrays, scalars.

`pickle.dumps(array)` writes `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`
and BUILDs it with `(version, shape, dtype, fortran, data)`; protocol 5 writes
`numpy.core.numeric._frombuffer(data, dtype, shape, order)`; a dtype is
`numpy.dtype('f4', False, True)` BUILT with its byte order; a scalar is
`numpy.core.multiarray.scalar(dtype, data)`. These few functions only rebuild data,
so in a plain pickle (a detectron2 `.pkl`, an `.npy` object array) they are modelled
here as torch's rebuild functions are: a numeric array becomes a `TensorRef` over its
bytes, a scalar its Python value. Nothing of numpy is imported, and any other numpy
global stays an unknown one for `surgery.formats.safety` to judge.

In torch files these globals remain findings: `torch.load(weights_only=True)` refuses them.
"""

from __future__ import annotations

import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.dtypes import BY_NAME, DType
from surgery.formats.pickle_vm import Known
from surgery.formats.safety import Finding
from surgery.formats.torch_pickle import (
    Constant,
    DataLocation,
    Opaque,
    StorageRef,
    TensorRef,
    checked_numel,
    contiguous_strides,
    describe_value,
)

# numpy's dtype codes (kind + size) that torch has a dtype for.
NUMPY_DTYPES: dict[str, str] = {
    "f2": "float16", "f4": "float32", "f8": "float64",
    "i1": "int8", "i2": "int16", "i4": "int32", "i8": "int64",
    "u1": "uint8", "u2": "uint16", "u4": "uint32", "u8": "uint64",
    "b1": "bool", "c8": "complex64", "c16": "complex128",
}  # fmt: skip
_STRUCT = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
           "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?", "c8": "2f", "c16": "2d"}  # fmt: skip
NDARRAY = Constant("numpy.ndarray")
UNPLACED = "(bytes the pickle holds re-encoded)"
NO_DATA = "numpy array without data"  # made, never given its state


@dataclass
class NumpyDType:
    """`numpy.dtype(code, align, copy)`; BUILD gives its byte order (and fields, for records)."""

    code: str
    order: str = "|"  # < little, > big, | not applicable, = native
    structured: bool = False

    def build(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str):
            self.order = state[1]
            self.structured = len(state) > 4 and state[4] is not None

    @property
    def dtype(self) -> DType | None:
        """torch's dtype of the same elements, or None (objects, strings, records, dates)."""
        name = NUMPY_DTYPES.get(self.code)
        return None if name is None or self.structured else BY_NAME[name]

    @property
    def big_endian(self) -> bool:
        return self.order == ">" or (self.order == "=" and sys.byteorder == "big")

    @property
    def is_object(self) -> bool:
        return self.code.startswith("O")


@dataclass(frozen=True)
class PickledBytes(DataLocation):
    """A storage whose bytes are held here: the pickle stores them re-encoded (protocol 2
    writes bytes as text), so they lie nowhere in the file as they are."""

    raw: bytes = b""
    member: str | None = UNPLACED  # never a plain byte range of the file


@dataclass(eq=False)
class NumpyArray(TensorRef):
    """A numpy array as the pickle builds it: numeric ones are tensors over their bytes."""

    raw: bytes | None = None  # the data, until it is placed in the file
    big_endian: bool = False
    objects: list | None = None  # an object array's items
    problem: str | None = None  # why the data cannot be this array's

    def build(self, state: Any) -> None:
        """`ndarray.__setstate__((version, shape, dtype, fortran, data))`: recorded, never run."""
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            self.unusual = self.unusual or f"numpy array with state {describe_value(state)}"
            return
        shape, dtype, fortran, data = state
        fill_array(self, shape, dtype, bool(fortran), data)


def fill_array(array: NumpyArray, shape: Any, dtype: Any, fortran: bool, data: Any) -> None:
    """What `ndarray.__setstate__` would set, checked: shape, strides, dtype and the data's bytes."""
    try:
        dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
        if dims is None or not all(type(d) is int and d >= 0 for d in dims):
            raise ValueError(f"numpy shape {describe_value(shape)}")
        numel = checked_numel(dims)
    except ValueError as exc:
        array.problem = str(exc)
        array.unusual = array.unusual or "numpy array with a bad shape"
        return
    array.shape = dims
    c_strides = contiguous_strides(dims)
    array.stride = tuple(reversed(contiguous_strides(dims[::-1]))) if fortran else c_strides
    if not isinstance(dtype, NumpyDType):
        array.unusual = array.unusual or f"numpy array of dtype {describe_value(dtype)}"
        return
    if dtype.is_object:
        array.objects = data if isinstance(data, list) else None
        array.unusual = array.unusual or f"numpy object array ({numel} objects, not a tensor)"
        return
    torch_dtype = dtype.dtype
    if torch_dtype is None:
        array.unusual = array.unusual or f"numpy array of dtype {dtype.code} (not a tensor dtype)"
        return
    array.dtype = torch_dtype
    raw = as_bytes(data, numel * torch_dtype.itemsize)
    if raw is None or len(raw) != numel * torch_dtype.itemsize:
        size = len(data) if isinstance(data, (bytes, bytearray, str)) else describe_value(data)
        array.problem = f"numpy array {list(dims)} {torch_dtype.name} holds {size} bytes of data"
        array.unusual = array.unusual or "numpy array whose data does not fit its shape"
        return
    array.raw = raw
    array.storage = StorageRef("", torch_dtype, "cpu", numel)
    if array.unusual == NO_DATA:
        array.unusual = None
    array.big_endian = dtype.big_endian


def as_bytes(data: Any, expected: int) -> bytes | None:
    """The array's bytes from what the pickle holds: bytes, or the text Python 2 pickles hold
    (decoded by the machine as UTF-8 when that is valid, else Latin-1: the length tells which)."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        try:
            return data.encode("latin-1") if len(data) == expected else data.encode("utf-8", "surrogatepass")
        except UnicodeEncodeError:
            return None
    return None


def scalar_value(dtype: Any, data: Any) -> Any:
    """`numpy.core.multiarray.scalar(dtype, data)` as its Python value: int, float, bool, complex;
    the object itself for dtype O; None when it is not a number."""
    if not isinstance(dtype, NumpyDType):
        return None
    if dtype.is_object:
        return data
    code = _STRUCT.get(dtype.code)
    if code is None or dtype.structured:
        return None
    size = struct.calcsize(code)
    raw = as_bytes(data, size)
    if raw is None or len(raw) != size:
        return None
    values = struct.unpack((">" if dtype.big_endian else "<") + code, raw)
    return complex(*values) if len(values) == 2 else values[0]


class NumpyArrays:
    """The numpy globals of one plain pickle, modelled; afterwards, every array placed over
    its bytes in the file (or held, when the pickle re-encodes them)."""

    def __init__(self) -> None:
        self.arrays: list[NumpyArray] = []
        self.known: dict[str, Any] = {"numpy.ndarray": NDARRAY}
        for module in ("numpy.core", "numpy._core"):
            self.known[f"{module}.multiarray._reconstruct"] = Known(
                f"{module}.multiarray._reconstruct", self._reconstruct
            )
            self.known[f"{module}.multiarray.scalar"] = Known(f"{module}.multiarray.scalar", _scalar)
            self.known[f"{module}.numeric._frombuffer"] = Known(
                f"{module}.numeric._frombuffer", self._frombuffer
            )
        self.known["numpy.dtype"] = Known("numpy.dtype", _dtype)

    def _reconstruct(self, cls: Any, shape: Any = (0,), typecode: Any = b"b") -> NumpyArray:
        array = NumpyArray(None, 0, (0,), (1,), BY_NAME["uint8"], unusual=NO_DATA)
        if cls != NDARRAY:
            array.unusual = f"numpy array subclass {getattr(cls, 'qualname', describe_value(cls))}"
        self.arrays.append(array)
        return array

    def _frombuffer(self, data: Any, dtype: Any, shape: Any, order: Any = "C") -> NumpyArray:
        array = self._reconstruct(NDARRAY)
        fill_array(array, shape, dtype, order == "F", data)
        return array

    def place(self, path: Path, where: str, *, search: bool = True) -> list[Finding]:
        """Point each numeric array at its bytes: found in the file where it holds them as they
        are (any copy of the same bytes is the same data), else held in memory.

        The search goes forward from the last array found, and stops at the first array not
        found, so a file costs one pass however many arrays it holds.

        Returns:
            A notice of what was modelled, and a corrupt finding per array whose data does not fit.
        """
        findings = [Finding("corrupt", a.problem, where) for a in self.arrays if a.problem]
        numeric = [a for a in self.arrays if a.raw is not None]
        if not self.arrays:
            return findings
        with _Finder(path if search else None) as finder:
            for key, array in enumerate(numeric):
                raw, storage = array.raw or b"", array.storage
                if storage is None:
                    continue
                offset = finder.find(raw)
                swap = array.big_endian != (sys.byteorder == "big")
                storage.key = f"numpy:{key}"
                if offset is None:
                    storage.data = PickledBytes(str(path), 0, len(raw), swap, raw=raw)
                else:
                    storage.data = DataLocation(str(path), offset, len(raw), swap)
                array.raw = None
        findings.append(
            Finding(
                "notice",
                f"{len(self.arrays)} numpy array{'s' if len(self.arrays) != 1 else ''} rebuilt from their data "
                "as numpy would (numpy's _reconstruct, dtype, scalar): read as tensors, nothing run",
                where,
            )
        )
        return findings


def _dtype(code: Any, align: Any = False, copy: Any = True) -> NumpyDType:
    if not isinstance(code, str) or len(code) > 64:
        raise ValueError(f"numpy dtype code {describe_value(code)}")
    return NumpyDType(code)


def _scalar(dtype: Any, data: Any = None) -> Any:
    value = scalar_value(dtype, data)
    if value is None and not (isinstance(dtype, NumpyDType) and dtype.is_object):
        code = dtype.code if isinstance(dtype, NumpyDType) else describe_value(dtype)
        return Opaque("numpy scalar", f"numpy scalar of dtype {code}")
    return value


@dataclass
class _Finder:
    """Finds byte strings in a file, forward only, giving up after the first miss."""

    path: Path | None
    position: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)
    _map: mmap.mmap | None = None

    def __enter__(self) -> _Finder:
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                self._map = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._map is not None:
            self._map.close()

    def find(self, raw: bytes) -> int | None:
        if self._map is None or not raw:
            return None
        if raw in self.seen:
            return self.seen[raw]
        offset = self._map.find(raw, self.position)
        if offset < 0:
            self._map.close()
            self._map = None  # the pickle re-encodes its bytes: searching on would cost a pass each
            return None
        self.position = offset + len(raw)
        self.seen[raw] = offset
        return offset
