"""Hugging Face model folders: what `from_pretrained` loads, written atomically.

    out/config.json                   the hf: target's config, or the template folder's as it is
    out/model.safetensors             metadata {"format": "pt"} and surgery's provenance
    out/model-00001-of-0000N.safetensors + model.safetensors.index.json   past the shard size

Tied weights are stored once, as `save_pretrained` does: transformers ties them again
on loading, and surgery restores them from the `surgery.aliases` metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.errors import UsageError
from surgery.formats.checkpoint import ALIASES_KEY
from surgery.formats.hf import CONFIG
from surgery.values import Entry
from surgery.writers.copy import Pieces, RawBytes
from surgery.writers.outputs import atomic_folder
from surgery.writers.safetensors import _check_safetensors_dtypes, _write_safetensors
from surgery.writers.sharded import shard_names, shards_of, write_index, write_shard_files

if TYPE_CHECKING:
    import torch

WEIGHTS = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 10**9  # save_pretrained's max_shard_size before transformers 5 (50GB since)


def folder_config(metadata: dict, where: object) -> str:
    """The config.json of the Hugging Face folder a checkpoint was opened from, as it is.

    Raises:
        UsageError: the checkpoint is no such folder.
        SurgeryError: its config.json is not a JSON object (see `read_config`).
    """
    folder = metadata.get("hf_folder")
    if folder is None:
        raise UsageError(where, "--format hf needs a config.json: convert a Hugging Face model folder")
    from surgery.formats.hf import read_config

    read_config(Path(folder))  # JSON, not too big: checked before it is copied
    return (Path(folder) / CONFIG).read_text(encoding="utf-8")


def hf_entries(entries: Sequence[Entry], aliases: dict[str, str]) -> list[Entry]:
    """The entries in the order a written folder reads back: the stored ones, then the
    tied names (restored from the metadata after them)."""
    return [e for e in entries if e.name not in aliases] + [e for e in entries if e.name in aliases]


def write_hf_folder(
    out: Path,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    metadata: dict[str, str],
    *,
    config: str,
    shard_size: int | None = None,
    done: Callable[[str], None] | None = None,
    check: Callable[[Path], None] | None = None,
    aliases: dict[str, str] | None = None,
) -> list[str]:
    """A folder `from_pretrained` loads: config.json and one model.safetensors, or shards of at
    most `shard_size` bytes (default 5 GB) and their index. Returns the weights files' names.

    Args:
        entries: every tensor, tied names included (they are stored once, named in the metadata).
        metadata: provenance, str -> str; `format: pt` is added, as transformers writes.
        check: run on the finished temporary folder before it replaces `out`.
        aliases: tied names -> the name stored.
    """
    layout = hf_layout(out, entries, metadata, shard_size=shard_size, aliases=aliases)
    with atomic_folder(out, size=layout.nbytes + len(config)) as tmp:
        write_hf_files(tmp, layout, range(len(layout.shards)), get, done=done)
        finish_hf_folder(tmp, layout, config)
        if check is not None:
            check(tmp)
    return layout.names


@dataclass(frozen=True)
class HfLayout:
    """What a Hugging Face folder holds: the tensors stored (tied names left out), in shards."""

    shards: list[list[Entry]]
    names: list[str]  # the weights files, one per shard
    metadata: dict[str, str]  # in the single file, or in the index

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for shard in self.shards for e in shard)


def hf_layout(
    out: Path,
    entries: Sequence[Entry],
    metadata: dict[str, str],
    *,
    shard_size: int | None = None,
    aliases: dict[str, str] | None = None,
) -> HfLayout:
    """The folder's files, decided from the entries alone (the same on every rank of a group).

    Raises:
        UsageError: a dtype safetensors cannot store.
    """
    aliases = {a: k for a, k in (aliases or {}).items() if a in {e.name for e in entries}}
    stored = [e for e in entries if e.name not in aliases]
    _check_safetensors_dtypes(out, stored)
    meta = {"format": "pt", **metadata}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    shards = shards_of(stored, shard_size or DEFAULT_SHARD_SIZE)
    names = [WEIGHTS] if len(shards) == 1 else shard_names(len(shards))
    return HfLayout(shards, names, meta)


def write_hf_files(
    folder: Path,
    layout: HfLayout,
    which: Iterable[int],
    get: Callable[[str], torch.Tensor | RawBytes | Pieces],
    *,
    done: Callable[[str], None] | None = None,
) -> None:
    """The weights files `which` (indices into the layout's shards): the single file with the
    metadata, or shards with `format: pt` only."""
    which = list(which)
    if len(layout.shards) == 1:
        if which:
            with open(folder / WEIGHTS, "w+b") as f:
                _write_safetensors(f, layout.shards[0], get, layout.metadata, done)
        return
    write_shard_files(
        folder, [layout.names[i] for i in which], [layout.shards[i] for i in which], get, done=done
    )


def finish_hf_folder(folder: Path, layout: HfLayout, config: str) -> None:
    """config.json, and the index of a sharded folder (with the metadata)."""
    (folder / CONFIG).write_text(config, encoding="utf-8")
    if len(layout.shards) > 1:
        write_index(folder, layout.names, layout.shards, layout.metadata)
