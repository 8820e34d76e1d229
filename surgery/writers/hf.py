"""Hugging Face model folders: what `from_pretrained` loads, written atomically.

    out/config.json                   the hf: target's config, or the template folder's as it is
    out/model.safetensors             metadata {"format": "pt"} and surgery's provenance
    out/model-00001-of-0000N.safetensors + model.safetensors.index.json   past the shard size

Tied weights are stored once, as `save_pretrained` does: transformers ties them again
on loading, and surgery restores them from the `surgery.aliases` metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.errors import UsageError
from surgery.formats.checkpoint import ALIASES_KEY
from surgery.formats.hf import CONFIG
from surgery.values import Entry
from surgery.writers.copy import Pieces, RawBytes
from surgery.writers.outputs import atomic_folder
from surgery.writers.safetensors import _check_safetensors_dtypes, _write_safetensors
from surgery.writers.sharded import shard_names, shards_of, write_shards

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
    aliases = {a: k for a, k in (aliases or {}).items() if a in {e.name for e in entries}}
    stored = [e for e in entries if e.name not in aliases]
    _check_safetensors_dtypes(out, stored)
    meta = {"format": "pt", **metadata}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    shards = shards_of(stored, shard_size or DEFAULT_SHARD_SIZE)
    names = [WEIGHTS] if len(shards) == 1 else shard_names(len(shards))
    with atomic_folder(out, size=sum(e.nbytes for e in stored) + len(config)) as tmp:
        (tmp / CONFIG).write_text(config, encoding="utf-8")
        if len(shards) == 1:
            with open(tmp / WEIGHTS, "w+b") as f:
                _write_safetensors(f, stored, get, meta, done)
        else:
            write_shards(tmp, names, shards, get, meta, done=done)
        if check is not None:
            check(tmp)
    return names
