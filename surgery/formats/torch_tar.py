"""torch's tar format: `torch.save` of PyTorch 0.3 and earlier.

A tar archive (read by torch's `_legacy_load` with `tarfile`) of four members:

- `sys_info`: a pickled dict (protocol version, byte order, type sizes);
- `storages`: a pickled count, then per storage a pickled `(key, location, storage type)`
  followed by an 8-byte little-endian element count and the raw bytes; then a pickled list
  of storage views `(view key, root key, offset, numel)`;
- `tensors`: a pickled count, then per tensor a pickled `(key, storage key, tensor type)`
  followed by an int32 ndim, 4 bytes of padding, ndim int64 sizes, ndim int64 strides and
  an int64 storage offset;
- `pickle`: the saved object, whose persistent ids are tensor and storage keys.

torch reads all of these with the unrestricted pickle module (`weights_only=True` refuses
the format), so every pickle here goes through the machine and counts for the verdict.
Tensors are located over their storage bytes in the archive, never unpickled.
"""

from __future__ import annotations

import struct
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.dtypes import BY_STORAGE
from surgery.errors import CorruptCheckpoint, NotACheckpoint
from surgery.formats import pickle_vm
from surgery.formats.base import Scan, carrying, check_storages
from surgery.formats.safety import Finding, findings_for
from surgery.formats.torch_pickle import (
    KNOWN,
    Constant,
    DataLocation,
    StorageRef,
    StorageType,
    TensorRef,
    checked_numel,
)
from surgery.formats.torchzip import _Window

MEMBERS = ("sys_info", "storages", "tensors", "pickle")
MAX_COUNT = 10_000_000  # storages or tensors: far beyond any model, far below exhausting memory
# The `tensors` member names each tensor's legacy class (`torch.FloatTensor`): data, not code.
TAR_KNOWN: dict[str, Any] = {
    **KNOWN,
    **{
        f"torch.{cuda}{name.replace('Storage', 'Tensor')}": Constant(
            f"torch.{cuda}{name.replace('Storage', 'Tensor')}"
        )
        for name in BY_STORAGE
        for cuda in ("", "cuda.")
    },
}


def scan_tar(path: Path, data: memoryview) -> Scan:
    findings: list[Finding] = []
    with carrying(findings):
        return _scan_tar(path, data, findings)


def _scan_tar(path: Path, data: memoryview, findings: list[Finding]) -> Scan:
    parts = read_tar(path, data, findings)
    obj = parts.members["pickle"].pickle(findings, parts.persistent)
    for extra in parts.shadowed:  # an earlier copy torch skips: its payload is still reported
        extra.pickle(findings, parts.persistent)
    roots = {key: s for key, s in parts.storages.items() if s.root is None}
    findings.extend(check_storages(obj.value, roots, str(path), {}))
    metadata = {"pickle_protocol": obj.protocol, "storages": len(roots), "tensors": len(parts.tensors)}
    description = "torch tar (torch.save of PyTorch 0.3 and earlier)"
    return Scan(path, "torch-tar", description, obj.value, findings, metadata, [path])


@dataclass
class TarParts:
    """What the object pickle refers to: every storage and tensor, located in the archive."""

    members: dict[str, _Member]  # by name, the copy torch reads (the last)
    shadowed: list[_Member]  # earlier copies of `pickle`
    storages: dict[str, StorageRef]
    tensors: dict[str, TensorRef]

    def persistent(self, pid: Any) -> Any:
        """The object pickle's persistent ids: tensor and storage keys, or a module's class."""
        if isinstance(pid, tuple) and pid and pid[0] == "module" and len(pid) == 4:
            return pid[1]  # a pickled module's class: a global, judged like any other
        key = str(pid)
        if key in self.tensors:
            return self.tensors[key]
        if key in self.storages:
            return self.storages[key]
        raise ValueError(f"no tensor or storage {key!r} in the archive")


def read_tar(path: Path, data: memoryview, findings: list[Finding]) -> TarParts:
    """The members, storages and tensors of a torch tar archive (its pickles but the object's
    read on the way, their findings added to `findings`)."""
    where = str(path)
    try:
        with tarfile.open(fileobj=_Window(data), mode="r:") as tar:  # type: ignore[arg-type]
            infos = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise CorruptCheckpoint(path, f"damaged or truncated tar archive ({exc})") from None
    copies: dict[str, list[tarfile.TarInfo]] = {}
    for info in infos:
        copies.setdefault(info.name, []).append(info)
    if not all(name in copies for name in ("storages", "tensors", "pickle")):
        shown = ", ".join(sorted(copies)[:4]) or "nothing"
        raise NotACheckpoint(path, f"a tar archive, not a torch < 0.4 checkpoint (holds {shown})")
    for name, found in copies.items():
        if len(found) > 1:
            findings.append(Finding("corrupt", f"member {name!r} appears {len(found)} times", where))
        elif name not in MEMBERS:
            findings.append(Finding("notice", f"unexpected member {name!r} ({found[0].size} bytes)", where))
    members = {name: _Member(path, data, found[-1]) for name, found in copies.items()}  # torch reads the last
    if "sys_info" in members:
        members["sys_info"].pickle(findings)
    storages = _storages(members["storages"], findings)
    tensors = _tensors(members["tensors"], storages, findings)
    shadowed = [_Member(path, data, info) for info in copies["pickle"][:-1]]
    return TarParts(members, shadowed, storages, tensors)


class _Member:
    """One member's bytes and a cursor over them: pickles in a row, raw fields between them."""

    def __init__(self, path: Path, data: memoryview, info: tarfile.TarInfo):
        self.path, self.data, self.name = path, data, info.name
        self.start = info.offset_data
        self.end = info.offset_data + info.size
        if self.end > len(data):
            raise CorruptCheckpoint(path, f"member {info.name!r} runs past the end of the file: truncated")
        self.pos = self.start
        self.where = f"{path}: {info.name}"

    def pickle(self, findings: list[Finding], persistent: Any = None) -> pickle_vm.Result:
        where = self.where
        body = self.data[: self.end]  # a pickle must end inside its member
        try:
            result = pickle_vm.run(body, start=self.pos, known=TAR_KNOWN, persistent_load=persistent)
        except pickle_vm.PickleError as exc:
            findings.extend(findings_for(exc.partial, where, known=KNOWN))  # type: ignore[attr-defined]
            raise CorruptCheckpoint(self.path, f"{self.name}: broken pickle: {exc}") from None
        findings.extend(findings_for(result, where, known=KNOWN))
        self.pos = result.end
        return result

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise CorruptCheckpoint(self.path, f"{self.name}: {what} runs past the end of the member")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def count(self, findings: list[Finding], what: str) -> int:
        value = self.pickle(findings).value
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            raise CorruptCheckpoint(self.path, f"{self.name}: the {what} count is {value!r}")
        return value


def _storages(member: _Member, findings: list[Finding]) -> dict[str, StorageRef]:
    """Each storage's type and location, its bytes located in the member; then the views."""
    storages: dict[str, StorageRef] = {}
    for _ in range(member.count(findings, "storage")):
        record = member.pickle(findings).value
        if not (isinstance(record, tuple) and len(record) == 3 and isinstance(record[2], StorageType)):
            raise CorruptCheckpoint(member.path, f"storages: a record is {pickle_vm.describe(record)}")
        key, location, storage_type = str(record[0]), str(record[1]), record[2]
        numel = int.from_bytes(member.take(8, f"storage {key!r}"), "little", signed=True)
        itemsize = storage_type.dtype.itemsize if storage_type.dtype else 1
        if numel < 0:
            raise CorruptCheckpoint(member.path, f"storages: storage {key!r} holds {numel} elements")
        offset = member.pos
        member.take(numel * itemsize, f"storage {key!r}")
        storage = StorageRef(key, storage_type.dtype, location, numel)
        storage.data = DataLocation(str(member.path), offset, numel * itemsize, sys.byteorder != "little")
        storages[key] = storage
    views = member.pickle(findings).value
    for view in views if isinstance(views, list) else ():
        if not (isinstance(view, tuple) and len(view) == 4 and str(view[1]) in storages):
            findings.append(Finding("corrupt", f"bad storage view {pickle_vm.describe(view)}", member.where))
            continue
        target, root, offset, numel = str(view[0]), storages[str(view[1])], view[2], view[3]
        if type(offset) is not int or type(numel) is not int or offset < 0 or numel < 0:
            findings.append(Finding("corrupt", f"bad storage view {pickle_vm.describe(view)}", member.where))
            continue
        itemsize = root.dtype.itemsize if root.dtype else 1
        storages[target] = StorageRef(
            root.key, root.dtype, root.location, numel, offset * itemsize, root=root
        )
    return storages


_INT32, _INT64 = struct.Struct("<i"), struct.Struct("<q")


def _tensors(
    member: _Member, storages: dict[str, StorageRef], findings: list[Finding]
) -> dict[str, TensorRef]:
    """Each tensor's storage, sizes, strides and offset, as `_legacy_load` reads them."""
    tensors: dict[str, TensorRef] = {}
    for _ in range(member.count(findings, "tensor")):
        record = member.pickle(findings).value
        if not (isinstance(record, tuple) and len(record) == 3):
            raise CorruptCheckpoint(member.path, f"tensors: a record is {pickle_vm.describe(record)}")
        key, storage_key = str(record[0]), str(record[1])
        (ndim,) = _INT32.unpack(member.take(4, f"tensor {key!r}"))
        member.take(4, f"tensor {key!r}")  # ndim was once written as 8 bytes
        if not 0 <= ndim <= 64:
            raise CorruptCheckpoint(member.path, f"tensors: tensor {key!r} has {ndim} dimensions")
        shape = struct.unpack(f"<{ndim}q", member.take(8 * ndim, f"tensor {key!r}"))
        stride = struct.unpack(f"<{ndim}q", member.take(8 * ndim, f"tensor {key!r}"))
        (offset,) = _INT64.unpack(member.take(8, f"tensor {key!r}"))
        storage = storages.get(storage_key)
        if storage is None:
            raise CorruptCheckpoint(
                member.path, f"tensors: tensor {key!r} names no storage ({storage_key!r})"
            )
        if min((*shape, *stride, offset), default=0) < 0:
            raise CorruptCheckpoint(
                member.path, f"tensors: tensor {key!r} has a negative size, stride or offset"
            )
        try:
            checked_numel(shape)
        except ValueError as exc:
            raise CorruptCheckpoint(member.path, f"tensors: tensor {key!r}: {exc}") from None
        dtype = storage.dtype
        if dtype is None:
            raise CorruptCheckpoint(member.path, f"tensors: tensor {key!r} has an untyped storage")
        tensors[key] = TensorRef(storage, offset, shape, stride, dtype)
    return tensors
