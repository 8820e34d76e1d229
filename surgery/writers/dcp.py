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
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

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
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    tensors: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    with open(folder / DATA_FILE, "wb") as f:
        writeback = Writeback(f)
        for e in entries:
            start = f.tell() + (-f.tell() % ALIGNMENT)
            f.write(b"\0" * (start - f.tell()))
            stream_torch_archive(_Window(f, start), e, get(e.name), writeback)  # type: ignore[arg-type]
            size = torch.Size(e.shape)
            origin = torch.Size([0] * len(e.shape))
            tensors[e.name] = TensorStorageMetadata(
                TensorProperties(dtype=getattr(torch, e.dtype)), size, [ChunkStorageMetadata(origin, size)]
            )
            storage[MetadataIndex(e.name, origin, 0)] = _StorageInfo(DATA_FILE, start, f.tell() - start)
            if done is not None:
                done(e.name)
    meta = Metadata(
        tensors,
        planner_data={name: (name,) for name in tensors},
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4())),
        version="1.0.0",
    )
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)  # our own objects, of torch's classes: what torch writes
