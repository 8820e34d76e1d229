"""What every reader returns, and the checks they share.

A reader turns a file into a `Scan`: the stand-in tree of what was saved (for
safetensors, a flat dict of tensors), where each storage's bytes lie, and the
findings. No tensor data is read on this path.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from surgery.errors import CorruptCheckpoint, NotACheckpoint, NotFound, SurgeryError
from surgery.formats.containers import flatten
from surgery.formats.pickle_vm import PICKLE_OPCODE_BYTES
from surgery.formats.torch_pickle import StorageRef, TensorRef
from surgery.values import Finding

T = TypeVar("T")


@dataclass
class Scan:
    path: Path
    format: str  # torch-zip | torch-legacy | torchscript | safetensors | sharded | dcp | deepspeed | pickle
    description: str
    root: Any
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # every file read (shards, .distcp files)
    dict_states: dict[int, tuple[dict, Any]] = field(default_factory=dict)  # a dict's `_metadata`, by id
    remote: Any = None  # formats.remote.Remote when read over HTTP: the traffic, a few bytes more
    hub: dict[str, Any] | None = None  # formats.hub: the hf:// address, where it was read, the repo's files


_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(mode: int) -> str | None:
    """What a `stat` mode is when it is not a regular file ("a named pipe (FIFO)"), or None."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def refuse_not_regular(path: Path, mode: int | None = None) -> None:
    """Refuse anything but a regular file, by `stat` alone, before it is opened.

    Opening a FIFO blocks until a writer comes; a device streams forever or
    acts on being opened (a tape rewinds, a watchdog starts): neither is opened.
    """
    what = not_regular(os.stat(path).st_mode if mode is None else mode)
    if what is not None:
        raise NotACheckpoint(path, f"{what}, not a regular file: checkpoints are read from files")


@contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """The file's bytes, mapped read-only: only the pages touched are read.

    Only a regular file is opened, and without blocking: a FIFO put in its
    place after the check is caught by `fstat` instead of waited on.
    """
    refuse_not_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        refuse_not_regular(path, info.st_mode)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if info.st_size else None
    finally:
        os.close(fd)
    if mm is None:
        yield memoryview(b"")
        return
    view = memoryview(mm)
    try:
        yield view
    finally:
        view.release()
        with suppress(BufferError):  # a slice still refers to it; the GC closes it later
            mm.close()


def is_url(path: object) -> bool:
    """Whether `path` names a file over HTTP(S) (formats.remote) rather than on disk."""
    return isinstance(path, str) and path.lower().startswith(("http://", "https://"))


def is_hub(path: object) -> bool:
    """Whether `path` is an hf:// address (formats.hub: the Hugging Face Hub or its cache)."""
    return isinstance(path, str) and path.startswith("hf://")


def is_remote(path: object) -> bool:
    """Whether `path` is a URL or an hf:// address rather than a path on this disk."""
    return is_url(path) or is_hub(path)


def prefetch(data: Any, ranges: Iterable[tuple[int, int]]) -> None:
    """Say which `(offset, length)` ranges of `data` are read next, so that a remote file
    (formats.remote) fetches them together; a mapped file has them already."""
    if not is_mapped(data):
        data.prefetch(ranges)


def run_pickle(data: Any, attempt: Callable[[memoryview], T]) -> T:
    """`attempt(view)` runs the pickle machine over `view`: the mapped file itself, or the first
    bytes of a remote file, more of them each time the machine runs out (`pickle_vm.Truncated`).
    `attempt` may run again: what it builds must start fresh, or be the same on a rerun
    (a StorageTable gives the same storage for a key again)."""
    return attempt(memoryview(data)) if is_mapped(data) else data.run_pickle(attempt)


def is_mapped(data: Any) -> bool:
    """Whether `data` is a file's bytes on this machine (not a remote file's ranges)."""
    return isinstance(data, memoryview | bytes | bytearray)


@contextmanager
def carrying(findings: list[Finding]) -> Iterator[None]:
    """A failure inside keeps what was found before it: a payload seen early is
    still reported when something later in the file is broken."""
    try:
        yield
    except SurgeryError as error:
        error.findings = [*findings, *(f for f in error.findings if f not in findings)]
        raise


def named_file(named_by: Path, folder: Path, name: str, says: str) -> Path:
    """`folder / name`, the file an index or `.metadata` names, checked before anything opens it.

    The name must be a plain relative path inside `folder`: no NUL byte or lone
    surrogate (the OS cannot take them), no absolute path, `..` or backslash (a Windows path that
    climbs out). Links are followed but must stay in the folder, or in the
    Hugging Face cache that holds it: its snapshot files link into `../../blobs`.
    The target must be a regular file (see `refuse_not_regular`).

    Args:
        named_by: the file naming it (the index, `.metadata`), for messages.
        folder: where names are relative to.
        name: the name as the file gives it.
        says: how messages begin: "the index names shard".

    Raises:
        CorruptCheckpoint: the name leaves the folder, or is not a regular file.
        NotFound: nothing has that name.
    """
    problem = name_problem(name)
    if problem is None:
        path = folder / name
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
            raise CorruptCheckpoint(named_by, f"{says} {name!r}, a link that cannot be followed") from None
        if link_root(folder) not in target.parents:
            problem = "lies outside the folder (through a link)"
        elif not target.exists():
            raise NotFound(named_by, f"{says} {name!r}, which is missing")
        else:
            problem = not_regular(target.stat().st_mode)
            if problem is None:
                return path
            problem = f"is {problem}, not a regular file"
    raise CorruptCheckpoint(named_by, f"{says} {name!r}, which {problem}")


def name_problem(name: str) -> str | None:
    """Why a name that an index or `.metadata` gives is not a plain relative file name inside
    its folder ("lies outside the folder"), or None: by the name alone, no file touched."""
    pure = PurePosixPath(name)
    if "\0" in name:
        return "holds a NUL byte: no file can have that name"
    if not _encodable(name):
        return "holds a lone surrogate: no file here can have that name"
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        return "lies outside the folder"
    return None


def _encodable(name: str) -> bool:
    """Whether the OS can take `name` (a lone surrogate outside surrogateescape's range cannot)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def link_root(folder: Path) -> Path:
    """How far links from files in `folder` may lead: the folder itself, or the whole
    Hugging Face cache of one repository (`models--org--name`, holding `blobs/` and
    `snapshots/<revision>/`) when the folder is one of its snapshots or inside one."""
    folder = folder.resolve()
    for parent in folder.parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return parent.parent
    return folder


SNIFF_BYTES = 4096  # what `sniff` is given of a file's start


def sniff(head: bytes, size: int) -> tuple[list[str], str | None]:
    """The readers to try, in order, from the first bytes; never from the file name.

    torch.load reads anything that is not a zip as a pickle, so a file that
    could be a pickle is also tried as one whatever else it looks like: a
    payload behind a safetensors-like or GGUF-like start is still seen.

    Returns:
        (reader kinds, what the bytes are when no reader accepts them).
    """
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ["zip", "npz"], None
    if head.startswith(b"\x93NUMPY"):
        return ["npy"], None
    maybe_pickle = ["pickle"] if head[:1] and head[0] in PICKLE_OPCODE_BYTES else []
    stripped = head.lstrip()
    # A safetensors length field holds zero or other non-text bytes; a JSON index is text.
    if size >= 9 and head[8:9] == b"{" and not all(32 <= b < 127 or b in b"\t\n\r" for b in head[:8]):
        return ["safetensors", *maybe_pickle], None
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return ["pickle"], None  # torch legacy files too: told apart by their magic number
    if stripped.startswith(b"{"):
        return ["index"], None
    for magic, what in _NOT_CHECKPOINTS:
        if head.startswith(magic) or stripped.lower().startswith(magic):
            return maybe_pickle, what
    if len(head) > 262 and head[257:262] == b"ustar":
        return ["tar", *maybe_pickle], None  # torch.save of PyTorch <= 0.3, or some other archive
    return maybe_pickle, f"not a checkpoint format surgery knows (first bytes: {head[:8].hex(' ')})"


_NOT_CHECKPOINTS = (
    (b"version https://git-lfs", "a Git LFS pointer, not the weights: run `git lfs pull` to fetch the file"),
    (b"<!doctype html", "an HTML page, not a checkpoint: probably a failed download"),
    (b"<html", "an HTML page, not a checkpoint: probably a failed download"),
    (b"GGUF", "a GGUF file (llama.cpp), not a PyTorch checkpoint"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5), not a PyTorch checkpoint"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first (gunzip)"),
    (b"\x08\x03\x12", "probably an ONNX model, not a PyTorch checkpoint"),
)


def check_storages(
    root: Any, storages: dict[str, StorageRef], where: str, unreferenced: dict[str, int]
) -> list[Finding]:
    """Every tensor within its storage, every storage with its bytes.

    Args:
        root: the stand-in tree.
        storages: root storages by key, with `data` set where the bytes exist.
        where: the file, for messages.
        unreferenced: storage bytes in the file that no tensor names, by key.
    """
    findings: list[Finding] = []
    for key, storage in storages.items():
        if storage.data is None:
            findings.append(Finding("corrupt", f"storage {key!r} is referenced but not in the file", where))
        elif storage.nbytes > storage.data.size:
            findings.append(
                Finding(
                    "corrupt",
                    f"storage {key!r} declares {storage.nbytes} bytes, the file holds {storage.data.size}",
                    where,
                )
            )
    tensors, _, _ = flatten(root)
    for name, tensor in tensors:
        problem = tensor_problem(tensor)
        if problem and "not in the file" not in problem:
            findings.append(Finding("corrupt", f"tensor {name!r}: {problem}", where))
    for key, size in unreferenced.items():
        findings.append(
            Finding(
                "notice",
                f"storage {key!r} ({size} bytes) is not used by any tensor: dead or hidden data",
                where,
            )
        )
    return findings


def tensor_problem(tensor: TensorRef) -> str | None:
    """Why the bytes of `tensor` cannot be read, or None."""
    storage = tensor.storage
    if storage is None:
        return None
    data = storage.base.data
    if data is None:
        return f"storage {storage.key!r} is not in the file"
    end = storage.view_offset + tensor.extent()
    limit = min(storage.view_offset + storage.nbytes, data.size)
    if end > limit:
        return f"reaches byte {end} of storage {storage.key!r}, which holds {limit}"
    return None
