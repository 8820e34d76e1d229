"""Checkpoints behind http(s):// URLs, read with HTTP range requests: headers and pickles, never
the tensor bytes.

Every reader in formats/ takes a file's bytes as something it slices (`data[a:b]`, `len(data)`):
locally the mapped file. `RemoteFile` is the same for a URL: a slice it has not got yet is a
range request, and what came back stays in a small cache of the ranges fetched. So the readers
read a remote file as they read a local one, and the report, the findings and the exit code are
the same. Two hints make it cheap: readers say what they are about to read (`base.prefetch`: a
zip's local headers, a legacy file's storage counts), fetched together at most `CONCURRENCY` at a
time; and the pickle machine runs over growing prefixes until it has the whole pickle
(`base.run_pickle`). A sharded index's shards are read the same way, concurrently.

HTTP is httpx's (an optional extra, `surgery[remote]`), imported on first use so local inspect
never pays for it. Nothing fetched is run: the bytes go to the same readers as a local file's.
"""

from __future__ import annotations

import netrc
import os
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from surgery.errors import CorruptCheckpoint, NotACheckpoint, NotFound, SurgeryError, UsageError
from surgery.formats import pickle_vm
from surgery.formats.base import SNIFF_BYTES, Scan, carrying, name_problem

T = TypeVar("T")

CONCURRENCY = 8  # requests in flight at once, over a whole run (prefetches and shards together)
HEAD = 64 << 10  # the first request: a safetensors header, a torch data.pkl, a legacy file's pickles
TAIL = 64 << 10  # a read near the end takes the whole tail: a zip's end records and central directory
READ_AHEAD = 16 << 10  # a miss fetches at least this much: the next small read is likely close by
COALESCE = 4 << 10  # prefetched ranges closer than this are fetched as one request
MAX_READ = 256 << 20  # the most one read may ask for: a pickle or member past it needs a download
RETRIES = 3  # after a 5xx answer or a dropped connection
BACKOFF = 0.25  # seconds before the first retry, doubled for each next one
TIMEOUT = 30.0  # seconds to connect, and between two reads of an answer
REMOTE_KINDS = ("zip", "safetensors", "pickle", "index")  # what `base.sniff` names that is read remotely


class RemoteError(SurgeryError):
    """The server did not give the bytes asked for: refused, failed, cut short, or not ranges."""


class NotByRanges(RemoteError):
    """The file cannot be read a range at a time (the server ignores Range, or one read would be
    too long): only a download of the whole file reads it."""


class NeedsDownload(UsageError):
    """The work needs the tensor bytes of a remote file, which are never fetched."""


class Url(str):
    """A URL where readers expect a path: messages print it whole, `name` is its file's name."""

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self).path).name


def _netrc_auth() -> Any:
    """httpx's Basic auth from the netrc file, when there is one.

    Raises:
        UsageError: the file cannot be read or parsed (its line said).
    """
    import httpx

    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    try:
        return httpx.NetRCAuth(path)
    except (OSError, netrc.NetrcParseError) as exc:
        raise UsageError(path, f"the netrc file cannot be read: {exc}") from None


class _Retry(Exception):
    """A failure worth another try: a 5xx answer, a dropped or timed-out connection."""


class Http:
    """One httpx client for a run: redirects followed (and remembered), retries with backoff on
    5xx answers and dropped connections, a timeout, at most CONCURRENCY requests at a time, and
    every request and byte counted. `headers` (credentials) go with requests for the URLs asked,
    never to where they redirect (a CDN's signed URL). Without an Authorization among them, a
    host's login in the netrc file (`NETRC`, else ~/.netrc: as curl and pip read it) is sent to
    that host alone, as Basic auth."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self._headers = dict(headers or {})
        self._client: Any = None
        self._lock = threading.Lock()
        self._gate = threading.Semaphore(CONCURRENCY)
        self._moved: dict[str, str] = {}  # url -> where its redirects led (a CDN): asked there next
        self.requests = 0
        self.bytes = 0

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError:
                    raise UsageError(
                        "http", "reading a URL needs httpx", hint='pip install "surgery[remote]"'
                    ) from None
                from surgery import __version__

                given = {name.lower() for name in self._headers}
                self._client = httpx.Client(
                    auth=None if "authorization" in given else _netrc_auth(),
                    follow_redirects=True,
                    timeout=TIMEOUT,
                    limits=httpx.Limits(max_connections=CONCURRENCY),
                    headers={"Accept-Encoding": "identity", "User-Agent": f"surgery/{__version__}"},
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def get(self, url: str, start: int, stop: int) -> tuple[bytes, int]:
        """Bytes `start` to `stop` (or to the end of a shorter file) and the file's size.

        Raises:
            RemoteError: the server refused, failed after every retry, ignored `Range`, or
                sent another range or fewer bytes than it said.
            NotFound: HTTP 404.
        """
        for attempt in range(RETRIES + 1):
            try:
                return self._once(url, start, stop)
            except _Retry as retry:
                if attempt == RETRIES:
                    raise RemoteError(url, f"{retry} (after {RETRIES + 1} tries)") from None
                time.sleep(BACKOFF * 2**attempt)
        raise AssertionError("unreachable")

    def _count(self, requests: int, nbytes: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes

    @contextmanager
    def _request(self, url: str, headers: dict[str, str]) -> Iterator[Any]:
        """One GET of `url` (at once where its redirects led before), counted, with the
        credentials only if it goes to the URL asked; httpx's failures, in the answer's body
        too, as `_Retry` (worth another try) or `RemoteError`."""
        import httpx

        client = self.client()
        target = self._moved.get(url, url)
        headers = {**headers, **(self._headers if target == url else {})}
        try:
            with self._gate, client.stream("GET", target, headers=headers) as response:
                self._count(1 + len(response.history), 0)
                if response.history:
                    self._moved[url] = str(response.url)
                yield response
        except httpx.UnsupportedProtocol as exc:  # a redirect to ftp://, say
            raise RemoteError(url, f"cannot be read: {exc}") from None
        except httpx.TimeoutException:
            raise _Retry(f"no answer within {TIMEOUT:g} s") from None
        except httpx.RemoteProtocolError as exc:
            raise _Retry(f"the answer ended early or broke off ({exc})") from None
        except httpx.TransportError as exc:
            raise _Retry(f"the connection failed ({exc or type(exc).__name__})") from None
        except httpx.TooManyRedirects:
            raise RemoteError(url, "too many redirects") from None
        except httpx.HTTPError as exc:
            raise RemoteError(url, f"{type(exc).__name__}: {exc}") from None

    def _once(self, url: str, start: int, stop: int) -> tuple[bytes, int]:
        with self._request(url, {"Range": f"bytes={start}-{stop - 1}"}) as response:
            first, end, size = _check_answer(url, response, start, stop)
            body = bytearray()
            for chunk in response.iter_raw():
                body += chunk
                self._count(0, len(chunk))
                if len(body) > end - first:
                    raise RemoteError(url, f"the server sent more than the {stop - start} bytes asked")
        if len(body) != end - first:
            raise _Retry(f"the answer ended early: {len(body)} of {end - first} bytes")
        return bytes(body), size

    def save(
        self, url: str, out: BinaryIO, announce: Callable[[int], Callable[[int], None] | None] | None = None
    ) -> int:
        """Stream the whole file at `url` into `out` (at its start): its size.

        A connection that drops, times out or ends early is resumed where it broke off (a
        `Range` from the bytes written, with `If-Range` the file's strong ETag or date, so a file
        changed meanwhile comes whole again), after a 5xx answer too; RETRIES failures in a row
        with no new byte end it. `announce(size)` hears the file's size before its first byte
        (it may refuse, raising) and returns what hears every n bytes written, or None.

        Raises:
            RemoteError: refused, failed after every retry, or more bytes than the file has.
            NotFound: HTTP 404.
        """
        written, failures, validator, announced = 0, 0, None, False
        tick: Callable[[int], None] | None = None
        while True:
            before = written
            ranged = {"Range": f"bytes={written}-", "If-Range": validator} if written and validator else {}
            try:
                with self._request(url, ranged) as response:
                    first, size = _whole_answer(url, response, written if ranged else 0)
                    if first == 0:  # from the start: a first answer, or the file changed
                        out.seek(0)
                        out.truncate()
                        written = before = 0
                    validator = _validator(response.headers)
                    if not announced and announce is not None:
                        tick, announced = announce(size), True
                    for chunk in response.iter_raw():  # as it arrives: no re-chunking copies
                        if written + len(chunk) > size:
                            raise RemoteError(url, f"the server sent more than the file's {size:,} bytes")
                        out.write(chunk)
                        written += len(chunk)
                        self._count(0, len(chunk))
                        if tick is not None:
                            tick(len(chunk))
                if written == size:
                    return size
                raise _Retry(f"the answer ended early: {written:,} of {size:,} bytes")
            except _Retry as retry:
                failures = 0 if written > before else failures + 1
                if failures > RETRIES:
                    raise RemoteError(url, f"{retry} (after {RETRIES + 1} tries)") from None
                time.sleep(BACKOFF * 2 ** (failures - 1 if failures else 0))


def _whole_answer(url: str, response: Any, resumed: int) -> tuple[int, int]:
    """Where a download's answer starts and the file's size: 0 and its length for the whole
    file; `resumed` for the rest of it (a 206 from there)."""
    _refusal(url, response, f"bytes {resumed}-")
    if response.status_code == 206:
        first, _, size = _content_range(url, response.headers.get("content-range", ""))
        if first != resumed:
            raise RemoteError(url, f"asked for bytes from {resumed}, the server sent bytes from {first}")
        return first, size
    length = response.headers.get("content-length", "")
    if not length.isdigit():
        raise RemoteError(url, "the server does not say the file's size (no Content-Length)")
    return 0, int(length)


def _validator(headers: Any) -> str | None:
    """What tells the same file in an `If-Range`: a strong ETag, else the modification date."""
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("last-modified")


def _refusal(url: str, response: Any, asked: str) -> None:
    """Raise for an answer that holds no bytes of the file (`asked`: the range, for the message):
    a failure (retried), a refusal, a missing file; or a compressed body, whose bytes are not the
    file's. Judged from the status and headers alone, before any of the body is read."""
    status = response.status_code
    reason = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500:
        raise _Retry(reason)
    if status == 404:
        raise NotFound(url, reason)
    if status in (401, 403):
        raise RemoteError(url, f"{reason}: the server refuses access to the file")
    if status == 416:
        total = _unsatisfied_size(response.headers.get("content-range", ""))
        if total == 0:
            raise NotACheckpoint(url, "empty file (0 bytes)")
        size = f" (the file has {total:,})" if total is not None else ""
        raise RemoteError(url, f"{reason}: {asked} refused{size}")
    if status not in (200, 206):
        raise RemoteError(url, reason)
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        raise RemoteError(
            url, "the server compressed the answer though asked not to: its ranges are not the file's"
        )


def _check_answer(url: str, response: Any, start: int, stop: int) -> tuple[int, int, int]:
    """Where the answer's bytes lie (first, end, file size), judged from its status and headers
    alone: a refusal is said before any of the body is read."""
    _refusal(url, response, f"bytes {start}-{stop - 1}")
    length = response.headers.get("content-length")
    if response.status_code == 200:
        # The whole file, because it ignores Range, or because the file is shorter than asked.
        if start == 0 and length is not None and length.isdigit() and int(length) <= stop:
            return 0, int(length), int(length)
        size = f" ({int(length):,} bytes)" if length and length.isdigit() else ""
        raise NotByRanges(
            url,
            f"the server ignores Range requests: it answered with the whole file{size}; "
            "refused rather than downloaded",
            hint="pass --download to download it whole",
        )
    first, last, size = _content_range(url, response.headers.get("content-range", ""))
    if first != start or last + 1 != min(stop, size):
        raise RemoteError(url, f"asked for bytes {start}-{stop - 1}, the server sent bytes {first}-{last}")
    return first, last + 1, size


def _content_range(url: str, header: str) -> tuple[int, int, int]:
    """`bytes first-last/size` as (first, last, size)."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", header.strip())
    if match is None or not int(match[1]) <= int(match[2]) < int(match[3]):
        raise RemoteError(url, f"the server's Content-Range {header!r} is not a range of a known size")
    return int(match[1]), int(match[2]), int(match[3])


def _unsatisfied_size(header: str) -> int | None:
    """The size a 416 answer gives (`bytes */size`), if it gives one."""
    match = re.fullmatch(r"bytes \*/(\d+)", header.strip())
    return int(match[1]) if match else None


class _Ranges:
    """The byte ranges of one file fetched so far, sorted and merged where they touch."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.chunks: list[bytes] = []

    def gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of `start`..`stop` not fetched yet."""
        out, pos = [], start
        for i in range(max(bisect_right(self.starts, start) - 1, 0), len(self.starts)):
            first, end = self.starts[i], self.starts[i] + len(self.chunks[i])
            if first >= stop:
                break
            if first > pos:
                out.append((pos, first))
            pos = max(pos, end)
            if pos >= stop:
                return out
        if pos < stop:
            out.append((pos, stop))
        return out

    def add(self, start: int, data: bytes) -> None:
        """Keep `data` (the bytes at `start`), merged with every range it touches."""
        if not data:
            return
        stop = start + len(data)
        i = max(bisect_right(self.starts, start) - 1, 0)
        while i < len(self.starts) and self.starts[i] + len(self.chunks[i]) < start:
            i += 1
        j = i
        while j < len(self.starts) and self.starts[j] <= stop:
            j += 1
        if i == j:
            self.starts.insert(i, start)
            self.chunks.insert(i, data)
            return
        first = min(start, self.starts[i])
        end = max(stop, self.starts[j - 1] + len(self.chunks[j - 1]))
        merged = bytearray(end - first)
        for s, chunk in zip(self.starts[i:j], self.chunks[i:j], strict=True):
            merged[s - first : s - first + len(chunk)] = chunk
        merged[start - first : stop - first] = data
        self.starts[i:j] = [first]
        self.chunks[i:j] = [bytes(merged)]

    def take(self, start: int, stop: int) -> bytes:
        """Bytes fetched before (every gap filled, so one merged range holds them)."""
        i = bisect_right(self.starts, start) - 1
        first = self.starts[i]
        return self.chunks[i][start - first : stop - first]

    def head(self) -> int:
        """How many bytes from the start of the file are here without a gap."""
        return len(self.chunks[0]) if self.starts and self.starts[0] == 0 else 0


class RemoteFile:
    """A remote file's bytes as readers slice them: `len()`, `data[a:b]` -> bytes, fetched
    when first sliced, plus the two hints readers give (`prefetch`, `run_pickle`)."""

    def __init__(self, http: Http, url: str, first: bytes, size: int):
        self.http = http
        self.url = url
        self.size = size
        self._ranges = _Ranges()
        self._lock = threading.Lock()
        if first:
            self._ranges.add(0, first)

    @classmethod
    def open(cls, http: Http, url: str, head: int = HEAD) -> RemoteFile:
        """The file at `url`, its first `head` bytes fetched (the size comes with them)."""
        first, size = http.get(url, 0, head)
        return cls(http, url, first, size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice | int) -> Any:
        if isinstance(key, int):
            return self[key : key + 1][0]
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("a remote file is read in ranges, not strides")
        if start >= stop:
            return b""
        if stop - start > MAX_READ:
            raise NotByRanges(
                self.url,
                f"reading it needs {stop - start:,} bytes at once (a pickle or member that long): "
                f"over the {MAX_READ:,} surgery fetches of a remote file for one read",
                hint="pass --download to download it whole",
            )
        self._fill(self._widened(start, stop))
        with self._lock:
            return self._ranges.take(start, stop)

    def _widened(self, start: int, stop: int) -> list[tuple[int, int]]:
        """What to fetch for a read of `start`..`stop`: its gaps, each at least READ_AHEAD long,
        the whole tail when it reaches the last TAIL bytes."""
        with self._lock:
            gaps = self._ranges.gaps(start, stop)
            out: list[tuple[int, int]] = []
            for first, end in gaps:
                if end > self.size - TAIL:
                    first = min(first, max(self.size - TAIL, 0))
                    end = self.size
                else:
                    end = min(max(end, first + READ_AHEAD), self.size)
                out.extend(self._ranges.gaps(first, end))
            return sorted(set(out))

    def _fill(self, gaps: list[tuple[int, int]]) -> None:
        """Fetch each gap, CONCURRENCY at a time when there are several."""

        def fetch(gap: tuple[int, int]) -> None:
            data, size = self.http.get(self.url, *gap)
            if size != self.size:
                raise RemoteError(
                    self.url, f"the file changed on the server while read: {self.size:,} bytes, then {size:,}"
                )
            with self._lock:
                self._ranges.add(gap[0], data)

        if len(gaps) == 1:
            fetch(gaps[0])
        elif gaps:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(fetch, gaps))

    def prefetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch `(offset, length)` ranges about to be read, neighbours closer than COALESCE
        as one request, the rest concurrently."""
        wanted: list[list[int]] = []
        for offset, length in sorted((max(o, 0), o + n) for o, n in ranges if n > 0 and o < self.size):
            end = min(length, self.size)
            if wanted and offset <= wanted[-1][1] + COALESCE:
                wanted[-1][1] = max(wanted[-1][1], end)
            else:
                wanted.append([offset, end])
        with self._lock:
            gaps = [gap for first, end in wanted for gap in self._ranges.gaps(first, end)]
        self._fill(gaps)

    def run_pickle(self, attempt: Callable[[memoryview], T]) -> T:
        """`attempt(prefix)` over the first bytes of the file, doubled while the pickle machine
        runs out of them (`pickle_vm.Truncated`) before the end of the file."""
        with self._lock:
            end = min(self.size, max(HEAD, self._ranges.head()))
        while True:
            prefix = self[0:end]
            try:
                return attempt(memoryview(prefix))
            except pickle_vm.Truncated:
                if end >= self.size:
                    raise
                end = min(self.size, 2 * end, max(end + 1, MAX_READ))  # past MAX_READ: refused


class Remote:
    """What one open reads over HTTP: the client, every file opened, the traffic."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.http = Http(headers)
        self.files: dict[str, RemoteFile] = {}
        self._lock = threading.Lock()

    def open(self, url: str, head: int = HEAD) -> RemoteFile:
        file = RemoteFile.open(self.http, url, head)
        with self._lock:
            self.files[url] = file
        return file

    def read_at(self, url: str, offset: int, length: int) -> bytes:
        """A few bytes of a file read before (a 0-dim tensor beside the state_dict)."""
        return self.files[url][offset : offset + length]

    def traffic(self, url: str) -> dict[str, Any]:
        """What reading `url` took: the bytes and requests, against the size of every file read."""
        return {
            "url": url,
            "files": len(self.files),
            "size": sum(f.size for f in self.files.values()),
            "bytes_read": self.http.bytes,
            "requests": self.http.requests,
        }

    def close(self) -> None:
        self.http.close()


def scan_url(url: str, *, verify: bool = False, headers: dict[str, str] | None = None) -> Scan:
    """Read the checkpoint at an http(s):// URL as `formats.scan` reads a file: a safetensors
    file, a torch zip or legacy file, a plain pickle, or a `*.index.json` and its shards.
    `headers` (an Authorization) are sent with each request.

    Raises:
        NeedsDownload: `verify` asks for every storage's bytes.
        SurgeryError: as for a local file, or the server failed to give the bytes.
    """
    if verify:
        raise NeedsDownload(
            url,
            "--verify reads every storage's bytes: that needs a download",
            hint="pass --download to verify a downloaded copy",
        )
    remote = Remote(headers)
    try:
        scan = _scan_remote(remote, Url(url), shard_of=None)
    finally:
        remote.close()  # opened again if a few more bytes are read (Checkpoint's 0-dim extras)
    scan.remote = remote
    return scan


def _scan_remote(remote: Remote, url: Url, *, shard_of: str | None, head: int = HEAD) -> Scan:
    from surgery.formats import read_bytes

    data = remote.open(url, head)
    return read_bytes(url, data, verify=False, shard_of=shard_of, read=_reader(remote))


def _reader(remote: Remote) -> Callable[[str, Any, Any, bool], Scan]:
    """`formats.read_kind` for remote files: an index's shards are URLs beside it; the formats
    read from disk only say so."""

    def read(kind: str, url: Any, data: Any, verify: bool) -> Scan:
        from surgery.formats import read_kind

        if kind == "index":
            return _scan_index(remote, url, data)
        if kind not in REMOTE_KINDS:
            raise NotACheckpoint(url, f"its first bytes say {kind}: a format surgery reads from disk only")
        return read_kind(kind, url, data, verify)

    return read


def _scan_index(remote: Remote, url: Url, data: RemoteFile) -> Scan:
    """An index and its shards, read CONCURRENCY at a time; checked as a local index is."""
    from surgery.formats.sharded import MAX_INDEX_BYTES, join_shards, parse_index

    if len(data) > MAX_INDEX_BYTES:
        raise CorruptCheckpoint(url, f"index file over {MAX_INDEX_BYTES} bytes")
    findings: list = []
    with carrying(findings):
        weight_map, meta = parse_index(url, data[0 : len(data)])
        shards = list(dict.fromkeys(weight_map.values()))
        urls = [shard_url(url, shard) for shard in shards]
        heads = _shard_heads(weight_map)

        def scan(shard: str, address: Url) -> Scan:
            return _scan_remote(remote, address, shard_of=url, head=heads[shard])

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            scans = list(pool.map(scan, shards, urls))
        return join_shards(url, weight_map, meta, list(zip(shards, scans, strict=True)), findings)


def _shard_heads(weight_map: dict[str, str]) -> dict[str, int]:
    """How much of each shard to ask for first: its header as the index lets one guess it (a
    safetensors entry is its name and under 100 bytes of dtype, shape and offsets), with room
    to spare, so one request holds it; from SNIFF_BYTES (what `base.sniff` reads) to HEAD.
    100 shards of a few tensors each cost kilobytes each, not 64 KiB each."""
    guess: dict[str, int] = {}
    for name, shard in weight_map.items():
        guess[shard] = guess.get(shard, 1024) + 2 * (len(name.encode()) + 100)
    return {shard: min(max(size, SNIFF_BYTES), HEAD) for shard, size in guess.items()}


def shard_url(index: Url, name: str) -> Url:
    """The URL of a shard the index names: beside the index, by the rules a local index's
    shard names follow (a plain relative name: no `..`, no absolute path)."""
    problem = name_problem(name)
    if problem:
        raise CorruptCheckpoint(index, f"the index names shard {name!r}, which {problem}")
    return Url(urljoin(index, quote(name)))
