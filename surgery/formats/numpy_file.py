"""NumPy `.npy` files and `.npz` archives.

An `.npy` file is a magic string, a header (a Python literal dict: `descr`, `fortran_order`,
`shape`) and the array's bytes. A numeric array is listed as a tensor over those bytes.
An object array (`descr` `|O`) stores a pickle instead, which `np.load(allow_pickle=True)`
would run: here it goes through the pickle machine like every pickle. An `.npz` file is
a zip of `.npy` members (deflated by `np.savez_compressed`), each read the same way.
"""

from __future__ import annotations

import ast
import zipfile
import zlib
from pathlib import Path
from typing import Any

from surgery.errors import CorruptCheckpoint, NotACheckpoint
from surgery.formats import pickle_vm
from surgery.formats.base import Scan, carrying, check_storages
from surgery.formats.numpy_pickle import NUMPY_DTYPES, NumpyArray, NumpyArrays
from surgery.formats.safety import Finding, findings_for
from surgery.formats.torch_pickle import (
    KNOWN,
    DataLocation,
    Opaque,
    StorageRef,
    TensorRef,
    checked_numel,
    contiguous_strides,
)
from surgery.formats.torchzip import Member, _member_bytes, _read_local_header, _Window

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1 << 20  # numpy itself refuses headers over 10,000 bytes unless told otherwise


def scan_npy(path: Path, data: memoryview) -> Scan:
    findings: list[Finding] = []
    with carrying(findings):
        root = _array(path, str(path), data, 0, len(data), None, findings)
    return Scan(path, "npy", "a NumPy .npy array", root, findings, {}, [path])


def scan_npz(path: Path, data: memoryview) -> Scan:
    """An `.npz` archive: a zip whose members are all `.npy` files."""
    try:
        infos = zipfile.ZipFile(_Window(data)).infolist()
    except Exception as exc:  # zipfile raises many types on damaged input
        raise CorruptCheckpoint(path, f"damaged or truncated zip archive ({exc})") from None
    names = [i.filename for i in infos]
    if not names or not all(n.endswith(".npy") for n in names):
        raise NotACheckpoint(path, "a zip archive, not a NumPy .npz archive")
    findings: list[Finding] = []
    root: dict[str, Any] = {}
    with carrying(findings):
        for info in infos:
            member = _read_local_header(data, info)
            where = f"{path}: {info.filename}"
            findings.extend(Finding("corrupt", p[1:], where) for p in member.problems if p.startswith("!"))
            name = info.filename.removesuffix(".npy")
            if name in root:
                findings.append(Finding("corrupt", f"member {info.filename!r} appears twice", str(path)))
                continue
            root[name] = _member_array(path, where, data, member, findings)
    return Scan(path, "npz", f"a NumPy .npz archive of {len(root)} arrays", root, findings, {}, [path])


def _member_array(path: Path, where: str, data: memoryview, member: Member, findings: list[Finding]) -> Any:
    info = member.info
    if member.offset < 0:
        return Opaque("numpy array", "not read: its zip entry is damaged")
    if info.compress_type == zipfile.ZIP_STORED:
        return _array(path, where, data, member.offset, info.file_size, None, findings)
    if info.compress_type != zipfile.ZIP_DEFLATED:
        findings.append(Finding("corrupt", f"compression method {info.compress_type}", where))
        return Opaque("numpy array", "not read: unknown compression")
    raw = data[member.offset : member.offset + info.compress_size]
    try:
        head = zlib.decompressobj(-15).decompress(raw, MAX_HEADER_BYTES + 16)
    except zlib.error as exc:
        raise CorruptCheckpoint(path, f"member {info.filename} does not inflate: {exc}") from None
    header = _header(where, head)
    if header[0].lstrip("<>|=").startswith("O"):  # an object array: its whole pickle is needed
        body = _member_bytes(path, data, member, findings)
        return _array(path, where, memoryview(body), 0, len(body), None, findings, searchable=False)
    return _array(path, where, memoryview(head), 0, info.file_size, member, findings, header)


def _array(
    path: Path,
    where: str,
    data: memoryview,
    start: int,
    size: int,
    member: Member | None,
    findings: list[Finding],
    header: tuple[str, bool, tuple[int, ...], int] | None = None,
    *,
    searchable: bool = True,
) -> Any:
    """One `.npy` array whose bytes lie at `data[start:start + size]` (or in the deflated zip
    `member`, of which `data` holds the start): a tensor, an object array's items, or an Opaque."""
    descr, fortran, shape, data_start = header or _header(where, data[start : start + MAX_HEADER_BYTES + 16])
    order, code = (descr[0], descr[1:]) if descr[:1] in "<>|=" else ("|", descr)
    if code.startswith("O"):
        return _object_array(path, where, data, start + data_start, findings, searchable)
    dtype_name = NUMPY_DTYPES.get(code)
    if dtype_name is None:
        return Opaque("numpy array", f"dtype {descr}, shape {list(shape)}: not a tensor dtype")
    from surgery.dtypes import BY_NAME

    dtype = BY_NAME[dtype_name]
    numel = checked_numel(shape)
    nbytes = numel * dtype.itemsize
    swap = order == ">"
    strides = tuple(reversed(contiguous_strides(shape[::-1]))) if fortran else contiguous_strides(shape)
    if member is None:
        location = DataLocation(str(path), start + data_start, min(nbytes, max(size - data_start, 0)), swap)
        storage = StorageRef("0", dtype, "cpu", numel, data=location)
        tensor = TensorRef(storage, 0, shape, strides, dtype)
        if size > data_start + nbytes:
            extra = size - data_start - nbytes
            findings.append(
                Finding("notice", f"{extra} bytes follow the array's data: numpy ignores them", where)
            )
    else:  # deflated: the member is inflated whole when read, the array starts after its header
        if data_start % dtype.itemsize:
            return Opaque("numpy array", f"{descr} {list(shape)}: data not aligned to its elements")
        info = member.info
        location = DataLocation(
            str(path), member.offset, size, swap, info.filename, info.compress_size, info.CRC
        )
        storage = StorageRef("0", dtype, "cpu", size // dtype.itemsize, data=location)
        tensor = TensorRef(storage, data_start // dtype.itemsize, shape, strides, dtype)
    findings.extend(check_storages(tensor, {"0": storage}, where, {}))
    return tensor


def _object_array(
    path: Path, where: str, data: memoryview, start: int, findings: list[Finding], searchable: bool
) -> Any:
    """An object array's pickle, through the machine: its items, and what they would run."""
    arrays = NumpyArrays()
    try:
        result = pickle_vm.run(data, start=start, known={**KNOWN, **arrays.known})
    except pickle_vm.PickleError as exc:
        findings.extend(findings_for(exc.partial, where, known=KNOWN))  # type: ignore[attr-defined]
        raise CorruptCheckpoint(path, f"object array's pickle is broken: {exc}") from None
    findings.extend(findings_for(result, where, known=KNOWN))
    findings.extend(f for f in arrays.place(path, where, search=searchable) if f.severity != "notice")
    findings.append(
        Finding(
            "notice",
            "object array: its data is a pickle, which np.load(allow_pickle=True) would run; read here, nothing run",
            where,
        )
    )
    value = result.value
    if isinstance(value, NumpyArray) and value.objects is not None:
        return value.objects
    return value


def _header(where: str, head: memoryview | bytes) -> tuple[str, bool, tuple[int, ...], int]:
    """(descr, fortran_order, shape, where the data starts) from an `.npy` header, parsed as a
    literal (never evaluated), bounded in size."""
    head = bytes(head)
    if not head.startswith(MAGIC) or len(head) < 10:
        raise CorruptCheckpoint(where, "not a NumPy .npy array: the magic string is missing")
    major = head[6]
    if major == 1:
        length, start = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        length, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise CorruptCheckpoint(where, f".npy format version {major}.{head[7]}, which numpy does not write")
    if length > MAX_HEADER_BYTES or start + length > len(head):
        raise CorruptCheckpoint(where, f".npy header of {length} bytes runs past the data read")
    text = head[start : start + length].decode("utf-8" if major == 3 else "latin-1", "replace")
    try:
        fields = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as exc:
        raise CorruptCheckpoint(where, f".npy header is not a literal dict ({type(exc).__name__})") from None
    if not isinstance(fields, dict) or not {"descr", "fortran_order", "shape"} <= fields.keys():
        raise CorruptCheckpoint(where, ".npy header lacks descr, fortran_order or shape")
    descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or len(shape) > 64:
        raise CorruptCheckpoint(where, f".npy shape {shape!r} is not a tuple of sizes")
    try:
        checked_numel(shape)
    except ValueError as exc:
        raise CorruptCheckpoint(where, str(exc)) from None
    if not isinstance(descr, str):
        descr = "structured"
    return descr, bool(fortran), shape, start + length
