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
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from surgery.dtypes import BY_NAME
from surgery.errors import SurgeryError, UsageError

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
def atomic(out: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `out`, renamed over it only when everything was written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
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
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    done: Callable[[str], None] | None = None,
) -> None:
    """Write `tensors` (CPU) to `out`, safetensors or torch by its extension.

    Args:
        tensors: name -> tensor, in the order to write; they may be lazily backed
            (a memory-mapped checkpoint): each is read when its turn comes.
        metadata: provenance, str -> str.
        done: called with each name once its bytes are written (to release them).
    """
    if is_safetensors(out):
        _check_safetensors_dtypes(out, tensors)
        with atomic(out) as f:
            _write_safetensors(f, tensors, metadata, done)
    else:
        with atomic(out) as f:
            _write_torch(f, tensors, metadata)


def _check_safetensors_dtypes(out: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    bad = {
        name: str(t.dtype).removeprefix("torch.")
        for name, t in tensors.items()
        if BY_NAME.get(str(t.dtype).removeprefix("torch.")) is None
        or BY_NAME[str(t.dtype).removeprefix("torch.")].safetensors is None
    }
    if bad:
        name, dtype = next(iter(bad.items()))
        raise UsageError(
            out, f"safetensors cannot store {dtype} (tensor {name!r})", hint="write a .pt file instead"
        )


def _write_safetensors(
    f: BinaryIO,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    done: Callable[[str], None] | None,
) -> None:
    import torch

    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        code = BY_NAME[str(t.dtype).removeprefix("torch.")].safetensors
        size = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, t in tensors.items():
        data = t.detach().contiguous().reshape(-1)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))
        del data
        if done is not None:
            done(name)


def _write_torch(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    import torch

    torch.save(dict(tensors), f)
    f.flush()
    f.seek(0)
    with zipfile.ZipFile(f, "a") as zf:  # type: ignore[arg-type]
        archive = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{archive}/{PROVENANCE_MEMBER}", json.dumps(metadata, indent=1))
