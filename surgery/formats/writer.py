"""Writing a state_dict: safetensors or a torch file, atomically, with provenance.

The file is written to a temporary name in the destination folder, flushed,
fsynced and renamed over the destination, so a failed or interrupted write
(an exception, Ctrl-C, SIGTERM) leaves nothing behind and never a half-written
checkpoint; what a killed run leaves is removed by the next write there. safetensors is
written here, one tensor at a time (memory follows the largest tensor);
provenance goes into its `__metadata__`, or into a `.data/surgery.json`
member of a torch zip archive, which torch ignores.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from surgery.dtypes import BY_NAME
from surgery.errors import SurgeryError, UsageError
from surgery.formats.tensors import flat_pieces
from surgery.formats.torch_pickle import contiguous_strides
from surgery.match import Entry

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

PROVENANCE_MEMBER = ".data/surgery.json"


def is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def check_destination(out: Path, sources: list[Path], *, force: bool) -> None:
    """Refuse an output that would lose data or cannot be written, before any work.

    Raises:
        UsageError: OUT is one of the inputs, exists without `force`, or its folder is missing.
    """
    for source in sources:
        same_file = out.exists() and source.exists() and os.path.samefile(out, source)
        if same_file or out.resolve() == source.resolve():
            raise UsageError(out, "the output is an input of this run: it would be overwritten")
    if out.is_dir():
        raise UsageError(out, "the output is a folder: name a file")
    if out.exists() and not force:
        raise UsageError(out, "the output exists", hint="pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(out, f"the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(out, f"the folder {str(out.parent)!r} is not writable")


def check_space(out: Path, size: int) -> None:
    """Refuse, before anything is written, an output larger than the free space where it goes.

    Raises:
        SurgeryError: naming the output, the bytes it needs and the bytes free.
    """
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return  # the write itself will say what is wrong
    if size > free:
        raise SurgeryError(
            out,
            f"the output needs {size:,} bytes ({_gib(size)}), more than the {free:,} ({_gib(free)}) "
            "free on its filesystem",
            hint="free some space, or write the output to another disk",
        )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


@contextmanager
def atomic(out: Path, check: Callable[[Path], None] | None = None, *, size: int = 0) -> Iterator[BinaryIO]:
    """A temporary file beside `out`, renamed over it only when everything was written
    (and `check`, given the temporary file's path, raised nothing). `size`, the bytes about
    to be written, is checked against the free space first. The temporary file goes on
    an exception, Ctrl-C or SIGTERM; one left by a killed run is removed by the next."""
    check_space(out, size)
    remove_stale_temps(out.parent)
    tmp = _temp_path(out, ".tmp")
    made: list[Path] = []  # what this write created and must remove unless put in place

    def remove() -> None:
        for path in made:
            with suppress(FileNotFoundError):
                os.unlink(path)

    with _on_sigterm(remove) as interrupted:
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # an ordinary file, by umask
            made.append(tmp)
            with os.fdopen(fd, "w+b") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if check is not None:
                check(tmp)
            interrupted()
            os.replace(tmp, out)
            _fsync_folder(out.parent)
        except OSError as exc:
            raise SurgeryError(out, f"cannot write: {exc.strerror or exc}") from None
        finally:
            remove()


# Temporary outputs are named `.<output>.surgery-<host>-<pid>-<random>.tmp`: a later write
# into the same folder removes those of this machine whose process is gone (SIGKILL, power
# loss) and nothing else. The host tag keeps a process on another machine sharing the folder
# (NFS) from looking dead here.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP_NAME = re.compile(r"\..+\.surgery-([0-9a-f]{8})-([0-9]+)-[a-z0-9_]{8}\.tmp")


def _temp_path(out: Path, suffix: str) -> Path:
    """A new name beside `out` in surgery's temporary naming (the file is not made here)."""
    return out.parent / f".{out.name}.surgery-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}{suffix}"


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that surgery runs on this machine left in
    `folder` when they were killed: surgery's own naming, this host's tag, and the pid of
    a process that no longer exists. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match[1] != _HOST or _running(int(match[2])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue  # another run removed it first, or it is not ours to remove
        removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    """Whether a process with this pid exists (in doubt: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # another user's process (EPERM), or a pid this system cannot have
    return True


class Terminated(BaseException):
    """SIGTERM arrived during a write that a program's own SIGTERM handler governs: raised
    to leave the write (its temporary output already gone) before that handler runs."""


class _Sigterm:
    """The SIGTERM handler while a write runs. It removes the temporary output itself, so
    the cleanup does not depend on where the signal lands; then, by default, the process
    ends with the signal's own status. Under a program's own handler it raises `Terminated`
    instead, and `check()` raises it again before anything is put in place, should code on
    the way have swallowed it."""

    def __init__(self, cleanup: Callable[[], None], previous: Callable[..., object] | int):
        self.cleanup, self.previous, self.received = cleanup, previous, False

    def __call__(self, signum: int, frame: object) -> None:
        if self.received:
            return  # the first one is being handled
        self.received = True
        with suppress(OSError):
            self.cleanup()
        if not callable(self.previous):  # SIG_DFL: end as killed by SIGTERM (143 in a shell)
            signal.signal(signum, self.previous)
            signal.raise_signal(signum)
        raise Terminated(f"signal {signum} during a write")

    def check(self) -> None:
        if self.received:
            raise Terminated("SIGTERM during a write")


@contextmanager
def _on_sigterm(cleanup: Callable[[], None]) -> Iterator[Callable[[], None]]:
    """While an output is written, SIGTERM first runs `cleanup` (the temporary output goes,
    as on Ctrl-C), then takes its usual course with the handler in place before, restored:
    by default the process ends as killed by SIGTERM; a program's own handler runs once the
    write is left. Yields the check to make before putting the output in place. Nothing
    changes where SIGTERM is ignored, or outside the main thread (Python runs signal
    handlers there only)."""
    previous = signal.getsignal(signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    if not main or previous is signal.SIG_IGN or previous is None:  # None: not set from Python
        yield lambda: None
        return
    handler = _Sigterm(cleanup, previous)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield handler.check
    except BaseException:
        if handler.received and callable(previous):
            signal.signal(signal.SIGTERM, previous)
            previous(signal.SIGTERM, None)  # the program's own handler, from a plain frame
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_state_dict(
    out: Path,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    metadata: dict[str, str],
    *,
    done: Callable[[str], None] | None = None,
    check: Callable[[Path], None] | None = None,
    aliases: dict[str, str] | None = None,
    safetensors: bool | None = None,
) -> None:
    """Write a state_dict to `out`: safetensors or a torch file, by `safetensors` or else by its extension.

    Args:
        entries: name, shape and dtype of every tensor, in the order to write.
        get: the tensor of a name (CPU), asked for when its turn comes: it may be
            built on demand or backed by a memory-mapped file.
        metadata: provenance, str -> str.
        done: called with each name once its bytes are written (to release them).
        check: run on the finished temporary file before it replaces `out`.
        aliases: (torch files) entries that share the storage of an earlier entry: alias -> name.
    """
    size = sum(e.nbytes for e in entries if e.name not in (aliases or {}))
    if is_safetensors(out) if safetensors is None else safetensors:
        _check_safetensors_dtypes(out, entries)
        with atomic(out, check, size=size) as f:
            _write_safetensors(f, entries, get, metadata, done)
    else:
        with atomic(out, check, size=size) as f:
            _write_torch(f, entries, get, metadata, done, aliases)


def _check_safetensors_dtypes(out: Path, entries: Sequence[Entry]) -> None:
    for e in entries:
        dtype = BY_NAME.get(e.dtype)
        if dtype is None or dtype.safetensors is None:
            raise UsageError(
                out,
                f"safetensors cannot store {e.dtype} (tensor {e.name!r})",
                hint="write a .pt file instead",
            )


def _write_safetensors(
    f: BinaryIO,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    metadata: dict[str, str],
    done: Callable[[str], None] | None,
) -> None:
    """Header from the entries, then each tensor's bytes: one tensor in memory at a time,
    none at all when it is copied as raw bytes."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        dtype = BY_NAME[e.dtype]
        size = e.nbytes
        header[e.name] = {
            "dtype": dtype.safetensors,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    copier, writeback = RangeCopier(), Writeback(f)
    try:
        for e in entries:
            _put(f, e, get(e.name), copier, kernel=True)
            writeback()
            if done is not None:
                done(e.name)
    finally:
        copier.close()


def _put(
    f: BinaryIO, e: Entry, value: torch.Tensor | RawBytes | Pieces, copier: RangeCopier, *, kernel: bool
) -> None:
    """One tensor's bytes into `f`: a byte range (copied by the kernel, or read through this
    process where the writer must see the bytes), pieces, or a tensor."""
    if isinstance(value, RawBytes):
        (copier.copy if kernel else copier.read_into)(value, f)
    elif isinstance(value, Pieces):
        _write_pieces(f, e, value)
    else:
        _write_tensor(f, e, value)


def _write_tensor(f: BinaryIO, e: Entry, tensor: torch.Tensor) -> None:
    import torch

    if tuple(tensor.shape) != e.shape or str(tensor.dtype).removeprefix("torch.") != e.dtype:
        raise SurgeryError(
            getattr(f, "name", "output"), f"tensor {e.name!r} is not the {e.dtype} {list(e.shape)} announced"
        )
    for piece in flat_pieces(tensor):  # a strided view is never copied whole
        f.write(memoryview(piece.view(torch.uint8).numpy()))


@dataclass(frozen=True)
class RawBytes:
    """A tensor's bytes as they lie in a file: copied as they are, without torch."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class Pieces:
    """A tensor's bytes in order, made piece by piece (a cast of a big tensor): only one
    piece is in memory at a time."""

    chunks: Iterable[bytes | memoryview]


def _write_pieces(f: BinaryIO, e: Entry, pieces: Pieces) -> None:
    written = 0
    for piece in pieces.chunks:
        written += f.write(piece) or 0
    if written != e.nbytes:
        raise SurgeryError(
            getattr(f, "name", "output"), f"tensor {e.name!r}: {written} bytes made, {e.nbytes} announced"
        )


class Writeback:
    """Starts the disk write of each finished stretch of the output while the next one is
    copied (`posix_fadvise(DONTNEED)` on dirty pages starts their writeback), so the
    closing fsync finds little left: 1 GB here in 0.5-0.75 s instead of 0.9-1.4 s."""

    STRETCH = 32 << 20

    def __init__(self, f: BinaryIO):
        self.f, self.started = f, 0

    def __call__(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        self.f.flush()
        fd = self.f.fileno()
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if end - self.started >= self.STRETCH:
            os.posix_fadvise(fd, self.started, end - self.started, os.POSIX_FADV_DONTNEED)
            self.started = end


class RangeCopier:
    """Copies byte ranges between files in the kernel (copy_file_range, else sendfile,
    else read/write in 8 MiB chunks): no tensor passes through this process's memory."""

    CHUNK = 8 << 20

    def __init__(self) -> None:
        self.files: dict[str, BinaryIO] = {}

    def copy(self, raw: RawBytes, out: BinaryIO) -> None:
        out.flush()
        src = self._source(raw.path)
        pos, left = raw.offset, raw.length
        while left:
            n = self._step(src.fileno(), out.fileno(), pos, left)
            if n <= 0:
                raise SurgeryError(
                    raw.path, f"ends before byte {pos + left}: the source changed or is truncated"
                )
            pos += n
            left -= n

    def read_into(self, raw: RawBytes, out: BinaryIO) -> None:
        """The range through this process, 8 MiB at a time: for writers that must see the
        bytes (a zip member computes its CRC)."""
        src = self._source(raw.path)
        pos, end = raw.offset, raw.offset + raw.length
        while pos < end:
            data = os.pread(src.fileno(), min(self.CHUNK, end - pos), pos)
            if not data:
                raise SurgeryError(raw.path, f"ends before byte {end}: the source changed or is truncated")
            out.write(data)
            pos += len(data)

    def _source(self, path: str) -> BinaryIO:
        """The source file, opened once per copier."""
        if path not in self.files:
            self.files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        return self.files[path]

    def _step(self, src: int, dst: int, pos: int, left: int) -> int:
        count = min(left, 1 << 30)
        for call in (getattr(os, "copy_file_range", None), _sendfile):
            if call is None:
                continue
            try:
                return call(src, dst, count, pos)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise  # disk full, file too large, I/O error: the write failed
                continue  # not supported between these files: try the next way
        data = os.pread(src, min(count, self.CHUNK), pos)
        return os.write(dst, data) if data else 0

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ENOTSUP}


def _sendfile(src: int, dst: int, count: int, pos: int) -> int:
    return os.sendfile(dst, src, pos, count)


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
                    _put(w, e, get(e.name), copier, kernel=False)  # the member computes its CRC
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


@contextmanager
def atomic_folder(out: Path, *, size: int = 0) -> Iterator[Path]:
    """A temporary folder beside `out`, put in its place only when everything was written;
    an existing `out` (allowed by --force) is replaced only then. `size`, the bytes about
    to be written, is checked against the free space first. As for `atomic`, nothing is
    left behind on an exception, Ctrl-C or SIGTERM."""
    check_space(out, size)
    remove_stale_temps(out.parent)
    tmp, old = _temp_path(out, ".tmp"), _temp_path(out, ".old")  # old: the replaced output, meanwhile
    made: list[Path] = []

    def undo() -> None:
        """The temporary folder goes; a replaced output comes back if the new one is not in place."""
        if old in made:
            if not out.exists() and (old / out.name).exists():
                os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        if tmp in made:
            shutil.rmtree(tmp, ignore_errors=True)

    with _on_sigterm(undo) as interrupted:
        try:
            os.mkdir(tmp, 0o777)  # an ordinary folder, by umask
            made.append(tmp)
            yield tmp
            for path in tmp.iterdir():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            interrupted()
            if out.exists():
                os.mkdir(old, 0o700)
                made.append(old)
                os.replace(out, old / out.name)
            os.replace(tmp, out)
            _fsync_folder(out.parent)
        except OSError as exc:
            raise SurgeryError(out, f"cannot write: {exc.strerror or exc}") from None
        finally:
            undo()


def check_folder_destination(out: Path, sources: list[Path], *, force: bool) -> None:
    """An output folder: not an input's folder, not a file, empty unless `force`, in an existing folder."""
    for source in sources:
        if out.resolve() in (source.resolve(), source.resolve().parent):
            raise UsageError(out, "the output folder holds an input of this run")
    if out.exists() and not out.is_dir():
        raise UsageError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(
                out, "the output folder exists and is not empty", hint="pass --force to replace it"
            )
        others = sorted(p.name for p in out.iterdir() if not _checkpoint_output(p))
        if others:
            raise UsageError(
                out,
                f"--force replaces a checkpoint folder, and this one also holds {', '.join(others[:3])}",
                hint="choose another output folder, or remove those files yourself",
            )
    if not out.parent.is_dir():
        raise UsageError(out, f"the folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(out, f"the folder {str(out.parent)!r} is not writable")


def _checkpoint_output(path: Path) -> bool:
    """A file a sharded or DCP output consists of: what --force may replace."""
    name = path.name
    return path.is_file() and (
        name.endswith((".safetensors", ".bin", ".index.json", ".distcp"))
        or name in (".metadata", "surgery.json")
    )


def shards_of(entries: Sequence[Entry], shard_size: int) -> list[list[Entry]]:
    """Entries split in order into shards of at most `shard_size` bytes (a bigger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = e.nbytes
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def write_sharded(
    out: Path,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    metadata: dict[str, str],
    *,
    shard_size: int,
    torch_format: bool = False,
    done: Callable[[str], None] | None = None,
    check: Callable[[Path], None] | None = None,
    aliases: dict[str, str] | None = None,
) -> list[str]:
    """A folder of shards and the index others read (`model.safetensors.index.json`, or
    `pytorch_model.bin.index.json` with `torch_format`), written atomically. Returns the shard names."""
    stem, ext = ("pytorch_model", ".bin") if torch_format else ("model", ".safetensors")
    if not torch_format:
        _check_safetensors_dtypes(out, entries)
    shards = shards_of(entries, shard_size)
    names = [f"{stem}-{i:05d}-of-{len(shards):05d}{ext}" for i in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    with atomic_folder(out, size=sum(e.nbytes for e in entries if e.name not in (aliases or {}))) as tmp:
        for name, group in zip(names, shards, strict=True):
            with open(tmp / name, "w+b") as f:
                if torch_format:
                    here = {e.name for e in group}
                    ties = {a: k for a, k in (aliases or {}).items() if a in here and k in here}
                    _write_torch(f, group, get, {}, done, ties)
                else:
                    _write_safetensors(f, group, get, {"format": "pt"}, done)
            weight_map.update(dict.fromkeys((e.name for e in group), name))
        total = sum(e.nbytes for e in entries)
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        (tmp / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if check is not None:
            check(tmp)
    return names
