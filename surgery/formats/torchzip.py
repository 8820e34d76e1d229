"""torch zip archives (`torch.save` since 1.6) and TorchScript archives.

The central directory comes from `zipfile`; everything else is read here, from
the mapped file: each member's local header (to find where its bytes start and
to notice when it disagrees with the central directory), `data.pkl` through the
pickle machine, and the size of each storage member. Storage bytes are never
read unless `verify` asks for their CRCs.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import CorruptCheckpoint, NotACheckpoint
from surgery.formats import pickle_vm
from surgery.formats.base import Scan, carrying, check_storages, prefetch
from surgery.formats.safety import findings_for
from surgery.formats.torch_pickle import KNOWN, TORCHSCRIPT_KNOWN, DataLocation, StorageTable
from surgery.formats.torchscript import MAX_SOURCE, UnreadableCode, as_modules, code_file
from surgery.values import Finding

# torch.save never compresses: a deflated member comes from an archive re-zipped by another
# tool, and inflating it is bounded. Real data.pkl files deflate 3-5x (measured with zlib -9:
# resnet50's state_dict 3.7x, the whole pickled model 3.1x, a training checkpoint with Adam
# state 3.5x, ViT-L 4.1x, 100,000 tensors in a 10 MB data.pkl 4.6x) and stay under tens of
# MB; a pickled list of a million equal numbers (2-9 MB) deflates 460-610x. So a pickle or
# any other small member may inflate to RATIO_FREE whatever its ratio, past that only at
# MAX_RATIO times its compressed size, and never past MAX_INFLATED: a 256 KiB member yields
# at most 12.5 MiB of opcodes, not 1 GiB.
MAX_INFLATED = 256 << 20
RATIO_FREE = 4 << 20
MAX_RATIO = 50
# Deflate cannot inflate past 1032x (a 258-byte match per 2 bits) plus a few bytes: a storage
# member that declares more cannot be what it claims. Storages have no other cap; their size
# is the tensor's, which the pickle declares.
DEFLATE_LIMIT = 1032
_INFLATE_CHUNK = 1 << 20
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_NORMAL_FLAGS = 0x08 | 0x800  # data descriptor, UTF-8 names: what torch writes
_TORCH_MEMBERS = ("data.pkl", "version", ".format_version", ".storage_alignment", "byteorder")
_TORCH_FOLDERS = (
    "data/",
    ".data/",
    "code/",
    "constants/",
    "extra/",
    "constants.pkl",
)  # compared in lower case


@dataclass
class Member:
    info: zipfile.ZipInfo
    offset: int  # where its bytes start
    problems: list[str]


def scan_zip(
    path: Path,
    data: memoryview,
    *,
    verify: bool = False,
    base: int = 0,
    label: str | None = None,
    known: dict | None = None,
) -> Scan:
    """Read a torch zip archive's metadata.

    Args:
        path: the file holding the archive.
        data: the archive's bytes: the whole mapped file, or a slice of it when
            the archive is embedded in a larger file (DCP `.distcp` files hold
            one `torch.save` archive per item).
        verify: also check every storage member's CRC.
        base: where `data` starts in the file, so each `DataLocation.offset`
            counts from the start of the file.
        label: how messages name the archive (default: the path).
        known: the globals modelled as stand-ins (default torch's, `KNOWN`): a reader of a
            format that pickles its own classes (DeepSpeed) adds them as records.

    Returns:
        A `Scan` whose storages point at their bytes in `path`.
    """
    findings: list[Finding] = []
    with carrying(findings):
        return _scan_zip(path, data, verify, findings, base, label, known or KNOWN)


class _Window(io.RawIOBase):
    """A read-only file over a memoryview, so `zipfile` reads the central
    directory of an archive embedded in a larger file without copying it."""

    def __init__(self, data: memoryview):
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        if start + offset < 0:
            raise OSError("seek before the start of the archive")
        self._pos = start + offset
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        chunk = self._data[self._pos : self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._pos += n
        return n


def _scan_zip(
    real_path: Path,
    data: memoryview,
    verify: bool,
    findings: list[Finding],
    base: int,
    label: str | None,
    plain_known: dict,
) -> Scan:
    # `path` names the archive in messages; `real_path` is the file its bytes lie in.
    path: Path | str = label or real_path
    where = str(path)
    try:
        infos = zipfile.ZipFile(_Window(data)).infolist()
    except Exception as exc:  # zipfile raises many types on damaged input
        raise CorruptCheckpoint(path, f"damaged or truncated zip archive ({exc})") from None

    prefix = _archive_prefix(path, [i.filename for i in infos])
    # Each member's local header is read next: a remote archive fetches them together.
    prefetch(data, ((i.header_offset, _LOCAL.size + len(i.filename.encode())) for i in infos))
    # torch's reader (miniz) looks names up without regard to case: so does this.
    members: dict[str, list[Member]] = {}
    for info in infos:
        member = _read_local_header(data, info)
        members.setdefault(info.filename.lower(), []).append(member)
        findings.extend(
            Finding("corrupt" if p.startswith("!") else "notice", p.lstrip("!"), f"{where}: {info.filename}")
            for p in member.problems
        )
    for copies in members.values():
        if len(copies) > 1:
            names = ", ".join(sorted({repr(m.info.filename) for m in copies}))
            findings.append(
                Finding(
                    "corrupt",
                    f"member {names} appears {len(copies)} times: zip readers disagree on which copy counts",
                    where,
                )
            )

    def member(name: str) -> Member | None:
        copies = members.get(f"{prefix}/{name}".lower())
        return copies[0] if copies else None

    folder = prefix.lower() + "/"
    prefetch(data, _small_members(members, folder))
    torchscript = any(n.startswith((folder + "code/", folder + "constants.pkl")) for n in members)
    known = TORCHSCRIPT_KNOWN if torchscript else plain_known
    expected = ("__torch__.",) if torchscript else ()
    result, table = _read_data_pkl(path, data, members[folder + "data.pkl"], known, expected, findings)
    if torchscript:
        findings.extend(_torchscript_findings(path, data, folder, members, findings))
    read = {folder + "data.pkl", folder + "constants.pkl"} if torchscript else {folder + "data.pkl"}
    findings.extend(_other_pickles(path, data, members, read, known, expected, findings))

    byteswap = _byteorder(path, data, member("byteorder"), findings) != sys.byteorder
    for key, storage in table.storages.items():
        m = member(f"data/{key}")
        if m is not None and m.offset >= 0:  # a damaged header is already a corrupt finding
            stored = m.info.compress_type == zipfile.ZIP_STORED
            storage.data = DataLocation(
                str(real_path),
                base + m.offset,
                m.info.file_size,
                byteswap,
                None if stored else m.info.filename,
                0 if stored else m.info.compress_size,
                None if stored else m.info.CRC,
            )
    storage_folder = folder + "data/"
    used = {key.lower() for key in table.storages}
    unreferenced = {
        copies[0].info.filename[len(storage_folder) :]: copies[0].info.file_size
        for name, copies in members.items()
        if name.startswith(storage_folder) and name[len(storage_folder) :] not in used
    }
    findings.extend(check_storages(result.value, table.storages, where, unreferenced))
    findings.extend(_unexpected_members(prefix, members, where))
    unchecked: dict[str, str] = {}
    if verify:
        checked, unchecked = _check_crcs(path, data, members)
        findings.extend(checked)

    kind = "torchscript" if torchscript else "torch-zip"
    description = (
        "TorchScript archive (torch.jit.save); its code/ is not run here: load it with torch.jit.load"
        if torchscript
        else "torch zip (torch.save, PyTorch >= 1.6)"
    )
    metadata = {
        "pickle_protocol": result.protocol,
        "archive": prefix,
        "storages": len(table.storages),
        "crc_checked": ("some storages" if unchecked else "every storage") if verify else "data.pkl only",
    }
    if unchecked:
        metadata["crc_not_checked"] = unchecked
    version = _small_text(path, data, member("version"), findings)
    if version is not None:
        metadata["version"] = version
    provenance = _provenance(path, data, member(".data/surgery.json"), findings)
    if provenance:
        metadata["metadata"] = provenance
    root = (
        _script_modules(path, data, folder, members, result.value, findings) if torchscript else result.value
    )
    return Scan(
        real_path, kind, description, root, findings, metadata, [real_path], dict_states=result.dict_states
    )


def _read_data_pkl(
    path: Path | str,
    data: memoryview,
    copies: list[Member],
    known: dict,
    expected: tuple[str, ...],
    findings: list[Finding],
) -> tuple[pickle_vm.Result, StorageTable]:
    """Every copy of data.pkl is read, so a payload in a second copy is still seen.

    The first copy that parses is the one described; when none parses, the
    error carries everything found on the way.
    """
    where = f"{path}: data.pkl"
    chosen: tuple[pickle_vm.Result, StorageTable] | None = None
    failure: CorruptCheckpoint | None = None
    for copy in copies:
        try:
            body = _member_bytes(path, data, copy, findings)
        except CorruptCheckpoint as exc:
            failure = failure or exc
            continue
        table = StorageTable()
        try:
            result = pickle_vm.run(body, known=known, persistent_load=table)
        except pickle_vm.PickleError as exc:
            partial = exc.partial  # type: ignore[attr-defined]
            findings.extend(findings_for(partial, where, expected_prefixes=expected, known=known))
            if len(copies) > 1:
                findings.append(Finding("corrupt", f"a copy of data.pkl is not a valid pickle: {exc}", where))
            failure = failure or CorruptCheckpoint(path, f"data.pkl is not a valid pickle: {exc}")
            continue
        findings.extend(findings_for(result, where, expected_prefixes=expected, known=known))
        if result.end < len(body):
            extra = len(body) - result.end
            findings.append(
                Finding("notice", f"{extra} bytes follow the pickle's STOP: torch ignores them", where)
            )
        chosen = chosen or (result, table)
    if chosen is None:
        raise failure or CorruptCheckpoint(path, "data.pkl cannot be read")
    return chosen


def _small_members(members: dict[str, list[Member]], folder: str) -> list[tuple[int, int]]:
    """The bytes read next, beyond the storages: every pickle, `byteorder`, `version`, TorchScript's
    code/ and surgery's provenance (a remote archive fetches them together)."""
    small = {folder + name for name in ("byteorder", "version", ".data/surgery.json")}
    return [
        (copy.offset, copy.info.compress_size)
        for name, copies in members.items()
        if name in small or name.endswith(".pkl") or name.startswith(folder + "code/")
        for copy in copies
        if copy.offset >= 0
    ]


def _torchscript_findings(
    path: Path | str, data: memoryview, folder: str, members: dict[str, list[Member]], findings: list[Finding]
) -> list[Finding]:
    """TorchScript keeps constants in a pickle of their own, and code that torch.jit.load compiles and runs."""
    out: list[Finding] = []
    where = f"{path}: constants.pkl"
    for copy in members.get(folder + "constants.pkl", []):
        try:
            body = _member_bytes(path, data, copy, findings)
        except CorruptCheckpoint as exc:
            out.append(Finding("corrupt", exc.message, where))
            continue
        try:
            result = pickle_vm.run(body, known=TORCHSCRIPT_KNOWN, persistent_load=StorageTable())
        except pickle_vm.PickleError as exc:
            result = exc.partial  # type: ignore[attr-defined]
            out.append(Finding("corrupt", f"constants.pkl is not a valid pickle: {exc}", where))
        out.extend(findings_for(result, where, expected_prefixes=("__torch__.",), known=TORCHSCRIPT_KNOWN))
    code = [name for name in members if name.startswith(folder + "code/") and name.endswith(".py")]
    if code:
        out.append(
            Finding(
                "notice",
                f"{len(code)} TorchScript code files: torch.jit.load compiles and runs them, surgery never does",
                str(path),
            )
        )
    return out


def _script_modules(
    path: Path | str,
    data: memoryview,
    folder: str,
    members: dict[str, list[Member]],
    root: Any,
    findings: list[Finding],
) -> Any:
    """The module objects as `torch.jit.load` presents them, their parameters and buffers told
    from other attributes by the declarations in code/ (read as text, never run). When those
    cannot be read, every tensor attribute stays listed, as before, with a notice."""

    def source(qualifier: str) -> str:
        name = code_file(qualifier)
        copies = members.get((folder + name).lower())
        if not copies:
            raise UnreadableCode(f"{name} is missing")
        if copies[0].info.file_size > MAX_SOURCE:
            raise UnreadableCode(f"{name} is larger than {MAX_SOURCE:,} bytes")
        try:
            return bytes(_member_bytes(path, data, copies[0], findings)).decode("utf-8")
        except CorruptCheckpoint as exc:
            raise UnreadableCode(exc.message) from None
        except UnicodeDecodeError:
            raise UnreadableCode(f"{name} is not UTF-8 text") from None

    try:
        return as_modules(root, source)
    except UnreadableCode as exc:
        findings.append(
            Finding(
                "notice",
                f"TorchScript code/ does not say which attributes are parameters and buffers ({exc}):"
                " every tensor attribute is listed as state",
                str(path),
            )
        )
        return root


def _other_pickles(
    path: Path | str,
    data: memoryview,
    members: dict[str, list[Member]],
    read: set[str],
    known: dict,
    expected: tuple[str, ...],
    findings: list[Finding],
) -> list[Finding]:
    """Every other `.pkl` member is scanned too, named by its member: a second archive
    folder's data.pkl, a TorchScript bytecode.pkl. Another reader may load what torch does not."""
    out: list[Finding] = []
    for name, copies in members.items():
        if not name.endswith(".pkl") or name in read:
            continue
        for copy in copies:
            where = f"{path}: {copy.info.filename}"
            try:
                body = _member_bytes(path, data, copy, findings)
                result = pickle_vm.run(body, known=known, persistent_load=StorageTable())
            except CorruptCheckpoint as exc:
                out.append(Finding("notice", f"{exc.message}: not scanned", where))
                continue
            except pickle_vm.PickleError as exc:
                result = exc.partial  # type: ignore[attr-defined]
                out.append(Finding("notice", f"a .pkl member that is not a valid pickle: {exc}", where))
            out.extend(findings_for(result, where, expected_prefixes=expected, known=known))
    return out


def _archive_prefix(path: Path | str, names: list[str]) -> str:
    """The archive folder, as torch chooses it: the folder of the zip's first member.

    torch's reader takes the folder from the first member and looks every
    record up in it (without regard to case); `torch.load` then refuses an
    archive with any member outside it (reported below). When that folder holds
    no data.pkl, the first folder that does is described.
    """
    pickles = [n for n in names if n.lower().endswith("/data.pkl") and n.count("/") == 1]
    if pickles:
        first = names[0].split("/", 1)[0] if "/" in names[0] else None
        if first is not None and f"{first}/data.pkl".lower() in {n.lower() for n in pickles}:
            return first
        return pickles[0][: -len("/data.pkl")]
    if any(n.endswith("archive_format") for n in names) or any("/models/" in n for n in names):
        raise NotACheckpoint(path, "a torch.export archive (.pt2): load it with torch.export.load")
    if names and all(n.endswith(".npy") for n in names):
        raise NotACheckpoint(path, "a NumPy .npz archive, not a PyTorch checkpoint")
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise NotACheckpoint(
        path, f"a zip archive but not a torch checkpoint: no data.pkl (holds {shown or 'nothing'})"
    )


def _read_local_header(data: memoryview, info: zipfile.ZipInfo) -> Member:
    """Where the member's bytes start, and how its local header disagrees with the central one."""
    problems: list[str] = []
    start = info.header_offset
    raw = bytes(data[start : start + _LOCAL.size])
    if len(raw) < _LOCAL.size or raw[:4] != b"PK\x03\x04":
        return Member(info, -1, ["!local header is missing: the central directory points at something else"])
    _, _, flags, method, _, _, crc, csize, usize, nlen, elen = _LOCAL.unpack(raw)
    name_raw = bytes(data[start + _LOCAL.size : start + _LOCAL.size + nlen])
    name = name_raw.decode("utf-8" if flags & 0x800 else "cp437", "replace")
    offset = start + _LOCAL.size + nlen + elen
    if name != info.filename:
        problems.append(
            f"!local header names {name!r}, the central directory {info.filename!r}: readers disagree"
        )
    if method != info.compress_type:
        problems.append(
            f"!local header says compression {method}, the central directory {info.compress_type}"
        )
    sizes_here = not flags & 0x08 and 0xFFFFFFFF not in (csize, usize)
    if sizes_here and (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size):
        problems.append("!local header sizes or CRC differ from the central directory: readers disagree")
    if info.flag_bits & 0x1:
        problems.append("!member is encrypted: torch cannot read it")
    elif info.flag_bits & ~_NORMAL_FLAGS:
        problems.append(f"unusual zip flag bits 0x{info.flag_bits:04x}: torch ignores them")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        problems.append(f"!compression method {info.compress_type} is not one torch reads")
    elif info.compress_type == zipfile.ZIP_DEFLATED and "/data/" in info.filename:
        problems.append("storage is compressed: torch reads it, but cannot memory-map it")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > deflate_bound(info.compress_size):
        problems.append(
            f"!declares {info.file_size:,} bytes inflated, more than deflate can make "
            f"of its {info.compress_size:,} compressed bytes"
        )
    if offset + info.compress_size > len(data):
        problems.append(f"!member data runs past the end of the file ({len(data)} bytes): truncated?")
        return Member(info, -1, problems)
    return Member(info, offset, problems)


def _member_bytes(
    path: Path | str, data: memoryview, member: Member, findings: list[Finding]
) -> memoryview | bytes | bytearray:
    info = member.info
    if member.offset < 0:
        raise CorruptCheckpoint(path, f"member {info.filename} cannot be read: its local header is damaged")
    raw = data[member.offset : member.offset + info.compress_size]
    if info.compress_type == zipfile.ZIP_STORED:
        body: memoryview | bytes | bytearray = raw
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        body = inflate(path, info.filename, raw, info.file_size, limit=pickle_limit(info.compress_size))
    else:
        raise CorruptCheckpoint(path, f"member {info.filename} uses compression {info.compress_type}")
    if zlib.crc32(body) != info.CRC:
        findings.append(
            Finding(
                "notice",
                f"CRC mismatch in {info.filename}: torch ignores CRCs and reads the bytes as they are",
                str(path),
            )
        )
    return body


def _small_text(
    path: Path | str, data: memoryview, member: Member | None, findings: list[Finding]
) -> str | None:
    """A short text member (byteorder, version), or None when absent or unreadable."""
    if member is None or member.offset < 0:
        return None
    try:
        return bytes(_member_bytes(path, data, member, findings)[:16]).decode("latin-1").strip()
    except CorruptCheckpoint as exc:
        findings.append(Finding("corrupt", exc.message, str(path)))
        return None


def _provenance(
    path: Path | str, data: memoryview, member: Member | None, findings: list[Finding]
) -> dict[str, str]:
    """What `surgery port` recorded about how the file was made (str -> str), if anything."""
    if member is None or member.offset < 0 or member.info.file_size > 1 << 20:
        return {}
    try:
        doc = json.loads(bytes(_member_bytes(path, data, member, findings)).decode("utf-8"))
    except (CorruptCheckpoint, ValueError, RecursionError):
        findings.append(Finding("notice", ".data/surgery.json is not the JSON surgery writes", str(path)))
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): v for k, v in doc.items() if isinstance(v, str)}


def _byteorder(path: Path | str, data: memoryview, member: Member | None, findings: list[Finding]) -> str:
    value = _small_text(path, data, member, findings)
    if value is None:
        return "little"  # files from before the member existed, or a damaged one (reported)
    if value not in ("little", "big"):
        findings.append(Finding("corrupt", f"byteorder member says {value!r}", str(path)))
        return "little"
    return value


def _unexpected_members(prefix: str, members: dict[str, list[Member]], where: str) -> list[Finding]:
    out = []
    folder = prefix.lower() + "/"
    for name, copies in members.items():
        shown = copies[0].info.filename
        rest = name[len(folder) :] if name.startswith(folder) else None
        if rest is None:
            out.append(
                Finding(
                    "corrupt",
                    f"member {shown!r} lies outside the archive folder {prefix!r}: torch.load refuses the file",
                    where,
                )
            )
        elif rest not in _TORCH_MEMBERS and not rest.startswith(_TORCH_FOLDERS):
            out.append(
                Finding("notice", f"unexpected member {shown!r} ({copies[0].info.file_size} bytes)", where)
            )
    return out


def _check_crcs(
    path: Path | str, data: memoryview, members: dict[str, list[Member]]
) -> tuple[list[Finding], dict[str, str]]:
    """Read every storage member and compare its CRC (torch never does); deflated ones are
    inflated for it, one at a time.

    Returns:
        The findings, and the storage members that could not be checked, with why.
    """
    findings: list[Finding] = []
    unchecked: dict[str, str] = {}
    for name, copies in members.items():
        if "/data/" not in name:
            continue
        for member in copies:
            info = member.info
            if member.offset < 0:
                unchecked[info.filename] = "its local header is damaged"
                continue
            raw = data[member.offset : member.offset + info.compress_size]
            if info.compress_type == zipfile.ZIP_STORED:
                crc = zlib.crc32(raw)
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                try:
                    crc = zlib.crc32(inflate(path, info.filename, raw, info.file_size))
                except CorruptCheckpoint as exc:
                    findings.append(Finding("corrupt", exc.message, str(path)))
                    continue
            else:
                unchecked[info.filename] = f"compression method {info.compress_type}"
                continue
            if crc != info.CRC:
                stored = info.compress_type == zipfile.ZIP_STORED
                findings.append(
                    Finding(
                        "notice" if stored else "corrupt",
                        f"CRC mismatch in {info.filename}: "
                        + (
                            "torch ignores CRCs and reads the bytes as they are"
                            if stored
                            else "surgery refuses the inflated bytes (torch would read them as they are)"
                        ),
                        str(path),
                    )
                )
    return findings, unchecked


def deflate_bound(compressed: int) -> int:
    """The most bytes a deflate stream of `compressed` bytes can inflate to."""
    return DEFLATE_LIMIT * compressed + 1024


def pickle_limit(compressed: int) -> int:
    """How far a deflated pickle (or other small member) may inflate: see MAX_INFLATED."""
    return min(MAX_INFLATED, max(RATIO_FREE, MAX_RATIO * compressed))


def inflate(
    path: Path | str, name: str, compressed: memoryview | bytes, declared: int, *, limit: int | None = None
) -> bytearray:
    """A deflated member's bytes, inflated in bounded steps into exactly `declared` bytes.

    Never holds more than `declared` (itself refused past `limit`, or past what deflate can
    make of the compressed bytes), and refuses a stream that is broken, cut short, or
    inflates to another size than declared. The CRC is the caller's to check.

    Raises:
        CorruptCheckpoint: naming the file and the member.
    """
    if limit is not None and declared > limit:
        bound = f"{limit:,} bytes" + (
            f", {MAX_RATIO}x its {len(compressed):,} compressed bytes" if limit < MAX_INFLATED else ""
        )
        raise CorruptCheckpoint(
            path,
            f"member {name} inflates past {bound} (it declares {declared:,}): refused as a deflate bomb",
            hint="real data.pkl files deflate 3-5x, and torch.save stores them uncompressed",
        )
    if declared > deflate_bound(len(compressed)):
        raise CorruptCheckpoint(
            path,
            f"member {name} declares {declared:,} bytes inflated, more than deflate can make "
            f"of its {len(compressed):,} compressed bytes",
        )
    out = bytearray(declared)
    view = memoryview(out)
    inflater = zlib.decompressobj(-15)
    filled = 0
    try:
        for start in range(0, len(compressed), _INFLATE_CHUNK):
            pending = compressed[start : start + _INFLATE_CHUNK]
            while pending and not inflater.eof:
                piece = inflater.decompress(pending, declared - filled + 1)  # one byte past: noticed
                if len(piece) > declared - filled:
                    raise CorruptCheckpoint(
                        path, f"member {name} inflates past the {declared:,} bytes its header declares"
                    )
                view[filled : filled + len(piece)] = piece
                filled += len(piece)
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as exc:
        raise CorruptCheckpoint(path, f"member {name} does not inflate: {exc}") from None
    finally:
        view.release()
    if not inflater.eof:
        raise CorruptCheckpoint(path, f"member {name}: its deflate stream is cut short")
    if filled != declared:
        raise CorruptCheckpoint(
            path, f"member {name} inflates to {filled:,} bytes, its header declares {declared:,}"
        )
    return out


def inflate_storage(where: str, location: DataLocation, file: memoryview) -> bytearray:
    """A deflated storage member's bytes, checked against its declared size and CRC."""
    name = location.member or "storage"
    compressed = file[location.offset : location.offset + location.compressed]
    try:
        body = inflate(where, name, compressed, location.size)
    finally:
        compressed.release()
    if location.crc is not None and zlib.crc32(body) != location.crc:
        raise CorruptCheckpoint(
            where,
            f"member {name} fails its CRC check: the inflated bytes are not those written",
            hint="torch ignores CRCs and would load them as they are; surgery refuses them",
        )
    return body
