"""Writing a state_dict: safetensors or a torch file, atomically, with provenance.

The file is written to a temporary name in the destination folder, flushed,
fsynced and renamed over the destination, so a failed or interrupted write
leaves nothing behind and never a half-written checkpoint. safetensors is
written here, one tensor at a time (memory follows the largest tensor);
provenance goes into its `__metadata__`, or into a `.data/surgery.json`
member of a torch zip archive, which torch ignores.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from surgery.dtypes import BY_NAME
from surgery.errors import SurgeryError, UsageError
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


@contextmanager
def atomic(out: Path, check: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A temporary file beside `out`, renamed over it only when everything was written
    (and `check`, given the temporary file's path, raised nothing)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, out)
        _fsync_folder(out.parent)
    except OSError as exc:
        raise SurgeryError(out, f"cannot write: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    get: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    *,
    done: Callable[[str], None] | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write a state_dict to `out`, safetensors or torch by its extension.

    Args:
        entries: name, shape and dtype of every tensor, in the order to write.
        get: the tensor of a name (CPU), asked for when its turn comes: it may be
            built on demand or backed by a memory-mapped file.
        metadata: provenance, str -> str.
        done: called with each name once its bytes are written (to release them).
        check: run on the finished temporary file before it replaces `out`.
    """
    if is_safetensors(out):
        _check_safetensors_dtypes(out, entries)
        with atomic(out, check) as f:
            _write_safetensors(f, entries, get, metadata, done)
    else:
        with atomic(out, check) as f:
            _write_torch(f, {e.name: get(e.name) for e in entries}, metadata)


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
    get: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    done: Callable[[str], None] | None,
) -> None:
    """Header from the entries, then each tensor's bytes: one tensor in memory at a time."""
    import torch

    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        dtype = BY_NAME[e.dtype]
        size = (math.prod(e.shape) * dtype.bits + 7) // 8
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
    for e in entries:
        tensor = get(e.name)
        if tuple(tensor.shape) != e.shape or str(tensor.dtype).removeprefix("torch.") != e.dtype:
            raise SurgeryError(f.name, f"tensor {e.name!r} is not the {e.dtype} {list(e.shape)} announced")
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))
        del data, tensor
        if done is not None:
            done(e.name)


def _write_torch(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    import torch

    torch.save(tensors, f)
    f.flush()
    f.seek(0)
    with zipfile.ZipFile(f, "a") as zf:  # type: ignore[arg-type]
        archive = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{archive}/{PROVENANCE_MEMBER}", json.dumps(metadata, indent=1))
