"""Remote checkpoints brought to disk, for the work that needs their tensor bytes.

`formats.remote` reads a URL's headers and pickles by ranges, never its tensor bytes. Porting,
converting, merging, extracting, comparing values and `inspect --verify` need them, so the file
is downloaded first, once its headers were read and judged where the server allows it (a
dangerous pickle is refused before a byte of tensor data is fetched):

- a URL's file, or an index and every shard it names, is streamed into a temporary folder
  (under TMPDIR), resumed where a connection broke (`remote.Http.save`), its size checked, and
  refused before a byte is written when the folder lacks the room; the folder goes when the
  checkpoint read from it does, or when the download fails;
- an hf:// address is downloaded by huggingface_hub into the Hub's own cache, where the next run
  (and `HF_HUB_OFFLINE=1`) finds it.

The copy is then read as any local file is: nothing downloaded is ever run. Progress goes, a bar
per file, to whatever `showing` set (the CLI's bar on a terminal).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.formats.base import SNIFF_BYTES, is_hub, name_problem, sniff
from surgery.text import human_bytes

Show = Callable[[str, int], Callable[[int], None]]  # (file, its bytes) -> hears each n bytes written
SHARDS_AT_ONCE = 4  # shards of an index downloaded at the same time
TMPDIR_HINT = "set TMPDIR to a folder with room"

_show: ContextVar[Show | None] = ContextVar("surgery_download_show", default=None)


@contextmanager
def showing(show: Show | None) -> Iterator[None]:
    """Downloads inside the block report their progress to `show`."""
    token = _show.set(show)
    try:
        yield
    finally:
        _show.reset(token)


@dataclass
class Download:
    """A remote checkpoint's copy on disk.

    Attributes:
        address: what was asked for, the URL or hf:// address.
        path: the copy to read: the file, or the index beside its shards.
        origins: each file of the copy -> the URL or hf:// address it came from.
        bytes: bytes fetched (0 when the Hub's cache held it all).
        seconds: how long it took.
        folder: the temporary folder holding the copy (removed by `discard`); None for the
            Hub's cache, which keeps it.
    """

    address: str
    path: Path
    origins: dict[Path, str]
    bytes: int
    seconds: float
    folder: Path | None

    def origin(self, where: str) -> str:
        """Where a message points into the copy (`FILE`, `FILE: data.pkl byte 172`), pointing
        to the URL the file came from instead."""
        for path, address in self.origins.items():
            if where == str(path) or where.startswith(f"{path}:"):
                return address + where[len(str(path)) :]
        return where

    def discard(self) -> None:
        """Remove the temporary copy (the Hub's cache keeps its own)."""
        if self.folder is not None:
            _forget(self.folder)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "files": len(self.origins),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "to": "a temporary folder" if self.folder is not None else "the Hub cache",
        }


def download(address: str, *, size: int | None = None) -> Download:
    """Download the checkpoint at a URL or hf:// address: the file, or an index and its shards.
    `size`, the bytes of every file when its headers told them, is checked against the room
    where they go before anything is fetched (else each file's, as its answer tells it).

    Raises:
        SurgeryError: the server or the Hub refused or failed (after retries), the body ended
            early, the folder lacks room, or an index names a shard outside its folder.
    """
    started = time.perf_counter()
    if is_hub(address):
        from surgery.formats.hub import cache_dir, download_hub

        if size is not None:
            cache = cache_dir()
            _check_room(address, size, Path(cache), "set HF_HUB_CACHE to a folder with room", shown=cache)
        fetched = [0]
        path, origins = download_hub(address, _progress_bars(fetched))
        return Download(address, path, origins, fetched[0], time.perf_counter() - started, None)
    if size is not None:
        _check_room(address, size, Path(scratch()), TMPDIR_HINT)
    folder = _copy_folder()
    try:
        path, origins, fetched_bytes = _download_url(address, folder)
    except BaseException:
        _forget(folder)
        raise
    return Download(address, path, origins, fetched_bytes, time.perf_counter() - started, folder)


def download_hub_folder(address: str, wanted: tuple[tuple[str, ...], ...]) -> Path:
    """Files of the folder an hf:// address names, downloaded into the Hub's cache (an adapter:
    its config and its weights): of each group in `wanted`, the first the repo holds. That
    folder of the cached snapshot."""
    from surgery.formats.hub import download_folder

    return download_folder(address, wanted, _progress_bars([0]))


# The temporary copies on disk now. SIGTERM ends a process without its finalizers, so while
# there are any, a SIGTERM that would end it (no handler of the program's own) removes them first.
_copies: set[Path] = set()
_copies_lock = threading.Lock()


def _copy_folder() -> Path:
    """A new temporary folder for a download, removed on SIGTERM as on every other way out."""
    folder = Path(tempfile.mkdtemp(prefix="surgery-download-", dir=scratch()))
    with _copies_lock:
        _copies.add(folder)
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, _removing_copies)
    return folder


def _forget(folder: Path) -> None:
    """Remove a copy; the last one gone, SIGTERM is left as it was."""
    shutil.rmtree(folder, ignore_errors=True)
    with _copies_lock:
        _copies.discard(folder)
        if (
            not _copies
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is _removing_copies
        ):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _removing_copies(signum: int, frame: object) -> None:
    """SIGTERM: the copies go, then the process ends as killed by it (143 in a shell)."""
    for folder in list(_copies):
        shutil.rmtree(folder, ignore_errors=True)
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def scratch() -> str:
    """Where downloads go: TMPDIR as it is now (tempfile caches its first answer)."""
    return os.environ.get("TMPDIR") or tempfile.gettempdir()


def _download_url(address: str, folder: Path) -> tuple[Path, dict[Path, str], int]:
    """The file at a URL into `folder`; when its bytes say index, every shard beside it."""
    from surgery.formats.remote import Http, Url, shard_url
    from surgery.formats.sharded import MAX_INDEX_BYTES, parse_index

    url = Url(address)
    http = Http()
    try:
        first = _save(http, url, folder, url.name or "checkpoint")
        origins = {first: str(url)}
        size = first.stat().st_size
        with open(first, "rb") as f:
            kinds, _ = sniff(f.read(SNIFF_BYTES), size)
        if kinds == ["index"] and size <= MAX_INDEX_BYTES:  # past it, reading it says so
            weight_map, _ = parse_index(url, first.read_bytes())
            shards = [s for s in dict.fromkeys(weight_map.values()) if folder / s not in origins]
            urls = [shard_url(url, shard) for shard in shards]  # a name leaving the folder: refused
            context = copy_context()  # the progress bar, in the pool's threads too
            with ThreadPoolExecutor(SHARDS_AT_ONCE) as pool:
                saved = list(
                    pool.map(lambda u, s: context.copy().run(_save, http, u, folder, s), urls, shards)
                )
            origins |= {path: str(u) for path, u in zip(saved, urls, strict=True)}
        return first, origins, http.bytes
    finally:
        http.close()


def _save(http: Any, url: str, folder: Path, name: str) -> Path:
    """One file of a download, at `name` inside `folder`."""
    problem = name_problem(name)
    if problem:
        raise SurgeryError(url, f"cannot be saved as {name!r}, which {problem}")
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)

    def announce(size: int) -> Callable[[int], None] | None:
        _check_room(url, size, path.parent, TMPDIR_HINT, shown=scratch())
        show = _show.get()
        return show(path.name, size) if show is not None else None

    with open(path, "wb") as out:
        http.save(url, out, announce)
    return path


def _check_room(address: str, size: int, folder: Path, hint: str, *, shown: object = None) -> None:
    """Refuse a download that would not fit where it goes (`shown`: that place, as the user set it)."""
    from surgery.writers.outputs import free_bytes

    while not folder.exists() and folder != folder.parent:  # a cache not made yet: where it will be
        folder = folder.parent
    free = free_bytes(folder)
    if free is not None and size > free:  # unknown: the download itself will say what is wrong
        raise SurgeryError(
            address,
            f"downloading it needs {human_bytes(size)} in {shown or folder}, which has {human_bytes(free)} free",
            hint=hint,
        )


def _progress_bars(fetched: list[int]) -> type:
    """A tqdm class for huggingface_hub's downloads that draws nothing itself: each bar it would
    draw goes to `showing`'s function, and every byte is added to `fetched[0]`."""
    from tqdm import tqdm

    lock = threading.Lock()
    show = _show.get()

    class Forwarded(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})
            total = int(kwargs.get("total") or 0)
            self._tick = show(str(kwargs.get("desc") or "download"), total) if show else None

        def update(self, n: float | None = 1) -> bool | None:
            n = int(n or 0)
            with lock:
                fetched[0] += n
            if self._tick is not None and n:
                self._tick(n)
            return None

    return Forwarded
