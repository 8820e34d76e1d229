"""Checkpoints on the Hugging Face Hub, `hf://ORG/REPO[@REVISION][/PATH]`: read from the local
Hub cache when the file is there, else over HTTP range requests (formats.remote).

huggingface_hub (an optional extra, `surgery[hub]`, imported only for an hf:// address) says
where things are: the file's resolve URL (`HF_ENDPOINT`), the token (`HF_TOKEN`, sent as an
Authorization header), the cached copy (`HF_HUB_CACHE`), the repo's files, and, when a read
fails, why (no such repo, gated, no such revision or file). The bytes themselves go to the same
readers as a local file's or a URL's: nothing fetched is run. With `HF_HUB_OFFLINE=1` only the
cache is read. The environment is read when an address is opened, not when huggingface_hub was
imported, so a program that sets it late is still heard.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from surgery.errors import CorruptCheckpoint, NotFound, SurgeryError, UsageError
from surgery.formats.base import Scan, name_problem

PREFIX = "hf://"
KINDS = {"datasets": "dataset", "spaces": "space"}  # hf://datasets/ORG/NAME: huggingface_hub's repo_type
CONFIG = "config.json"  # beside its weights, a model folder's config
# The names transformers saves a model's weights under, in the order it loads them.
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".pth.tar", ".pkl", ".index.json")
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.")  # model-00001-of-00004.safetensors: read through its index
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")  # Trainer's state
_PART = re.compile(r"[A-Za-z0-9][\w.-]*")


class HubError(SurgeryError):
    """The Hub refused or lacks what the address names: repo, revision, file or access."""


@dataclass(frozen=True)
class HubAddress:
    """`hf://[datasets/|spaces/]ORG/REPO[@REVISION][/PATH]`, parsed: no PATH means the repo's
    weights; `kind` the repo's type as huggingface_hub names it (model, dataset, space)."""

    repo: str
    revision: str | None
    path: str | None
    kind: str = "model"

    def __str__(self) -> str:
        at = f"@{quote(self.revision, safe='')}" if self.revision else ""  # refs/pr/1 as refs%2Fpr%2F1
        kind = next((word for word, k in KINDS.items() if k == self.kind), "")
        return f"{PREFIX}{kind + '/' if kind else ''}{self.repo}{at}" + (f"/{self.path}" if self.path else "")

    def at(self, path: str | None) -> HubAddress:
        """The same repo and revision, another file (None: the repo)."""
        return replace(self, path=path)


def parse(address: str) -> HubAddress:
    """`hf://ORG/REPO[@REVISION][/PATH]` as its parts (a revision with a `/`, `refs/pr/1`, is
    written `%2F`, as huggingface_hub's own hf:// paths do).

    Raises:
        UsageError: not of that shape, or a PATH leaving the repo.
    """
    rest = address.removeprefix(PREFIX)
    word, _, after = rest.partition("/")
    kind = KINDS.get(word, "model")
    org, _, rest = (after if word in KINDS else rest).partition("/")
    name, _, path = rest.partition("/")
    name, at, revision = name.partition("@")
    if not (_PART.fullmatch(org) and _PART.fullmatch(name)) or (at and not revision):
        raise UsageError(address, "not a Hub address: hf://ORG/REPO[@REVISION][/PATH]")
    path = path.strip("/")
    if path and name_problem(path):
        raise UsageError(address, f"the path {path!r} {name_problem(path)} of the repo")
    return HubAddress(f"{org}/{name}", unquote(revision) or None, path or None, kind)


def scan_hub(address: str, *, verify: bool = False) -> Scan:
    """Read the checkpoint an hf:// address names: its PATH, or else the repo's weights, picked
    from its files (which the report lists). The cached copy when there is one, else over HTTP.

    Raises:
        HubError: no such repo, revision or file, access refused, nothing cached while offline,
            or no checkpoint in the repo.
        SurgeryError: as for the file itself.
    """
    where = parse(address)  # a bad address is refused before huggingface_hub is imported
    hf = _huggingface_hub(address)
    files: list[dict[str, Any]] | None = None
    path = where.path
    if path is None:
        files = _files(hf, where)
        path = pick_weights(where, [f["path"] for f in files])
    scan, source = _scan_file(hf, where, path, verify, as_folder=where.path is None)
    scan.hub = {
        "address": str(where),
        "repo": where.repo,
        "repo_type": where.kind,
        "revision": where.revision or "main",
        "file": path,
        "source": source,
        "files": [{**f, "checkpoint": is_checkpoint_file(f["path"])} for f in files]
        if files is not None
        else None,
    }
    return scan


def download_hub(address: str, progress_bars: type) -> tuple[Path, dict[Path, str]]:
    """Download the file an hf:// address names (or the repo's weights), and an index's shards,
    into the Hub's cache with huggingface_hub's own downloader (`progress_bars`: its tqdm
    class): the cached path to read, and each cached file's address.

    Raises:
        HubError: as `scan_hub`, or the download failed.
    """
    where = parse(address)
    hf = _huggingface_hub(address)
    path, files_named = where.path, set()
    if path is None:
        files_named = {f["path"] for f in _files(hf, where)}
        path = pick_weights(where, sorted(files_named))

    def get(name: str) -> Path:
        return _get(hf, where, name, progress_bars)

    first = get(path)
    origins = {first: str(where.at(path))}
    if where.path is None and CONFIG in files_named:  # the repo is a model folder: its config too
        origins[get(CONFIG)] = str(where.at(CONFIG))
    if path.endswith(".index.json"):
        from surgery.formats.sharded import MAX_INDEX_BYTES, parse_index

        if first.stat().st_size > MAX_INDEX_BYTES:
            return first, origins  # reading it says what is wrong
        weight_map, _ = parse_index(first, first.read_bytes())
        for shard in dict.fromkeys(weight_map.values()):
            name = _beside(path, shard)
            if name_problem(name):
                raise CorruptCheckpoint(where, f"the index names shard {shard!r}, which {name_problem(name)}")
            origins[get(name)] = str(where.at(name))
    return first, origins


def download_folder(address: str, wanted: tuple[tuple[str, ...], ...], progress_bars: type) -> Path:
    """Download, of each group of names in `wanted`, the first file the repo holds in the folder
    an hf:// address names (its PATH, or the repo's top) into the Hub's cache: that folder of the
    cached snapshot. A group the repo lacks is skipped (the caller says what it needed).

    Raises:
        HubError: as `scan_hub`, or a download failed.
    """
    where = parse(address)
    hf = _huggingface_hub(address)
    files = {f["path"] for f in _files(hf, where)}
    prefix = f"{where.path}/" if where.path else ""
    folder: Path | None = None
    for group in wanted:
        held = next((prefix + name for name in group if prefix + name in files), None)
        if held is not None:
            folder = _get(hf, where, held, progress_bars).parent
    if folder is None:
        names = ", ".join(name for group in wanted for name in group)
        raise HubError(where, f"holds none of {names}" + (f" in {where.path}" if where.path else ""))
    return folder


def _get(hf: Any, where: HubAddress, name: str, progress_bars: type) -> Path:
    """One file of the repo at the address's revision, through the Hub's cache."""
    try:
        return Path(
            hf.hf_hub_download(
                where.repo,
                name,
                repo_type=where.kind,
                revision=where.revision,
                cache_dir=_cache_dir(hf),
                endpoint=_endpoint(hf),
                token=hf.get_token() or False,
                local_files_only=_offline(),
                tqdm_class=progress_bars,
            )
        )
    except Exception as exc:  # whatever the Hub client raises: one line
        raise _hub_error(hf, where, exc, file=name) from None


def repo_checkpoints(address: str) -> list[str]:
    """Every checkpoint file of the repo an hf:// address names (its PATH, a folder, narrows
    them), as addresses at its revision: each index, and every other checkpoint file but the
    shards beside an index (read through it). What a scan of the repo judges.

    Raises:
        HubError: as `scan_hub`'s listing.
    """
    where = parse(address)
    hf = _huggingface_hub(address)
    names = [f["path"] for f in _files(hf, where)]
    inside = f"{where.path}/" if where.path else ""
    names = [n for n in names if n.startswith(inside) and is_checkpoint_file(n)]
    indexed = {str(PurePosixPath(n).parent) for n in names if n.endswith(".index.json")}
    kept = [
        n
        for n in names
        if n.endswith(".index.json") or not (SHARD_NAME.search(n) and str(PurePosixPath(n).parent) in indexed)
    ]
    return [str(where.at(n)) for n in kept]


def pick_weights(where: HubAddress, names: list[str]) -> str:
    """The file that holds the repo's weights: transformers' own names first, else its one
    index or its one checkpoint file.

    Raises:
        HubError: no checkpoint file, or several and none of them the obvious one.
    """
    for name in WEIGHTS:
        if name in names:
            return name
    candidates = [n for n in names if is_checkpoint_file(n)]
    indexes = [n for n in candidates if n.endswith(".index.json")]
    for group in (indexes, [n for n in candidates if not SHARD_NAME.search(n)]):
        if len(group) == 1:
            return group[0]
    if not candidates:
        shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
        raise HubError(where, f"no checkpoint file in the repo ({len(names)} files: {shown or 'none'})")
    raise HubError(
        where,
        f"{len(candidates)} checkpoint files and none is the model's weights: "
        + ", ".join(candidates[:6])
        + (" ..." if len(candidates) > 6 else ""),
        hint=f"name one: {PREFIX}{where.repo}/{candidates[0]}",
    )


def is_checkpoint_file(name: str) -> bool:
    """Whether a repo file's name says weights (a Trainer's optimizer or arguments do not)."""
    base = PurePosixPath(name).name
    if base in NOT_WEIGHTS:
        return False
    if base.endswith(".index.json"):
        return base.endswith((".safetensors.index.json", ".bin.index.json"))
    return base.endswith(CHECKPOINT_SUFFIXES)


def _scan_file(hf: Any, where: HubAddress, path: str, verify: bool, *, as_folder: bool) -> tuple[Scan, str]:
    """The file at `path`, from the cache (and its shards, for an index) or the Hub. With
    `as_folder` (the address named the repo), a cached snapshot holding config.json beside these
    weights is read as the model folder it is (formats.hf: `hf_config`, `--format hf` outputs)."""
    from surgery.formats import scan
    from surgery.formats.hf import weights_of

    cached = _cached(hf, where, path)
    if cached is not None:
        if as_folder and weights_of(cached.parent)[:1] == [path]:
            return scan(cached.parent, verify=verify), "cache"
        return scan(cached, verify=verify), "cache"
    if _offline():
        raise HubError(
            where.at(path),
            "not in the local Hub cache, and HF_HUB_OFFLINE=1 forbids the network",
            hint=f"cache: {_cache_dir(hf)}",
        )
    from surgery.formats.remote import RemoteError, scan_url

    url = hf.hf_hub_url(
        where.repo, path, repo_type=where.kind, revision=where.revision, endpoint=_endpoint(hf)
    )
    token = hf.get_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return scan_url(url, verify=verify, headers=headers), "network"
    except (NotFound, RemoteError) as exc:  # the Hub's error headers say which (repo, revision, ...)
        _why(hf, where, exc.where, token)
        raise


def _cached(hf: Any, where: HubAddress, path: str) -> Path | None:
    """The cached copy of `path` at the revision, or None; an index only with every shard."""
    found = _from_cache(hf, where, path)
    if found is None:
        return None
    if path.endswith(".index.json"):
        try:
            names = json.loads(Path(found).read_text()).get("weight_map", {}).values()
            shards = {name for name in names if isinstance(name, str)}
        except (OSError, ValueError, AttributeError):
            return Path(found)  # read as any damaged index is, which says what is wrong
        for shard in shards:
            name = _beside(path, shard)
            if name_problem(name) is None and _from_cache(hf, where, name) is None:
                return None
    return Path(found)


def _from_cache(hf: Any, where: HubAddress, name: str) -> str | None:
    """The cached copy of one file of the repo at the address's revision, or None."""
    found = hf.try_to_load_from_cache(
        where.repo, name, cache_dir=_cache_dir(hf), revision=where.revision, repo_type=where.kind
    )
    return found if isinstance(found, str) else None


def _beside(index: str, name: str) -> str:
    """A file an index at `index` names, as a path in the repo: shards lie beside their index."""
    folder = str(PurePosixPath(index).parent)
    return name if folder == "." else f"{folder}/{name}"


def _files(hf: Any, where: HubAddress) -> list[dict[str, Any]]:
    """The repo's files at the revision: the cached snapshot's offline, else the Hub's."""
    return _cached_listing(hf, where) if _offline() else _listing(hf, where)


def _listing(hf: Any, where: HubAddress) -> list[dict[str, Any]]:
    """The repo's files at the revision (path and size), from the Hub."""
    try:
        tree = hf.HfApi(endpoint=_endpoint(hf)).list_repo_tree(
            where.repo,
            recursive=True,
            repo_type=where.kind,
            revision=where.revision,
            token=hf.get_token() or False,
        )
        return sorted(
            ({"path": f.path, "size": f.size} for f in tree if isinstance(f, hf.hf_api.RepoFile)),
            key=lambda f: f["path"],
        )
    except Exception as exc:  # whatever the Hub client raises (HTTP, connection, bad answer): one line
        raise _hub_error(hf, where, exc) from None


def _cached_listing(hf: Any, where: HubAddress) -> list[dict[str, Any]]:
    """The files of the cached snapshot of the revision (offline: the Hub is not asked)."""
    folder = Path(_cache_dir(hf)) / hf.file_download.repo_folder_name(
        repo_id=where.repo, repo_type=where.kind
    )
    revision = where.revision or "main"
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        raise HubError(
            where,
            f"revision {revision} is not in the local Hub cache, and HF_HUB_OFFLINE=1 forbids the network",
            hint=f"cache: {_cache_dir(hf)}",
        )
    return [
        {"path": p.relative_to(snapshot).as_posix(), "size": p.stat().st_size}
        for p in sorted(snapshot.rglob("*"))
        if p.is_file()
    ]


def _why(hf: Any, where: HubAddress, url: str, token: str | None) -> None:
    """Ask the Hub why reading `url` failed (it says so in its error headers): raise that as a
    HubError, or return when it has nothing to add."""
    try:
        hf.get_hf_file_metadata(url, token=token or False, endpoint=_endpoint(hf))
    except Exception as exc:
        error = _hub_error(hf, where, exc, file=unquote(PurePosixPath(urlsplit(url).path).name))
        if not isinstance(error, _Unexplained):
            raise error from None


class _Unexplained(HubError):
    """A failure huggingface_hub does not name: the caller's own error says more."""


def _hub_error(hf: Any, where: HubAddress, exc: Exception, *, file: str | None = None) -> HubError:
    """huggingface_hub's exception as one line (subclasses before their bases); `file` is the
    one asked for (the address's, or a shard its index names)."""
    errors = hf.errors
    status = getattr(getattr(exc, "response", None), "status_code", None)
    http = f" (HTTP {status})" if status else ""
    if isinstance(exc, errors.GatedRepoError):
        return HubError(
            where,
            f"{where.repo} is gated: access refused{http}",
            hint="ask for access on its page, then set HF_TOKEN (or `hf auth login`)",
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(
            where,
            f"repository {where.repo} not found{http} (or private: HF_TOKEN gives access)",
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(where, f"revision {where.revision or 'main'} not found in {where.repo}{http}")
    if isinstance(exc, errors.EntryNotFoundError):
        return HubError(where, f"no file {file} in {where.repo} at {where.revision or 'main'}{http}")
    if status in (401, 403):
        return HubError(where, f"access refused{http}", hint="set HF_TOKEN to a token with access")
    said = str(exc).strip().splitlines()
    return _Unexplained(where, f"the Hub failed: {said[0] if said else type(exc).__name__}")


def _huggingface_hub(address: str) -> Any:
    """huggingface_hub, imported on first use: local paths and URLs never load it."""
    try:
        import huggingface_hub
        import huggingface_hub.errors
        import huggingface_hub.file_download
        import huggingface_hub.hf_api
    except ImportError:
        raise UsageError(
            address, "reading the Hub needs huggingface_hub", hint='pip install "surgery[hub]"'
        ) from None
    return huggingface_hub


def _endpoint(hf: Any) -> str:
    return os.environ.get("HF_ENDPOINT", hf.constants.ENDPOINT).rstrip("/")


def _cache_dir(hf: Any) -> str:
    return os.environ.get("HF_HUB_CACHE") or hf.constants.HF_HUB_CACHE


def cache_dir() -> str:
    """The Hub cache's folder, as huggingface_hub reads it now (HF_HUB_CACHE)."""
    return _cache_dir(_huggingface_hub("hf://"))


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, read now (TRANSFORMERS_OFFLINE too)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")
