"""`surgery inspect`: what is inside a checkpoint, read from headers and pickles only.

The report is the opened `Checkpoint` with the view asked for (a filter, a depth);
its JSON document is computed here, its page in `render.inspect`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.formats.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from surgery.names import matches, wrapper_prefixes


@dataclass(frozen=True)
class InspectReport:
    """An opened checkpoint and which of its tensors to show."""

    checkpoint: Checkpoint
    filter: tuple[str, ...] = ()
    depth: int | None = None

    @property
    def tensors(self) -> list[TensorInfo]:
        """The tensors the filter selects (all of them without one)."""
        return [t for t in self.checkpoint.tensors if not self.filter or matches(t.name, self.filter)]

    @property
    def attributes(self) -> list[TensorInfo]:
        """The tensor attributes outside the state_dict that the filter selects."""
        return [t for t in self.checkpoint.attributes if not self.filter or matches(t.name, self.filter)]

    def to_json(self) -> dict[str, Any]:
        """The `surgery inspect --json` document (see the README for each field)."""
        ckpt, tensors = self.checkpoint, self.tensors
        return {
            "surgery_json": 1,
            "path": str(ckpt.path),
            "files": [str(f) for f in ckpt.files],
            "format": ckpt.format,
            "description": ckpt.description,
            "container": list(ckpt.container) if ckpt.container is not None else None,
            "containers": [{"path": list(p), "num_tensors": n} for p, n in ckpt.containers],
            "tensors": [t.to_json() for t in tensors],
            "num_tensors": len(tensors),
            "num_params": sum(t.numel for t in tensors),
            "bytes": ckpt.nbytes if not self.filter else sum(t.nbytes for t in tensors),
            "bytes_out": ckpt.nbytes_out
            if not self.filter
            else sum(t.nbytes for t in tensors if t.name not in ckpt.aliases),
            "dtypes": ckpt.dtypes,
            "devices": ckpt.devices,
            "prefix": ckpt.prefix,
            "wrappers": [{"prefix": p, "added_by": who} for p, who in wrapper_prefixes(ckpt.prefix)],
            "shared": ckpt.shared,
            "extras": {e.name: e.to_json() for e in ckpt.extras},
            "attributes": [t.to_json() for t in self.attributes],
            "metadata": ckpt.metadata,
            "findings": [f.to_json() for f in ckpt.findings],
            "safe": ckpt.safe,
            "filter": list(self.filter),
            "remote": ckpt.remote,
            "hub": ckpt.hub,
            "download": ckpt.download.to_json() if ckpt.download is not None else None,
        }


def inspect(
    path: str | Path,
    *,
    key: str | None = None,
    verify: bool = False,
    download: bool = False,
    filter: Sequence[str] = (),
    depth: int | None = None,
) -> InspectReport:
    """Open `path` (any format, an http(s):// URL or hf:// address read with range requests, or
    downloaded first) and say what to show of it; see `open_checkpoint`."""
    ckpt = open_checkpoint(path, key=key, verify=verify, download=download)
    return InspectReport(ckpt, tuple(filter), depth)
