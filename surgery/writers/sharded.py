"""Sharded folders: shards of at most a size, and the index others read (HF layout)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.values import Entry
from surgery.writers.copy import Pieces, RawBytes
from surgery.writers.outputs import atomic_folder
from surgery.writers.safetensors import _check_safetensors_dtypes, _write_safetensors
from surgery.writers.torch_archive import _write_torch

if TYPE_CHECKING:
    import torch


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
    if not torch_format:
        _check_safetensors_dtypes(out, entries)
    shards = shards_of(entries, shard_size)
    names = shard_names(len(shards), torch_format=torch_format)
    with atomic_folder(out, size=sum(e.nbytes for e in entries if e.name not in (aliases or {}))) as tmp:
        write_shards(tmp, names, shards, get, metadata, torch_format=torch_format, done=done, aliases=aliases)
        if check is not None:
            check(tmp)
    return names


def shard_names(count: int, *, torch_format: bool = False) -> list[str]:
    """`model-00001-of-00003.safetensors`, ... (`pytorch_model-...bin` with `torch_format`)."""
    stem, ext = ("pytorch_model", ".bin") if torch_format else ("model", ".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def write_shards(
    folder: Path,
    names: Sequence[str],
    shards: Sequence[Sequence[Entry]],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    metadata: dict[str, str],
    *,
    torch_format: bool = False,
    done: Callable[[str], None] | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """Each group of entries into its named shard in `folder`, then the index naming them,
    with `metadata` (and the total size) in the index; shards get `format: pt` only."""
    write_shard_files(folder, names, shards, get, torch_format=torch_format, done=done, aliases=aliases)
    write_index(folder, names, shards, metadata, torch_format=torch_format)


def write_shard_files(
    folder: Path,
    names: Sequence[str],
    shards: Sequence[Sequence[Entry]],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    *,
    torch_format: bool = False,
    done: Callable[[str], None] | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """Each group of entries into its named shard file in `folder` (some of a folder's shards,
    when several processes write it)."""
    for name, group in zip(names, shards, strict=True):
        with open(folder / name, "w+b") as f:
            if torch_format:
                here = {e.name for e in group}
                ties = {a: k for a, k in (aliases or {}).items() if a in here and k in here}
                _write_torch(f, group, get, {}, done, ties)
            else:
                _write_safetensors(f, group, get, {"format": "pt"}, done)


def write_index(
    folder: Path,
    names: Sequence[str],
    shards: Sequence[Sequence[Entry]],
    metadata: dict[str, str],
    *,
    torch_format: bool = False,
) -> None:
    """The index of a sharded folder: every name's shard, the total size and `metadata`."""
    weight_map: dict[str, str] = {}
    for name, group in zip(names, shards, strict=True):
        weight_map.update(dict.fromkeys((e.name for e in group), name))
    total = sum(e.nbytes for group in shards for e in group)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    stem_ext = "pytorch_model.bin" if torch_format else "model.safetensors"
    (folder / f"{stem_ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
