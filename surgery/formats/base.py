"""What every reader returns, and the checks they share.

A reader turns a file into a `Scan`: the stand-in tree of what was saved (for
safetensors, a flat dict of tensors), where each storage's bytes lie, and the
findings. No tensor data is read on this path.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.formats.containers import flatten
from surgery.formats.pickle_vm import PICKLE_OPCODE_BYTES
from surgery.formats.torch_pickle import StorageRef, TensorRef
from surgery.safety import Finding


@dataclass
class Scan:
    path: Path
    format: str  # torch-zip | torch-legacy | torchscript | safetensors | sharded | dcp | pickle
    description: str
    root: Any
    findings: list[Finding] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # every file read (shards, .distcp files)


@contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """The file's bytes, mapped read-only: only the pages touched are read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    try:
        yield view
    finally:
        view.release()
        with suppress(BufferError):  # a slice still refers to it; the GC closes it later
            mm.close()


@contextmanager
def carrying(findings: list[Finding]) -> Iterator[None]:
    """A failure inside keeps what was found before it: a payload seen early is
    still reported when something later in the file is broken."""
    try:
        yield
    except SurgeryError as error:
        error.findings = [*findings, *(f for f in error.findings if f not in findings)]
        raise


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
