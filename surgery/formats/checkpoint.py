"""`Checkpoint`: an opened checkpoint file, its tensors, and what else it holds.

Opening reads metadata only (no torch import, no tensor data); tensors come on
demand from the file's bytes through `surgery.formats.tensors`.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.dtypes import DType
from surgery.errors import CorruptCheckpoint, SurgeryError, UsageError
from surgery.formats import Scan, scan
from surgery.formats.base import is_remote
from surgery.formats.containers import Located, TensorCounts, flatten, locate, module_attributes
from surgery.formats.pickle_vm import Call, Global, Known, describe
from surgery.formats.safety import blocking
from surgery.formats.torch_pickle import (
    Constant,
    DataLocation,
    Opaque,
    StorageType,
    TensorRef,
    Unsupported,
    contiguous_strides,
)
from surgery.names import common_prefix
from surgery.trust import recipe_findings
from surgery.values import Finding

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

    from surgery.formats.download import Download


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the state_dict, as the file describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    device: str  # where it was saved from: "cpu", "cuda:0", ...
    storage: str  # the storage key in the file
    note: str | None = None  # something a plain read would not reproduce

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "bytes": self.nbytes,
            "device": self.device,
            "storage": self.storage,
        }
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Extra:
    """An entry stored beside the state_dict: `epoch: 90`, `optimizer: dict (2 keys)`."""

    name: str
    type: str
    summary: str
    value: Any = None  # the value itself when it is a JSON scalar

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "summary": self.summary}
        if self.value is not None:
            out["value"] = self.value
        return out


class Checkpoint:
    """An opened checkpoint. Use `open_checkpoint` to make one.

    Attributes:
        path: the file, index or folder opened.
        format: torch-zip, torch-legacy, torchscript, safetensors, sharded, dcp or pickle.
        container: keys from the top to the state_dict (`("state_dict",)`, `()` for
            the top level), or None when the file holds no state_dict.
        tensors: the state_dict's tensors in file order.
        attributes: tensors its modules hold outside the state_dict (plain attributes such
            as a TorchScript module's `_state`): listed, never ported or converted.
        extras: everything stored beside the state_dict.
        findings: safety and integrity findings.
        files: every file read (the index and each shard, for sharded checkpoints).
        hub: for an hf:// address, `{address, repo, revision, file, source, files}`: the file
            read, from the local Hub `cache` or the `network`, and the repo's files when the
            address named none; None otherwise.
        download: for a URL or hf:// address read from a downloaded copy, how it was
            downloaded (`formats.download.Download`); None otherwise.
    """

    def __init__(self, scanned: Scan, key: tuple[str, ...] | None = None):
        self._scan = scanned
        self.path = scanned.path
        self.format = scanned.format
        self.description = scanned.description
        self.metadata = scanned.metadata
        self.files = list(scanned.files)
        self.hub = scanned.hub
        self.download: Download | None = None
        try:
            located = locate(scanned.root, key)
        except KeyError:
            raise UsageError(
                scanned.path,
                f"no entry {'.'.join(key or ())!r} in the checkpoint",
                hint=_containers_hint(locate(scanned.root)),
            ) from None
        self._located = located
        self.container = located.path
        self.module_versions = module_versions(scanned.dict_states.get(id(located.node)), located.node)
        if located.path is None:
            pairs, leaves, truncated = [], [], False
        else:
            pairs, leaves, truncated = flatten(located.node)
            if key is not None and not pairs:
                raise UsageError(
                    scanned.path,
                    f"entry {'.'.join(key)!r} holds no tensors",
                    hint=_containers_hint(locate(scanned.root)),
                )
        self._refs: dict[str, TensorRef] = {}
        for name, ref in pairs:
            self._refs.setdefault(name, ref)
        self.restored = _restore_aliases(self._refs, self.metadata)
        self.tensors = tuple(_info(name, ref) for name, ref in self._refs.items())
        attributes = module_attributes(located.node) if located.path is not None else []
        self.attributes = tuple(_info(name, ref) for name, ref in attributes)
        # A remote checkpoint's few bytes beyond its headers (0-dim extras) come from the server.
        self._remote = scanned.remote
        read = self._remote.read_at if self._remote is not None else _read_file
        self.extras = [_extra(name, value, located.counts, read) for name, value in located.siblings + leaves]
        if self._remote is not None:
            self._remote.close()  # nothing more is fetched: tensor bytes need a download
        self.findings: list[Finding] = list(scanned.findings) + recipe_findings(self.metadata, str(self.path))
        if self.restored:
            tied = ", ".join(f"{a} = {k}" for a, k in list(self.restored.items())[:4])
            self.findings.append(
                Finding(
                    "notice", f"tied names stored once, restored from {ALIASES_KEY}: {tied}", str(self.path)
                )
            )
        if truncated:
            self.findings.append(
                Finding(
                    "notice",
                    "modules nested too deep: tensors below the limit are not listed",
                    str(self.path),
                )
            )
        self._reader = None

    # -- summary figures -----------------------------------------------------
    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_params(self) -> int:
        """Elements of every tensor in the state_dict, buffers included."""
        return sum(t.numel for t in self.tensors)

    @cached_property
    def nbytes(self) -> int:
        """Bytes of data the state_dict occupies in the file (shared storages once)."""
        seen: dict[int, int] = {}
        for ref in self._refs.values():
            if ref.storage is not None:
                base = ref.storage.base
                seen[id(base)] = base.data.size if base.data else base.nbytes
        return sum(seen.values())

    @cached_property
    def nbytes_out(self) -> int:
        """Bytes a conversion writes: every tensor in full, a tied name (the very same
        view) once. More than `nbytes` when views reuse stored bytes: two views of one
        storage, or an expanded view (stride 0: 2**40 elements from 4 bytes)."""
        return sum(t.nbytes for t in self.tensors if t.name not in self.aliases)

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(Counter(t.dtype for t in self.tensors).most_common())

    @property
    def devices(self) -> dict[str, int]:
        return dict(Counter(t.device for t in self.tensors).most_common())

    @cached_property
    def shared(self) -> list[list[str]]:
        """Groups of tensors stored in one storage (tied weights, views)."""
        groups: dict[int, list[str]] = {}
        for name, ref in self._refs.items():
            if ref.storage is not None:
                groups.setdefault(id(ref.storage.base), []).append(name)
        return [names for names in groups.values() if len(names) > 1]

    @cached_property
    def tensors_by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def aliases(self) -> dict[str, str]:
        """Tensors that are the very same view of a storage as an earlier tensor (tied
        weights: `lm_head.weight` -> `embed.weight`): alias -> the first name."""
        first: dict[tuple, str] = {}
        out: dict[str, str] = {}
        for name, ref in self._refs.items():
            if ref.storage is None or ref.unusual:
                continue
            view = (
                id(ref.storage.base),
                ref.storage.view_offset,
                ref.offset,
                ref.shape,
                ref.stride,
                ref.dtype,
                _bits(ref),  # x and x.conj() share bytes, not values
            )
            if view in first:
                out[name] = first[view]
            else:
                first[view] = name
        return out

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        """(file, offset, length) when a tensor's bytes lie in the file exactly as a
        contiguous little-endian tensor would hold them: they can be copied as they are.
        None when they must be rebuilt (strided views, compressed members, byte order, bits)."""
        self._needs_bytes(f"reading tensor {name!r}")
        ref = self._refs[name]
        storage = ref.storage
        if storage is None or ref.unusual or ref.bits or ref.dtype.bits % 8:
            return None
        data = storage.base.data
        if data is None or data.member is not None or (data.byteswap and ref.dtype.itemsize > 1):
            return None
        if ref.stride != contiguous_strides(ref.shape) and ref.numel > 1:
            return None
        start = storage.view_offset + ref.offset * ref.dtype.itemsize
        if start + ref.nbytes > data.size:
            return None
        return data.path, data.offset + start, ref.nbytes

    def repeated_dims(self, name: str) -> frozenset[int]:
        """The dimensions along which a tensor repeats one value (size > 1, stride 0)."""
        ref = self._refs[name]
        return frozenset(
            d for d, (n, s) in enumerate(zip(ref.shape, ref.stride, strict=False)) if n > 1 and not s
        )

    def span(self, name: str) -> int:
        """Bytes of the file from a tensor's first element to its last: all it can read.
        Less than its `nbytes` when its view repeats or overlaps stored bytes."""
        ref = self._refs[name]
        if ref.chunks is not None or ref.storage is None:
            return ref.nbytes
        return ref.extent() - ref.offset * ref.dtype.itemsize

    @cached_property
    def prefix(self) -> str:
        """The dotted prefix every key shares (`module.`), or ""."""
        return common_prefix([t.name for t in self.tensors])

    @property
    def containers(self) -> list[tuple[tuple[str, ...], int]]:
        """Every place in the file that looks like a state_dict, with its tensor count."""
        return self._located.candidates

    @property
    def remote(self) -> dict[str, Any] | None:
        """What reading a remote checkpoint took (`{url, files, size, bytes_read, requests}`:
        bytes and HTTP requests, against the size of the files read); None for local files."""
        return self._remote.traffic(str(self.path)) if self._remote is not None else None

    def origin(self, file: str | Path) -> str:
        """Where a file of the checkpoint came from, as provenance records it: the URL or hf://
        address of a downloaded copy's file, else the file's full path."""
        if self.download is not None and Path(file) in self.download.origins:
            return self.download.origins[Path(file)]
        return str(Path(file).resolve())

    def _needs_bytes(self, what: str) -> None:
        """Refuse work on a remote checkpoint's tensor bytes: only its headers were fetched."""
        if self._remote is not None:
            from surgery.formats.remote import NeedsDownload

            raise NeedsDownload(
                self.path,
                f"{what} needs a download: only headers and pickles are read over HTTP",
                hint="open it with download=True (the CLI's --download)",
            )

    @property
    def safe(self) -> bool:
        """No finding that should stop a script: nothing dangerous, unknown or corrupt."""
        return not blocking(self.findings)

    # -- tensors ---------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from the file's bytes (nothing is unpickled).

        Raises:
            KeyError: no tensor of that name.
            SurgeryError: the tensor's bytes are missing or of a kind not rebuilt.
        """
        if name not in self._refs:
            raise KeyError(name)
        self._needs_bytes(f"reading tensor {name!r}")
        return self._tensor_reader().read(name, self._refs[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state_dict, in file order, sharing storages as saved.

        The tensors are backed by a copy-on-write mapping of the file: pages are
        read when used, and writing to a tensor never changes the file.
        """
        self._needs_bytes("reading the state_dict")
        return self._tensor_reader().read_all(self._refs.items())

    def release(self, name: str) -> None:
        """Drop the memory a tensor read by `tensor(name)` holds, for streaming work.

        Only after the tensor is no longer used: its pages are given back to the file.
        """
        if self._reader is not None and name in self._refs:
            self._reader.release(self._refs[name])

    def pieces(
        self, name: str, elements: int = 1 << 22, *, collapse: frozenset[int] = frozenset()
    ) -> Iterator[torch.Tensor]:
        """A tensor as flat pieces of at most `elements`, in order: bounded memory for
        work that goes element by element (casts, comparisons) however big the tensor.
        Dimensions in `collapse` (repeated ones: see `repeated_dims`) are read at index 0 only.

        Bytes that lie as plain data are read piece by piece from the file (nothing stays
        mapped); others come from `tensor(name)`, released at the end, with conjugate and
        negative bits applied (the values torch shows) and views never copied whole.
        """
        import torch

        where = self.byte_range(name)
        if where is None or collapse:
            from surgery.formats.tensors import flat_pieces

            tensor = self.tensor(name)
            if collapse:
                tensor = tensor[
                    tuple(slice(0, 1) if d in collapse else slice(None) for d in range(tensor.dim()))
                ]
            try:
                yield from flat_pieces(tensor, elements)
            finally:
                del tensor
                self.release(name)
            return
        path, offset, length = where
        dtype = getattr(torch, self._refs[name].dtype.name)
        step = elements * self._refs[name].dtype.itemsize
        for start in range(0, length, step):
            yield torch.frombuffer(
                self._read_exact(name, path, offset + start, min(step, length - start)), dtype=dtype
            )

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor (along its first dimension): only their bytes are
        read when the tensor lies as plain data (a rank's shard of a parameter), else the
        tensor is read and sliced.

        Raises:
            CorruptCheckpoint: the file ends inside the rows.
        """
        import torch

        ref = self._refs[name]
        where = self.byte_range(name)
        if where is None or not ref.shape:
            try:
                return self.tensor(name)[start:stop].clone() if ref.shape else self.tensor(name).clone()
            finally:
                self.release(name)
        path, offset, _ = where
        row = ref.nbytes // ref.shape[0] if ref.shape[0] else 0
        data = self._read_exact(name, path, offset + start * row, row * max(0, stop - start))
        shape = (max(0, stop - start), *ref.shape[1:])
        return (
            torch.frombuffer(data, dtype=getattr(torch, ref.dtype.name)).reshape(shape)
            if data
            else torch.empty(shape, dtype=getattr(torch, ref.dtype.name))
        )

    def _read_exact(self, name: str, path: str, offset: int, length: int) -> bytearray:
        """`length` bytes of tensor `name`'s file at `offset`, read into memory of their own.

        Raises:
            CorruptCheckpoint: the file ends before them.
        """
        data = bytearray(length)
        if length:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                if f.readinto(data) != length:
                    raise CorruptCheckpoint(self.path, f"tensor {name!r}: the file ends inside its data")
        return data

    def _tensor_reader(self):
        if self._reader is None:
            from surgery.formats.tensors import TensorReader

            self._reader = TensorReader(str(self.path))
        return self._reader

    def __repr__(self) -> str:
        return f"<Checkpoint {self.path} {self.format}: {self.num_tensors} tensors, {len(self.findings)} findings>"


def open_checkpoint(
    path: str | Path, *, key: str | None = None, verify: bool = False, download: bool = False
) -> Checkpoint:
    """Open any checkpoint and describe it, safely and without reading tensor data.

    Args:
        path: a torch file (zip or legacy), TorchScript archive, safetensors file,
            `*.index.json`, or a folder holding one; a torch.distributed.checkpoint
            folder (or its `.metadata` file); an http(s):// URL or hf:// address (its headers
            read by ranges: its tensors need `download`).
        key: where the state_dict sits, dotted (`state_dict`, `model_ema`), when
            the automatic choice is not the one wanted.
        verify: read all storage bytes too, to check zip CRCs.
        download: a URL or hf:// address is downloaded first (formats.download) and read from
            disk: its tensors can be read, `verify` works, a server ignoring Range is no matter.

    Returns:
        A `Checkpoint`.

    Raises:
        SurgeryError: missing path, unknown format, damaged file, or a bad `key`.

    Example:
        >>> ckpt = open_checkpoint("fixtures/imagenet_example.pth.tar")
        >>> ckpt.container, ckpt.prefix
        (('state_dict',), 'module.')
        >>> weights = ckpt.state_dict()
    """
    if download and is_remote(path):
        return _downloaded(str(path), key, verify=verify)
    scanned = scan(path, verify=verify)
    return Checkpoint(scanned, tuple(key.split(".")) if key else None)


def _downloaded(
    address: str, key: str | None, *, verify: bool = False, size: int | None = None
) -> Checkpoint:
    """The checkpoint at a URL or hf:// address, read from a downloaded copy. A URL's copy is
    named by the URL (the report, errors and findings) and removed with the Checkpoint; an
    hf:// copy is the Hub cache's, read as a cached address is."""
    import weakref

    from surgery.formats.download import download
    from surgery.formats.remote import Url

    got = download(address, size=size)
    try:
        if got.folder is None:  # the Hub's cache: read as the cached address is
            ckpt = open_checkpoint(got.address, key=key, verify=verify)
        else:
            ckpt = Checkpoint(scan(got.path, verify=verify), tuple(key.split(".")) if key else None)
    except SurgeryError as error:  # named by the address, not the copy that is gone
        got.discard()
        error.where = got.origin(error.where)
        error.args = (f"{error.where}: {error.message}",)
        raise
    except BaseException:
        got.discard()
        raise
    if got.folder is not None:
        ckpt.path = Url(address)
        ckpt.findings = [replace(f, where=got.origin(f.where)) for f in ckpt.findings]
        weakref.finalize(ckpt, got.discard)
    ckpt.download = got
    return ckpt


ALIASES_KEY = "surgery.aliases"


def module_versions(dict_state: tuple[dict, Any] | None, node: Any) -> dict[str, int]:
    """Module path -> version, from the `_metadata` torch.save kept beside a state_dict (an
    OrderedDict's attribute): what torch's `_load_from_state_dict` reads to upgrade old
    checkpoints. Empty when the state_dict has none (safetensors, a `{k: v}` copy).

    Args:
        dict_state: (the dict, its BUILD state) the pickle gave the state_dict, if any.
        node: the state_dict itself (the entry must be its own, not a dict at the same id).
    """
    if dict_state is None or dict_state[0] is not node:
        return {}
    metadata = dict_state[1].get("_metadata")
    if type(metadata) is not dict:
        return {}
    return {
        module: info["version"]
        for module, info in metadata.items()
        if type(module) is str and type(info) is dict and type(info.get("version")) is int
    }


def _restore_aliases(refs: dict[str, TensorRef], metadata: dict[str, Any]) -> dict[str, str]:
    """Tied weights a converter stored once (safetensors cannot hold two names for one
    storage) come back under both names, as they were saved: alias -> stored name."""
    stored = metadata.get("metadata") or metadata.get("index_metadata") or {}
    raw = stored.get(ALIASES_KEY) if isinstance(stored, dict) else None
    if not isinstance(raw, str):
        return {}
    try:
        aliases = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(aliases, dict):
        return {}
    restored = {}
    for alias, kept in aliases.items():
        if isinstance(alias, str) and isinstance(kept, str) and kept in refs and alias not in refs:
            refs[alias] = refs[kept]
            restored[alias] = kept
    return restored


def open_trusted(
    source: str | Path | Checkpoint,
    *,
    key: str | None = None,
    trust: bool = False,
    purpose: str = "port",
    fetch: bool = True,
) -> Checkpoint:
    """A checkpoint whose tensors are about to be read: refused when it has blocking
    findings (unless `trust`: its tensors are still read from their bytes, never run)
    or holds no state_dict.

    A remote one (a URL, an hf:// file not cached) is judged from its headers first, so a
    dangerous file is refused before its tensor bytes are fetched; then, with `fetch`, it is
    downloaded and judged again from the copy on disk, which must hold the tensors its headers
    said. Without `fetch` it stays headers only (a port's dry run needs names and shapes), unless
    no range request reads them (`open_headers`).

    Raises:
        SurgeryError: naming the worst finding, the missing state_dict, or a failed download.
    """
    ckpt = source if isinstance(source, Checkpoint) else open_headers(source, key=key)
    if not ckpt.safe and not trust:
        worst = next(f for f in ckpt.findings if f.severity in ("danger", "unsafe", "corrupt"))
        raise SurgeryError(
            ckpt.path,
            f"refused: the source is not safe to load ({worst.severity}: {worst.message})",
            hint="surgery never runs it; pass --trust to read its tensors from their bytes anyway",
        )
    if ckpt.container is None or not ckpt.tensors:
        raise SurgeryError(ckpt.path, f"the source holds no state_dict to {purpose}")
    if fetch and ckpt._remote is not None:
        size = ckpt.remote["size"]  # type: ignore[index] - every file its headers were read from
        local = _downloaded(_address(ckpt), ".".join(ckpt.container) or None, size=size)
        _same_tensors(ckpt, local)
        return open_trusted(local, trust=trust, purpose=purpose)
    return ckpt


def open_headers(source: str | Path, *, key: str | None = None) -> Checkpoint:
    """`open_checkpoint` for work that reads the tensors next: a remote file whose headers no
    range request reads (its server ignores Range, or a pickle is too long for one read) is
    downloaded now, as the work would download it anyway, and judged from the copy."""
    if not is_remote(source):
        return open_checkpoint(source, key=key)  # not a module more imported: start-up counts
    from surgery.formats.remote import NotByRanges

    try:
        return open_checkpoint(source, key=key)
    except NotByRanges:
        return open_checkpoint(source, key=key, download=True)


def _address(ckpt: Checkpoint) -> str:
    """What to download for a remote checkpoint: the hf:// address of its file, or its URL."""
    if ckpt.hub is not None:
        from surgery.formats.hub import parse

        named = replace(parse(ckpt.hub["address"]), revision=ckpt.hub["revision"])  # pinned: as read
        return str(named.at(None if ckpt.hub["files"] is not None else ckpt.hub["file"]))  # no PATH: the repo
    return str(ckpt.path)


def _same_tensors(remote: Checkpoint, local: Checkpoint) -> None:
    """The downloaded copy holds the tensors the headers read before said (a file replaced on
    the server in between would be judged from one version and used as another)."""
    said = [(t.name, t.shape, t.dtype) for t in remote.tensors]
    holds = [(t.name, t.shape, t.dtype) for t in local.tensors]
    if said != holds:
        if local.download is not None:
            local.download.discard()
        raise SurgeryError(
            remote.path,
            f"changed on the server while downloaded: its headers said {len(said)} tensors, "
            f"the copy holds {len(holds)}" + ("" if len(said) != len(holds) else ", not the same ones"),
            hint="run it again",
        )


def _containers_hint(located: Located) -> str:
    if not located.candidates:
        return "the file holds no state_dict"
    listed = ", ".join(f"{'.'.join(p) or '(top level)'} ({n} tensors)" for p, n in located.candidates[:6])
    return f"state_dicts in this file: {listed}"


def _info(name: str, ref: TensorRef) -> TensorInfo:
    storage = ref.storage
    return TensorInfo(
        name=name,
        shape=ref.shape,
        dtype=ref.dtype.name,
        numel=ref.numel,
        nbytes=ref.nbytes,
        device=storage.location if storage else "meta",
        storage=storage.key if storage else "",
        note=ref.unusual,
    )


def _extra(name: str, value: Any, counts: TensorCounts, read: Callable[[str, int, int], bytes]) -> Extra:
    if value is None or isinstance(value, (bool, int, float)):
        finite = not isinstance(value, float) or math.isfinite(value)
        return Extra(name, type(value).__name__, repr(value), value if finite else None)
    if isinstance(value, str):
        short = value if len(value) <= 80 else value[:77] + "..."
        return Extra(name, "str", repr(short), value if len(value) <= 1000 else None)
    if isinstance(value, (bytes, bytearray)):
        return Extra(name, type(value).__name__, f"{type(value).__name__} ({len(value)})")
    if isinstance(value, TensorRef):
        scalar = _scalar(value, read)
        shape = list(value.shape)
        summary = (
            f"tensor {value.dtype.name} {shape}"
            if scalar is None
            else f"tensor({scalar}, {value.dtype.name})"
        )
        return Extra(name, "tensor", summary, scalar)
    if isinstance(value, Call):
        return Extra(name, "object", _object_summary(value, counts))
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        kind = type(value).__name__
        unit = "key" if isinstance(value, dict) else "item"
        summary = f"{kind} ({len(value)} {unit}{'' if len(value) == 1 else 's'}"
        tensors = counts(value)
        summary += f"; {tensors} tensor{'s' if tensors != 1 else ''})" if tensors else ")"
        return Extra(name, kind, summary)
    if isinstance(value, DType):
        return Extra(name, "dtype", f"torch.{value.name}")
    if isinstance(value, (Global, Known, Constant)):
        return Extra(name, "global", getattr(value, "qualname", None) or value.name)
    if isinstance(value, StorageType):
        return Extra(name, "storage type", "storage type")
    if isinstance(value, Opaque):
        return Extra(name, value.kind, value.summary)
    if isinstance(value, Unsupported):
        return Extra(name, "tensor", f"{value.kind.replace('_', ' ')} (not rebuilt by surgery)")
    return Extra(name, type(value).__name__, type(value).__name__)


def _object_summary(call: Call, counts: TensorCounts) -> str:
    func = call.func
    name = func.qualname if isinstance(func, Global) else "object"
    state = call.state
    if isinstance(state, dict) and state:
        fields = ", ".join(str(k) for k in list(state)[:6]) + (", ..." if len(state) > 6 else "")
        return f"{name} ({fields})"
    tensors = counts(call)
    if tensors:
        return f"{name} object ({tensors} tensor{'s' if tensors != 1 else ''})"
    return f"{describe(call)}, a call surgery did not make"


_SCALAR_FORMATS = {
    "float32": "<f",
    "float64": "<d",
    "float16": "<e",
    "int64": "<q",
    "int32": "<i",
    "int16": "<h",
    "int8": "<b",
    "uint8": "<B",
    "bool": "<?",
}


def _bits(ref: TensorRef) -> tuple[str, ...]:
    """The conjugate/negative bits set on a tensor (`("neg",)`): values differ from bytes."""
    return tuple(sorted(k for k, v in (ref.bits or {}).items() if v))


def _read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _scalar(ref: TensorRef, read: Callable[[str, int, int], bytes]) -> float | int | bool | None:
    """The value of a 0-dim tensor such as `best_acc1`, read from its few bytes."""
    if ref.shape != () or ref.storage is None or ref.unusual:
        return None
    data: DataLocation | None = ref.storage.base.data
    fmt = _SCALAR_FORMATS.get(ref.dtype.name)
    if data is None or data.member or data.byteswap or (fmt is None and ref.dtype.name != "bfloat16"):
        return None
    start = ref.storage.view_offset + ref.offset * ref.dtype.itemsize
    if start + ref.dtype.itemsize > data.size:
        return None
    raw = read(data.path, data.offset + start, ref.dtype.itemsize)
    if ref.dtype.name == "bfloat16":
        value = struct.unpack("<f", b"\x00\x00" + raw)[0]
    else:
        value = struct.unpack(fmt, raw)[0]
    if "neg" in _bits(ref):  # a negative view (`x.conj().imag`): torch shows the bytes negated
        value = -value
    if isinstance(value, float):
        value = float(f"{value:.6g}")
        if value != value or value in (float("inf"), float("-inf")):
            return None
    return value
