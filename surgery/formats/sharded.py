"""Sharded checkpoints: a `*.index.json` whose `weight_map` names the shard of each tensor.

Each shard is read by its own reader (safetensors or torch, by its bytes); the
index and the shards are checked against each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from surgery.errors import CorruptCheckpoint, NotACheckpoint, NotFound
from surgery.formats.base import Scan, carrying, named_file, refuse_not_regular
from surgery.formats.containers import flatten, locate
from surgery.formats.torch_pickle import TensorRef
from surgery.values import Finding

MAX_INDEX_BYTES = 100_000_000
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar", ".pkl")
ShardReader = Callable[[Path, Path], Scan]  # (shard, the index naming it) -> its Scan


def scan_folder(folder: Path, scan_shard: ShardReader, *, verify: bool = False) -> Scan:
    """A folder is read through the index it holds, or as a torch.distributed.checkpoint
    folder when it holds `.metadata` and no index, or as a DeepSpeed checkpoint folder."""
    indexes = sorted(folder.glob("*.index.json"))
    if not indexes:
        if (folder / ".metadata").is_file():
            from surgery.formats.dcp import scan_dcp

            return scan_dcp(folder, verify=verify)
        from surgery.formats.deepspeed import is_deepspeed_folder, scan_deepspeed

        if is_deepspeed_folder(folder):  # engine.save_checkpoint's folder, or its tag folder
            return scan_deepspeed(folder, verify=verify)
        files = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        hint = f"it holds {', '.join(files[:5])}: inspect one of those" if files else None
        raise NotFound(folder, "a folder with no *.index.json", hint=hint)
    preferred = [p for p in indexes if p.name.endswith(".safetensors.index.json")] or indexes
    scan = scan_index(preferred[0], scan_shard)
    for other in indexes:
        if other != preferred[0]:
            scan.findings.append(
                Finding("notice", f"the folder also holds {other.name}; read with its own path", str(folder))
            )
    return scan


def scan_index(index: Path, scan_shard: ShardReader) -> Scan:
    """Read an index and its shards.

    Args:
        index: the `*.index.json` file.
        scan_shard: reads one shard (its path, the index); it must refuse an index,
            so that an index naming itself (or a cycle of them) ends in an error, not a recursion.
    """
    findings: list[Finding] = []
    with carrying(findings):
        return _scan_index(index, scan_shard, findings)


def _scan_index(index: Path, scan_shard: ShardReader, findings: list[Finding]) -> Scan:
    weight_map, meta = _read_index(index)
    shards = list(dict.fromkeys(weight_map.values()))
    paths = [named_file(index, index.parent, shard, "the index names shard") for shard in shards]
    scans = ((shard, scan_shard(path, index)) for shard, path in zip(shards, paths, strict=True))
    return join_shards(index, weight_map, meta, scans, findings)


def join_shards(
    index: Path,
    weight_map: dict[str, str],
    meta: dict,
    scans: Iterable[tuple[str, Scan]],
    findings: list[Finding],
) -> Scan:
    """The index's Scan from its shards' (each shard's name as the index gives it, and its Scan):
    the tensors of each, checked against the weight map. Local files or remote ones alike.

    Args:
        findings: gathers every finding on the way (`carrying` keeps them on a failure).
    """
    root: dict[str, TensorRef] = {}
    owner: dict[str, str] = {}
    files = [index]
    formats = set()
    shards: list[str] = []
    for shard, sub in scans:
        shards.append(shard)
        files.append(sub.path)
        formats.add(sub.format)
        findings.extend(sub.findings)
        located = locate(sub.root)
        tensors, _, _ = flatten(located.node) if located.path is not None else ([], [], False)
        for name, tensor in tensors:
            if name in owner:
                findings.append(
                    Finding("corrupt", f"tensor {name!r} is in both {owner[name]} and {shard}", str(index))
                )
                continue
            owner[name] = shard
            _qualify_storage(tensor, shard)
            if name not in weight_map:
                findings.append(
                    Finding("notice", f"tensor {name!r} in {shard} is not in the index", str(index))
                )
            elif weight_map[name] != shard:
                findings.append(
                    Finding(
                        "corrupt",
                        f"the index puts {name!r} in {weight_map[name]}, it is in {shard}",
                        str(index),
                    )
                )
            root[name] = tensor
    for name, shard in weight_map.items():
        if name not in owner:
            findings.append(
                Finding("corrupt", f"the index puts {name!r} in {shard}, which does not hold it", str(index))
            )
    total = meta.get("total_size") if isinstance(meta, dict) else None
    stored = sum(t.nbytes for t in root.values())
    if isinstance(total, int) and total != stored:
        findings.append(
            Finding(
                "notice", f"index metadata total_size is {total}, the tensors hold {stored} bytes", str(index)
            )
        )
    kind = " and ".join(sorted(formats)) or "no"
    description = f"sharded: {index.name} with {len(shards)} {kind} shard{'s' if len(shards) != 1 else ''}"
    metadata = {"index": str(index), "shards": shards, "shard_format": kind, "index_metadata": meta}
    return Scan(index, "sharded", description, root, findings, metadata, files)


def _qualify_storage(tensor: TensorRef, shard: str) -> None:
    """Storage keys repeat across torch shards ("0", "1", ...): name the shard too."""
    base = tensor.storage.base if tensor.storage else None
    if base is not None and not base.key.startswith(f"{shard}:"):
        base.key = f"{shard}:{base.key}"


def _read_index(index: Path) -> tuple[dict[str, str], dict]:
    refuse_not_regular(index)
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CorruptCheckpoint(index, f"index file over {MAX_INDEX_BYTES} bytes")
    return parse_index(index, index.read_bytes())


def parse_index(index: Path, text: bytes) -> tuple[dict[str, str], dict]:
    """The weight map and the scalar metadata of an index's text (a file's, or a URL's)."""
    try:
        doc = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, ints over 4300 digits
        raise NotACheckpoint(
            index, f"not a checkpoint: a text file that is not a JSON index ({exc})"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise NotACheckpoint(index, "a JSON file without a weight_map: not a sharded checkpoint index")
    weight_map = doc["weight_map"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptCheckpoint(index, "weight_map must map tensor names to shard file names")
    meta = doc.get("metadata")
    scalars = (str, int, float, bool, type(None))
    return weight_map, {k: v for k, v in meta.items() if isinstance(v, scalars)} if isinstance(
        meta, dict
    ) else {}
