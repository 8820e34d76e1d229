"""torch zip archives written by surgery itself: a data.pkl of `_rebuild_tensor_v2` calls
written opcode by opcode, storages as stored, 64-byte aligned members; provenance in a
`.data/surgery.json` member, which torch ignores. torch.save for dtypes it alone can write.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from surgery.dtypes import BY_NAME
from surgery.errors import SurgeryError
from surgery.formats.torch_pickle import contiguous_strides
from surgery.values import Entry
from surgery.writers.copy import Pieces, RangeCopier, RawBytes, Writeback, _put

if TYPE_CHECKING:
    import torch


PROVENANCE_MEMBER = ".data/surgery.json"


def _write_torch(
    f: BinaryIO,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    metadata: dict[str, str],
    done: Callable[[str], None] | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """A torch zip archive as torch.save writes it, streamed: data.pkl from the entries,
    then each tensor's bytes as a stored, 64-byte aligned member. `torch.load` (with or
    without mmap) reads it; dtypes without a storage class go through torch.save instead."""
    aliases = aliases or {}
    if not streams_torch(entries):
        _torch_save(f, entries, get, metadata, done, aliases)
        return
    stored = [e for e in entries if e.name not in aliases]
    keys = {e.name: str(i) for i, e in enumerate(stored)}
    for alias, kept in aliases.items():
        keys[alias] = keys[kept]
    provenance = {PROVENANCE_MEMBER: json.dumps(metadata, indent=1).encode()}
    _write_archive(f, state_dict_pickle(entries, keys), stored, keys, get, done, provenance)
    for alias in aliases:
        if done is not None:
            done(alias)


def stream_torch_archive(
    f: BinaryIO, e: Entry, value: torch.Tensor | RawBytes | Pieces, writeback: Writeback | None = None
) -> None:
    """What `torch.save(tensor)` writes for one contiguous tensor, streamed (DCP items)."""
    if not streams_torch([e]):
        import torch

        torch.save(value, f)
        return
    _write_archive(f, tensor_pickle(e, "0"), [e], {e.name: "0"}, lambda _: value, None, {}, writeback)


def _write_archive(
    f: BinaryIO,
    pickled: bytes,
    stored: Sequence[Entry],
    keys: dict[str, str],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    done: Callable[[str], None] | None,
    extra: dict[str, bytes],
    writeback: Writeback | None = None,
) -> None:
    """The members in torch.save's order: data.pkl, format records, each storage, version."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:  # type: ignore[arg-type]
        _member(zf, "archive/data.pkl", pickled)
        for name, text in (
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
        ):
            _member(zf, f"archive/{name}", text)
        copier, writeback = RangeCopier(), writeback or Writeback(f)
        try:
            for e in stored:
                with _open_member(zf, f"archive/data/{keys[e.name]}", e.nbytes) as w:
                    _put(w, e, get(e.name), copier)  # through this process: the member computes its CRC
                writeback()
                if done is not None:
                    done(e.name)
        finally:
            copier.close()
        _member(zf, "archive/version", b"3\n")
        _member(zf, "archive/.data/serialization_id", os.urandom(16).hex().encode())
        for name, data in extra.items():
            _member(zf, f"archive/{name}", data)


def streams_torch(entries: Sequence[Entry]) -> bool:
    """Whether a torch file of these entries is streamed (and takes RawBytes): every dtype
    has a storage class to name in the pickle; newer dtypes (float8, uint16) go through torch.save."""
    return all(BY_NAME[e.dtype].storage is not None for e in entries)


def _torch_save(f, entries, get, metadata, done, aliases) -> None:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        kept = aliases.get(e.name)
        value = tensors[kept] if kept in tensors else get(e.name)
        if isinstance(value, RawBytes):
            raise SurgeryError(f.name, f"tensor {e.name!r}: raw bytes cannot go through torch.save")
        tensors[e.name] = value
    torch.save(tensors, f)
    f.flush()
    f.seek(0)
    with zipfile.ZipFile(f, "a") as zf:
        archive = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{archive}/{PROVENANCE_MEMBER}", json.dumps(metadata, indent=1))
    for e in entries:
        if done is not None:
            done(e.name)


ALIGNMENT = 64


def _open_member(zf: zipfile.ZipFile, name: str, size: int):
    """A stored member whose data starts on a 64-byte boundary, as torch aligns them
    (the padding is an extra field of the local header, as torch writes it)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # what zipfile decides from file_size
    start = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)  # type: ignore[union-attr]
    pad = -(start + 4) % ALIGNMENT
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    handle = zf.open(info, "w", force_zip64=zip64)
    if zf.fp.tell() % ALIGNMENT:  # type: ignore[union-attr]
        raise SurgeryError(zf.filename or "archive", f"member {name!r} would not be aligned")
    return handle


def _member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    with _open_member(zf, name, len(data)) as w:
        w.write(data)


def state_dict_pickle(entries: Sequence[Entry], storage_keys: dict[str, str]) -> bytes:
    """data.pkl for a flat state_dict of contiguous CPU tensors, written opcode by opcode
    (protocol 2, as torch.save): `{name: _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())}`.
    Tensors with the same storage key share their storage when loaded."""
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    for e in entries:
        out += _text(e.name) + _tensor_call(e, storage_keys[e.name])
    return bytes(out + b"u.")  # SETITEMS, STOP


def tensor_pickle(e: Entry, storage_key: str) -> bytes:
    """data.pkl of `torch.save(tensor)` for one contiguous CPU tensor."""
    return b"\x80\x02" + _tensor_call(e, storage_key) + b"."


def _tensor_call(e: Entry, storage_key: str) -> bytes:
    dtype = BY_NAME[e.dtype]
    out = b"ctorch._utils\n_rebuild_tensor_v2\n("  # GLOBAL, MARK: the call's arguments
    out += b"(" + _text("storage") + f"ctorch\n{dtype.storage}\n".encode()
    out += _text(storage_key) + _text("cpu") + _int(e.numel) + b"tQ"  # TUPLE, BINPERSID
    out += _int(0) + _ints(e.shape) + _ints(contiguous_strides(e.shape))
    out += b"\x89" + b"ccollections\nOrderedDict\n)R"  # False, OrderedDict()
    return out + b"tR"  # TUPLE, REDUCE


def _text(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + len(raw).to_bytes(1, "little") + raw


def _ints(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"
