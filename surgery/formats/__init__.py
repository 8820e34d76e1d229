"""Reading checkpoint files: format detection by bytes, metadata without torch.

`scan(path)` is the one entry point; it picks the reader from the file's first
bytes (never its name) and returns a `Scan`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery.errors import CorruptCheckpoint, NotACheckpoint, NotFound, SurgeryError
from surgery.formats.base import SNIFF_BYTES, Scan, is_hub, is_url, mapped, sniff

__all__ = ["Scan", "scan"]

DCP_METADATA = ".metadata"


def scan(path: str | Path, *, verify: bool = False) -> Scan:
    """Read a checkpoint's metadata: tensors, containers, findings. No tensor data.

    Args:
        path: a file in any supported format, a `*.index.json`, or a folder holding one;
            a Hugging Face model folder (config.json beside its weights or their index);
            a torch.distributed.checkpoint folder or its `.metadata` file; a DeepSpeed ZeRO
            checkpoint folder (the consolidated fp32 state_dict); an http(s):// URL of a file or
            an index, read with range requests (formats.remote); an
            hf://ORG/REPO[@REVISION][/PATH] address (formats.hub: the Hub or its local cache).
        verify: also read every storage to check zip CRCs (reads all the data).

    Raises:
        SurgeryError: the path is missing, not a checkpoint, or damaged.
    """
    if is_url(path):
        from surgery.formats.remote import scan_url

        return scan_url(path, verify=verify)
    if is_hub(path):
        from surgery.formats.hub import scan_hub

        return scan_hub(path, verify=verify)
    return _scan(Path(path), verify, shard_of=None)


def _scan(path: Path, verify: bool, *, shard_of: Path | None) -> Scan:
    """`scan`; a shard of the index `shard_of` is one file: never a folder, DCP or another index
    (an index naming itself, or a cycle of them, would be read forever)."""
    try:
        if path.is_dir() and shard_of is None:
            from surgery.formats.hf import scan_hf_folder, weights_of
            from surgery.formats.sharded import scan_folder

            weights = weights_of(path)
            if weights:  # config.json beside model.safetensors, pytorch_model.bin or their index
                return scan_hf_folder(path, weights, lambda p: _scan(p, verify, shard_of=None))
            return scan_folder(path, lambda p, index: _scan(p, verify, shard_of=index), verify=verify)
        if not path.exists():
            raise NotFound(path, "no such file or folder")
        if path.name == DCP_METADATA and path.is_file() and shard_of is None:  # the name DCP gives it
            from surgery.formats.dcp import scan_dcp

            return scan_dcp(path.parent, verify=verify)
        with mapped(path) as data:
            return read_bytes(path, data, verify=verify, shard_of=shard_of)
    except PermissionError as exc:
        raise NotFound(path, f"cannot read: {exc.strerror}") from None
    except IsADirectoryError:
        raise NotFound(path, "is a directory") from None
    except SurgeryError:
        raise
    except OSError as exc:
        raise NotFound(path, f"cannot read: {exc.strerror or exc}") from None


def read_bytes(
    path: Path, data: Any, *, verify: bool, shard_of: Path | None, read: Callable[..., Scan] | None = None
) -> Scan:
    """A file's bytes (mapped, or a remote file's ranges) read by the reader its first bytes name.

    Args:
        read: reads one kind (`read_kind`'s arguments); formats.remote gives its own.
    """
    if len(data) == 0:
        raise NotACheckpoint(path, "empty file (0 bytes)")
    kinds, what = sniff(bytes(data[:SNIFF_BYTES]), len(data))
    if shard_of is not None and kinds == ["index"]:
        raise CorruptCheckpoint(
            shard_of,
            f"the index names shard {path.name!r}, which is itself an index: a shard holds tensors",
        )
    return _read_first(kinds, what, path, data, verify, read or read_kind)


def _read_first(
    kinds: list[str], what: str | None, path: Path, data: Any, verify: bool, read: Callable[..., Scan]
) -> Scan:
    """The first reader that accepts the file.

    The pickle reader comes last, as torch's own fallback: its failure is the
    answer only when it saw globals on the way (evidence of a payload), else
    the earlier reader's error or what the bytes look like says more.
    """
    earlier: SurgeryError | None = None
    for kind in kinds:
        try:
            return read(kind, path, data, verify)
        except SurgeryError as exc:
            if kind == "pickle" and exc.findings:
                raise
            if kind == "pickle" and not isinstance(exc, NotACheckpoint) and earlier is None and what is None:
                raise
            earlier = earlier or exc
    if what is not None and (earlier is None or isinstance(earlier, NotACheckpoint)):
        raise NotACheckpoint(path, what)
    raise earlier or NotACheckpoint(path, what or "not a checkpoint format surgery knows")


def read_kind(kind: str, path: Path, data: Any, verify: bool) -> Scan:
    """The reader of one kind (`base.sniff` says which to try), imported when first used."""
    module, function = READERS[kind]
    reader = getattr(importlib.import_module(module), function)
    if kind == "index":  # its shards are read as any file is, each knowing its index
        return reader(path, lambda p, index: _scan(p, verify, shard_of=index))
    if kind == "zip":
        return reader(path, data, verify=verify)
    return reader(path, data)


# Every format surgery reads: the kind `base.sniff` names -> (module, reader function).
READERS = {
    "zip": ("surgery.formats.torchzip", "scan_zip"),
    "safetensors": ("surgery.formats.safetensors_file", "scan_safetensors"),
    "index": ("surgery.formats.sharded", "scan_index"),
    "tar": ("surgery.formats.torch_tar", "scan_tar"),
    "npy": ("surgery.formats.numpy_file", "scan_npy"),
    "npz": ("surgery.formats.numpy_file", "scan_npz"),
    "pickle": ("surgery.formats.legacy", "scan_pickle"),
}
