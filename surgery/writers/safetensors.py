"""safetensors files written one tensor at a time; provenance in `__metadata__`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from surgery.dtypes import BY_NAME
from surgery.errors import UsageError
from surgery.values import Entry
from surgery.writers.copy import Pieces, RawBytes, Sink

if TYPE_CHECKING:
    import torch


def is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


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
    """Header from the entries, then each tensor's bytes: raw bytes copied by the kernel, pieces
    written by the sink's thread while the next is made (memory: a few pieces, or one tensor)."""
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
    with Sink(f) as sink:
        for e in entries:
            sink.put(e, get(e.name))
            if done is not None:
                done(e.name)
