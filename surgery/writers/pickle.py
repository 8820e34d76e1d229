"""Writing a `data.pkl` of plain data and tensors that `torch.load(weights_only=True)` reads.

The tree may hold None, bool, int, float, complex, str, bytes, bytearray, dicts,
`collections.OrderedDict`s (with their attributes, as a state_dict's `_metadata`), lists,
tuples, sets, torch dtypes (`DType`), storages (`StorageOut`) and tensors (`TensorOut`).
Only the opcodes torch's `weights_only` unpickler implements are written (protocol 2, as
`torch.save`), and only globals it allows: the tensor and parameter rebuild functions,
storage classes, dtypes, `collections.OrderedDict`, `_codecs.encode` (bytes),
`builtins.bytearray`, `builtins.set` and `builtins.complex`. Shared and self-referencing
containers stay shared (memo); nothing recurses, so any depth is written.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from surgery.dtypes import DType

BATCH = 1000  # items per MARK ... SETITEMS/APPENDS, as pickle writes them


@dataclass(eq=False)
class StorageOut:
    """A storage of the output archive (`archive/data/<key>`): typed when `dtype` has a
    storage class, else untyped bytes."""

    key: str
    dtype: DType | None
    nbytes: int

    @property
    def typed(self) -> bool:
        return self.dtype is not None and self.dtype.storage is not None

    def pid(self) -> bytes:
        """The persistent id `('storage', type, key, 'cpu', numel)`, then BINPERSID."""
        if self.typed:
            assert self.dtype is not None and self.dtype.storage is not None
            kind, numel = f"ctorch\n{self.dtype.storage}\n", self.nbytes // self.dtype.itemsize
        else:
            kind, numel = "ctorch.storage\nUntypedStorage\n", self.nbytes
        return b"(" + _text("storage") + kind.encode() + _text(self.key) + _text("cpu") + _int(numel) + b"tQ"


@dataclass(eq=False)
class TensorOut:
    """A view of a storage: offset in elements of `dtype`, as `_rebuild_tensor_v2/v3` take it."""

    storage: StorageOut
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType
    requires_grad: bool = False
    parameter: bool = False
    metadata: dict[str, bool] | None = None  # conj/neg bits

    def call(self) -> bytes:
        """`_rebuild_tensor_v2(...)` on a storage of its dtype, else `_rebuild_tensor_v3(..., dtype)`."""
        same = self.storage.typed and self.storage.dtype == self.dtype
        out = b"ctorch._utils\n_rebuild_tensor_v2\n(" if same else b"ctorch._utils\n_rebuild_tensor_v3\n("
        out += self.storage.pid() + _int(self.offset) + _ints(self.shape) + _ints(self.stride)
        out += (b"\x88" if self.requires_grad and not self.parameter else b"\x89") + _EMPTY_ORDERED_DICT
        if not same:
            out += f"ctorch\n{self.dtype.name}\n".encode()
        if self.metadata:
            out += (
                b"}("
                + b"".join(_text(k) + (b"\x88" if v else b"\x89") for k, v in self.metadata.items())
                + b"u"
            )
        out += b"tR"
        if self.parameter:
            flag = b"\x88" if self.requires_grad else b"\x89"
            out = b"ctorch._utils\n_rebuild_parameter\n(" + out + flag + _EMPTY_ORDERED_DICT + b"tR"
        return out


_EMPTY_ORDERED_DICT = b"ccollections\nOrderedDict\n)R"
_MARK, _TUPLE, _SETITEMS, _APPENDS = b"(", b"t", b"u", b"e"
_VALUE, _RAW, _MEMO = "value", "raw", "memo"  # what the writer's stack holds: a value, opcodes, a memo entry


def dumps(root: Any) -> bytes:
    """The pickle of `root` (see the module docstring for what it may hold).

    Raises:
        TypeError: a value of another kind.
    """
    out = bytearray(b"\x80\x02")
    memo: dict[int, int] = {}
    alive: list[Any] = []  # ids stay valid while memoized
    stack: list[tuple[str, Any]] = [(_VALUE, root)]
    while stack:
        op, item = stack.pop()
        if op is _RAW:
            out += item
        elif op is _MEMO:
            _memoize(item, out, memo, alive)
        else:
            _value(item, out, stack, memo, alive)
    out += b"."
    return bytes(out)


def _value(
    obj: Any, out: bytearray, stack: list[tuple[str, Any]], memo: dict[int, int], alive: list[Any]
) -> None:
    kind = type(obj)
    if obj is None:
        out += b"N"
    elif kind is bool:
        out += b"\x88" if obj else b"\x89"
    elif kind is int:
        out += _int(obj)
    elif kind is float:
        out += b"G" + struct.pack(">d", obj)
    elif kind is str:
        out += _text(obj)
    elif kind is complex:
        out += (
            b"cbuiltins\ncomplex\n" + b"G" + struct.pack(">d", obj.real) + b"G" + struct.pack(">d", obj.imag)
        )
        out += b"\x86R"
    elif kind is bytes:  # protocol 2 has no bytes opcode: _codecs.encode(text, 'latin1'), as pickle writes it
        out += b"c_codecs\nencode\n" + _text(obj.decode("latin-1")) + _text("latin1") + b"\x86R"
    elif kind is bytearray:
        out += (
            b"cbuiltins\nbytearray\n" + b"c_codecs\nencode\n" + _text(obj.decode("latin-1")) + _text("latin1")
        )
        out += b"\x86R\x85R"
    elif kind is DType:
        out += f"ctorch\n{obj.name}\n".encode()
    elif kind is StorageOut:
        out += obj.pid()
    elif id(obj) in memo:
        out += _get(memo[id(obj)])
    elif kind is TensorOut:
        out += obj.call()
        _memoize(obj, out, memo, alive)
    elif kind is dict or kind is OrderedDict:
        out += _EMPTY_ORDERED_DICT if kind is OrderedDict else b"}"
        _memoize(obj, out, memo, alive)
        state = dict(vars(obj)) if kind is OrderedDict else {}
        if state:  # after the items, as pickle writes it: BUILD sets the attributes
            stack.append((_RAW, b"b"))
            stack.append((_VALUE, state))
        items = list(obj.items())
        for start in reversed(range(0, len(items), BATCH)):
            stack.append((_RAW, _SETITEMS))
            for key, value in reversed(items[start : start + BATCH]):
                stack.append((_VALUE, value))
                stack.append((_VALUE, key))
            stack.append((_RAW, _MARK))
    elif kind is list:
        out += b"]"
        _memoize(obj, out, memo, alive)
        _batched(list(obj), stack, _APPENDS)
    elif kind is set:
        out += b"cbuiltins\nset\n]"
        stack.append((_MEMO, obj))  # once made: set(list), as pickle writes it at protocol 2
        stack.append((_RAW, b"\x85R"))
        _batched(list(obj), stack, _APPENDS)
    elif kind is tuple:
        if not obj:
            out += b")"
            return
        out += _MARK
        stack.append((_RAW, _TUPLE))
        stack.extend((_VALUE, item) for item in reversed(obj))
    else:
        raise TypeError(f"cannot write a {kind.__name__} into a weights_only pickle")


def _batched(items: list[Any], stack: list[tuple[str, Any]], opcode: bytes) -> None:
    for start in reversed(range(0, len(items), BATCH)):
        stack.append((_RAW, opcode))
        stack.extend((_VALUE, item) for item in reversed(items[start : start + BATCH]))
        stack.append((_RAW, _MARK))


def _memoize(obj: Any, out: bytearray, memo: dict[int, int], alive: list[Any]) -> None:
    index = len(memo)
    memo[id(obj)] = index
    alive.append(obj)
    out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)


def _get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def _text(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) > 255:
        raise TypeError("an int of more than 255 bytes: torch's weights_only unpickler reads no LONG4")
    return b"\x8a" + bytes([len(raw)]) + raw


def _ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"
