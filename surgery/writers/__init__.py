"""Entries to bytes: every output surgery writes, streamed and atomic.

outputs.py        temporary file or folder, fsync, rename; destination and space checks
copy.py           one tensor's bytes: raw ranges, cast pieces, flat pieces
safetensors.py    .safetensors
torch_archive.py  torch zip archives (surgery's own data.pkl)
sharded.py        shards and the index
dcp.py            torch.distributed.checkpoint folders
pickle.py         a plain-data pickle that weights_only loading reads (sanitize)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.values import Entry
from surgery.writers.copy import Pieces, RawBytes
from surgery.writers.outputs import atomic
from surgery.writers.safetensors import _check_safetensors_dtypes, _write_safetensors, is_safetensors
from surgery.writers.torch_archive import _write_torch

if TYPE_CHECKING:
    import torch


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
