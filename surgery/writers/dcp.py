"""Writing a torch.distributed.checkpoint (DCP) folder, one tensor at a time.

The layout is the one `torch.distributed.checkpoint.save` writes on one rank:
`__0_0.distcp` holding each tensor as a small torch archive (what `torch.save`
writes for one tensor) at an offset, and `.metadata`, the pickled `Metadata`
that names every tensor's dtype, size, chunk and (file, offset, length). Here
each archive is streamed by the torch-file writer (raw bytes where they can be
copied as they lie), so memory follows the largest tensor; torch's own loaders
(`dcp.load`, `dcp_to_torch_save`) read the result.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from surgery.values import Entry
from surgery.writers.copy import RawBytes, Writeback
from surgery.writers.torch_archive import ALIGNMENT, stream_torch_archive

if TYPE_CHECKING:
    import torch

DATA_FILE = "__0_0.distcp"


class _Window:
    """A file seen from `base` on: a zip archive written inside another file keeps
    offsets relative to its own start, as `torch.load` of the slice expects."""

    def __init__(self, f: BinaryIO, base: int):
        self.f, self.base = f, base

    def write(self, data) -> int:
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell() - self.base

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            return self.f.seek(pos + self.base) - self.base
        return self.f.seek(pos, whence) - self.base

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def seekable(self) -> bool:
        return True


def write_dcp(
    folder: Path,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes],
    *,
    done: Callable[[str], None] | None = None,
) -> None:
    """Write `entries` as a DCP checkpoint into the (empty, temporary) `folder`."""
    write_dcp_metadata(folder, write_dcp_file(folder, DATA_FILE, entries, get, done=done))


def write_dcp_file(
    folder: Path,
    name: str,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes],
    *,
    done: Callable[[str], None] | None = None,
) -> DcpPart:
    """One data file of a DCP checkpoint (`__0_0.distcp`; `__R_0.distcp` for rank R of a
    ranked write): each tensor a small torch archive at an aligned offset. Returns what the
    `.metadata` says of them."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    part = DcpPart({}, {})
    with open(folder / name, "wb") as f:
        writeback = Writeback(f)
        for e in entries:
            start = f.tell() + (-f.tell() % ALIGNMENT)
            f.write(b"\0" * (start - f.tell()))
            stream_torch_archive(_Window(f, start), e, get(e.name), writeback)  # type: ignore[arg-type]
            size = torch.Size(e.shape)
            origin = torch.Size([0] * len(e.shape))
            part.tensors[e.name] = TensorStorageMetadata(
                TensorProperties(dtype=getattr(torch, e.dtype)), size, [ChunkStorageMetadata(origin, size)]
            )
            part.storage[MetadataIndex(e.name, origin, 0)] = _StorageInfo(name, start, f.tell() - start)
            if done is not None:
                done(e.name)
    return part


@dataclass(frozen=True)
class DcpPart:
    """What one data file holds, as `.metadata` describes it: name -> its properties, and
    (name, offset) -> (file, offset, length)."""

    tensors: dict[str, Any]  # TensorStorageMetadata
    storage: dict[Any, Any]  # MetadataIndex -> _StorageInfo


def write_dcp_metadata(folder: Path, *parts: DcpPart, order: Sequence[str] = ()) -> None:
    """The `.metadata` of the data files written (`order`: the tensors' order, else the parts')."""
    import uuid

    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    tensors = {name: t for part in parts for name, t in part.tensors.items()}
    if order:
        tensors = {name: tensors[name] for name in order}
    meta = Metadata(
        tensors,
        planner_data={name: (name,) for name in tensors},
        storage_data={index: info for part in parts for index, info in part.storage.items()},
        storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4())),
        version="1.0.0",
    )
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)  # our own objects, of torch's classes: what torch writes
