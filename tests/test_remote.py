"""`surgery inspect URL`: checkpoints read over HTTP with range requests, never their tensor bytes.

A real HTTP server runs in a thread for the whole module (Python's http.server, Range answered
as RFC 9110 says: one range, open-ended or suffix, 206 with Content-Range, 416 past the end)
and records every request and every byte it sent. A path starting with one of VARIANTS makes it
ignore Range, redirect, fail once or always with 503, cut bodies short, or refuse (401, 403,
416); any other path is served as it should. Each remote report is compared with the local
report of the same file, and the bytes the client says it read with the bytes the server sent.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_clean_error, examples, run_cli, run_subprocess
from doc_pages import DOCS, README, fenced
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import surgery
from surgery.formats import remote

CANARY = "CANARY"
TENSORS = 400
TENSOR_BYTES = 512_000  # 400 of them: a 205 MB file of each format (written in about 2 s)


# How the server misbehaves, by the first part of the path (any other path is served as it should).
VARIANTS = (
    "norange",
    "redirect",
    "loop",
    "once503",
    "down",
    "short",
    "shortonce",
    "forbidden",
    "unauthorized",
)
VARIANTS += ("r416", "slow", "grows")
# A download (a GET without Range) cut short the first time, or every time; one served another file.
VARIANTS += ("dropsonce", "dropsalways", "swap")
VARIANTS += ("basic",)  # Basic auth asked for, as user:secret
VARIANTS += ("trickle",)  # a download's body sent slowly (10 ms a 64 KiB chunk), to be interrupted
BASIC = "Basic " + base64.b64encode(b"user:secret").decode()


@dataclass
class Served:
    """One request as the server saw it."""

    path: str
    range: str | None
    status: int
    sent: int  # body bytes handed to the socket


@dataclass
class Server:
    root: Path
    port: int = 0
    log: list[Served] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # paths of the fail-once variants already failed
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, name: str, variant: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port}/{variant + '/' if variant else ''}{name}"

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.most_in_flight = 0

    def sent(self) -> int:
        return sum(r.sent for r in self.log)

    def dropped(self, name: str) -> bool:
        """Whether a download of `name` was cut short before (then marked as such)."""
        with self.lock:
            before = f"dropped:{name}" in self.seen
            self.seen.add(f"dropped:{name}")
        return before


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def setup(self) -> None:
            super().setup()  # headers and body go out as written, not held back for an ACK
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            # Logged before anything is sent: the client cannot see an answer the log lacks.
            self.record = Served(self.path, self.headers.get("Range"), 0, 0)
            with server.lock:
                server.log.append(self.record)
                server.in_flight += 1
                server.most_in_flight = max(server.most_in_flight, server.in_flight)
            try:
                self.answer()
            finally:
                with server.lock:
                    server.in_flight -= 1

        def answer(self) -> None:
            variant, _, name = self.path[1:].partition("/")
            if variant not in VARIANTS:
                variant, name = None, self.path[1:]
            if variant == "redirect":
                return self.empty(302, Location=f"/{name}")
            if variant == "loop":
                return self.empty(302, Location=self.path)
            first_time = self.path not in server.seen
            server.seen.add(self.path)
            if variant == "down" or (variant == "once503" and first_time):
                return self.empty(503)
            if variant in ("forbidden", "unauthorized"):
                return self.empty(403 if variant == "forbidden" else 401)
            if variant == "basic" and self.headers.get("Authorization") != BASIC:
                return self.empty(401, **{"WWW-Authenticate": 'Basic realm="models"'})
            file = server.root / name
            asked = self.headers.get("Range")
            whole = asked is None or asked.endswith("-")  # a download, or the rest of one
            if variant == "swap" and whole:
                file = file.with_name(file.name + ".swap")
            if not file.is_file():
                return self.empty(404)
            size = file.stat().st_size + (variant == "grows" and not first_time)  # appended to meanwhile
            etag = f'"{file.stat().st_size}-{file.stat().st_mtime_ns}"'
            if variant == "r416":
                return self.empty(416, **{"Content-Range": f"bytes */{size}"})
            if variant == "slow":
                time.sleep(0.02)  # so that concurrent requests overlap at the server
            wanted = None if variant == "norange" else _range(self.headers.get("Range"), size)
            if self.headers.get("If-Range") not in (None, etag):  # changed: the whole file, as RFC 9110
                wanted = None
            if wanted == "unsatisfiable":
                return self.empty(416, **{"Content-Range": f"bytes */{size}"})
            first, last = wanted or (0, size - 1)
            self.record.status = 206 if wanted else 200
            self.send_response(self.record.status)
            if wanted:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("ETag", etag)
            self.end_headers()
            drops = whole and (
                variant == "dropsalways" or (variant == "dropsonce" and not server.dropped(name))
            )
            cut = drops or variant == "short" or (variant == "shortonce" and first_time)
            end = first + (last - first + 1) // 2 if cut else last + 1
            with open(file, "rb") as f:
                f.seek(first)
                try:
                    while first + self.record.sent < end:
                        chunk = f.read(min(1 << 16, end - first - self.record.sent))
                        if not chunk:  # past the end of the file ("grows" says more than it holds)
                            break
                        self.record.sent += len(chunk)  # counted before the client can have it
                        self.wfile.write(chunk)
                        if variant == "trickle" and whole:
                            time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
            if cut:
                self.close_connection = True

        def empty(self, status: int, **headers: str) -> None:
            self.record.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def _range(header: str | None, size: int):
    """(first, last) of a single `bytes=` range, "unsatisfiable", or None for no (usable) Range."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        return max(size - int(last), 0), size - 1
    if int(first) >= size:
        return "unsatisfiable"
    return int(first), min(int(last), size - 1) if last else size - 1


class QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that takes a client hanging up (surgery does, having read enough
    of an answer) as no failure: no traceback on stderr, which the CLI runs capture."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def listening(state: Any, handler: type[BaseHTTPRequestHandler]) -> Iterator[None]:
    """A QuietServer on a free port of 127.0.0.1 (`state.port`), answering from a thread for the
    length of the block."""
    httpd = QuietServer(("127.0.0.1", 0), handler)
    state.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    served = Server(tmp_path_factory.mktemp("served"))
    with listening(served, _handler(served)):
        yield served


@pytest.fixture
def served(server: Server) -> Server:
    server.reset()
    return server


@dataclass(frozen=True)
class Big:
    zip: str
    legacy: str
    safetensors: str
    sharded: str


@pytest.fixture(scope="module")
def big(server: Server) -> Big:
    """400 tensors of 512,000 bytes, in a 205 MB file of each format and in 100 shards of 4
    tensors with their index, in the served folder (written in about 3 s)."""
    state = {f"blocks.{i // 4}.layer{i % 4}.weight": torch.zeros(TENSOR_BYTES // 4) for i in range(TENSORS)}
    checkpoint = {"epoch": 7, "best_acc1": torch.tensor(76.13), "state_dict": state}
    torch.save(checkpoint, server.root / "big.pth")
    torch.save(checkpoint, server.root / "big-legacy.pth", _use_new_zipfile_serialization=False)
    save_file(state, str(server.root / "big.safetensors"))
    (server.root / "big-sharded").mkdir()
    names, weight_map = list(state), {}
    for shard in range(100):
        name = f"model-{shard + 1:05d}-of-00100.safetensors"
        tensors = {key: state[key] for key in names[4 * shard : 4 * shard + 4]}
        save_file(tensors, str(server.root / "big-sharded" / name))
        weight_map |= dict.fromkeys(tensors, name)
    index = {"metadata": {"total_size": TENSORS * TENSOR_BYTES}, "weight_map": weight_map}
    (server.root / "big-sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    return Big("big.pth", "big-legacy.pth", "big.safetensors", "big-sharded/model.safetensors.index.json")


def same_report(server: Server, name: str, *args: str) -> dict:
    """The remote inspect's page and JSON are the local ones, but for the path and what it fetched.

    Returns:
        The remote JSON document's `remote` field.
    """
    local, url = str(server.root / name), server.url(name)
    here, there = f"{server.root}/", server.url("")  # the served folder, locally and over HTTP
    local_page, remote_page = run_cli("inspect", local, *args), run_cli("inspect", url, *args)
    assert remote_page.exit_code == local_page.exit_code, remote_page
    fetched = [line for line in remote_page.stdout.splitlines() if line.lstrip().startswith("fetched")]
    assert len(fetched) == 1, remote_page.stdout
    remote_lines = [line for line in remote_page.stdout.splitlines() if line not in fetched]
    assert "\n".join(remote_lines).replace(there, here) == local_page.stdout.rstrip("\n")

    local_doc = json.loads(run_cli("inspect", local, "--json", *args).stdout)
    server.reset()
    run = run_cli("inspect", url, "--json", *args)
    remote_doc = json.loads(run.stdout.replace(there, here))
    traffic = remote_doc.pop("remote")
    assert local_doc.pop("remote") is None
    assert remote_doc == local_doc
    # What the client counts is what the server saw.
    assert traffic["requests"] == len(server.log)
    assert traffic["bytes_read"] == server.sent()
    return traffic


# -- the same report from a few ranges ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "sharded"])
def test_400_tensors_are_inspected_from_under_half_a_percent_of_their_bytes(served, big, kind):
    name = getattr(big, kind)
    traffic = same_report(served, name, "--depth", "1")
    files = [served.root / name]
    if kind == "sharded":
        files += sorted((served.root / "big-sharded").glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    assert (traffic["size"], traffic["files"]) == (size, len(files)) and size > TENSORS * TENSOR_BYTES
    assert traffic["bytes_read"] < 0.005 * size, traffic
    # safetensors: one request for the length and header, each shard's too (the index another);
    # torch: the head and the tail, plus a small range per storage (a zip's local headers, a
    # legacy file's element counts), as many as 8 at a time
    assert traffic["requests"] <= {"safetensors": 1, "sharded": 101}.get(kind, TENSORS + 3), traffic
    assert all(r.range and r.status == 206 for r in served.log)


def test_the_shards_of_an_index_are_read_at_most_8_at_a_time(served, big):
    run = run_cli("inspect", served.url(big.sharded, "slow"), "--json")
    assert run.exit_code == 0, run
    assert len(served.log) == json.loads(run.stdout)["remote"]["requests"] == 101
    assert 1 < served.most_in_flight <= remote.CONCURRENCY, served.most_in_flight


def test_redirects_are_followed_and_counted(served, seeded_resnet18):
    shutil.copy(seeded_resnet18.imagenet, served.root / "imagenet.pth.tar")
    traffic = same_report(served, "imagenet.pth.tar", "--depth", "1")
    served.reset()
    doc = json.loads(run_cli("inspect", served.url("imagenet.pth.tar", "redirect"), "--json").stdout)
    assert doc["num_tensors"] == 122
    assert [r.status for r in served.log].count(302) == 1  # the place it led to is asked next
    assert doc["remote"]["requests"] == len(served.log) == traffic["requests"] + 1


def test_a_server_failing_once_with_503_is_asked_again(served, seeded_resnet18):
    shutil.copy(seeded_resnet18.legacy, served.root / "legacy-503.pth")
    run = run_cli("inspect", served.url("legacy-503.pth", "once503"), "--json")
    assert run.exit_code == 0, run
    assert json.loads(run.stdout)["num_tensors"] == 122
    assert [r.status for r in served.log][:2] == [503, 206]


def test_a_body_cut_short_once_is_fetched_again(served, seeded_resnet18):
    shutil.copy(seeded_resnet18.safetensors, served.root / "short-once.safetensors")
    run = run_cli("inspect", served.url("short-once.safetensors", "shortonce"), "--json")
    assert run.exit_code == 0, run
    assert json.loads(run.stdout)["num_tensors"] == 122
    assert len(served.log) == 2


def test_a_small_file_from_a_server_ignoring_range_is_read_whole(served, fixtures_dir):
    shutil.copy(fixtures_dir / "tiny.safetensors", served.root / "tiny.safetensors")
    run = run_cli("inspect", served.url("tiny.safetensors", "norange"), "--json")
    assert run.exit_code == 0, run
    assert [(r.status, r.sent) for r in served.log] == [
        (200, (served.root / "tiny.safetensors").stat().st_size)
    ]


# -- nothing fetched is run --------------------------------------------------------------------


class RunsCommand:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_malicious_pickle_served_remotely_is_the_same_danger_and_never_runs(served, tmp_path, zipfile):
    canary = tmp_path / CANARY
    name = f"payload-{zipfile}.pth"
    torch.save(
        {"weight": torch.ones(3), "hook": RunsCommand(f"touch {canary}")},
        served.root / name,
        _use_new_zipfile_serialization=zipfile,
    )
    torch.load(served.root / name, weights_only=False)
    assert canary.exists(), "torch.load did not run the payload: the test proves nothing"
    canary.unlink()

    same_report(served, name)  # the same danger finding, the same exit code (1)
    url = served.url(name)
    run = run_subprocess("inspect", url)
    line = assert_clean_error(run, url, contains="not safe to load: danger", code=1)
    assert "system" in line and "danger: global posix.system" in run.stdout
    assert not canary.exists(), "the payload ran"


def test_inspecting_a_url_imports_no_torch_and_local_inspect_no_httpx(served, fixtures_dir):
    shutil.copy(fixtures_dir / "legacy.pth", served.root / "startup.pth")
    code = (
        "import sys, surgery\n"
        "surgery.open_checkpoint(sys.argv[1]); print('torch' in sys.modules, 'httpx' in sys.modules)\n"
    )
    for path, expected in (
        (served.url("startup.pth"), "False True"),
        (fixtures_dir / "legacy.pth", "False False"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected, (path, proc.stdout)


# -- what needs the tensor bytes says so --------------------------------------------------------


def test_verify_on_a_url_needs_a_download(served, fixtures_dir):
    shutil.copy(fixtures_dir / "tiny_state_dict.pth", served.root / "verify.pth")
    url = served.url("verify.pth")
    assert_clean_error(run_cli("inspect", url, "--verify"), url, contains="needs a download", code=2)
    assert served.log == []


def test_tensors_of_a_remote_checkpoint_need_a_download(served, fixtures_dir):
    shutil.copy(fixtures_dir / "tiny.safetensors", served.root / "tensors.safetensors")
    ckpt = surgery.open_checkpoint(served.url("tensors.safetensors"))
    name = ckpt.tensors[0].name
    requests = len(served.log)
    for read in (lambda: ckpt.tensor(name), ckpt.state_dict, lambda: ckpt.byte_range(name)):
        with pytest.raises(remote.NeedsDownload, match="needs a download"):
            read()
    assert len(served.log) == requests


# -- failures: one line, non-zero exit ----------------------------------------------------------


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF", 0.001)


@pytest.mark.parametrize(
    "variant, name, says",
    [
        (None, "missing.pth", "HTTP 404"),
        ("forbidden", "tiny.safetensors", "HTTP 403 Forbidden: the server refuses access"),
        ("unauthorized", "tiny.safetensors", "HTTP 401 Unauthorized: the server refuses access"),
        ("r416", "tiny.safetensors", "HTTP 416"),
        ("down", "tiny.safetensors", "HTTP 503 Service Unavailable (after 4 tries)"),
        ("short", "tiny.safetensors", "ended early"),
        ("loop", "tiny.safetensors", "too many redirects"),
        (None, "empty.pth", "empty file (0 bytes)"),
        (None, "page.html", "an HTML page, not a checkpoint"),
    ],
)
def test_a_failure_is_one_line_and_a_non_zero_exit(served, fixtures_dir, quick_retries, variant, name, says):
    shutil.copy(fixtures_dir / "tiny.safetensors", served.root / "tiny.safetensors")
    (served.root / "empty.pth").write_bytes(b"")
    (served.root / "page.html").write_text("<!doctype html><p>sign in</p>" * 3000)
    url = served.url(name, variant)
    assert_clean_error(run_cli("inspect", url), url, contains=says, code=1)
    if variant == "down":
        assert len(served.log) == remote.RETRIES + 1


def test_a_server_ignoring_range_is_refused_without_downloading_the_file(served, big, quick_retries):
    url = served.url(big.zip, "norange")
    line = assert_clean_error(run_cli("inspect", url), url, contains="ignores Range requests", code=1)
    size = (served.root / big.zip).stat().st_size
    assert f"({size:,} bytes)" in line
    assert len(served.log) == 1 and served.sent() < 0.1 * size, served.log


def test_a_file_changing_size_between_requests_is_refused(served, big):
    url = served.url(big.zip, "grows")
    assert_clean_error(
        run_cli("inspect", url), url, contains="the file changed on the server while read", code=1
    )


def test_a_pickle_longer_than_one_read_may_be_is_refused(served, monkeypatch):
    monkeypatch.setattr(remote, "MAX_READ", 100_000)
    text = ["x" * 1000 + str(i) for i in range(300)]
    (served.root / "longer.pkl").write_bytes(pickle.dumps({"notes": text}, protocol=2))
    url = served.url("longer.pkl")
    assert_clean_error(run_cli("inspect", url), url, contains="bytes at once", code=1)
    assert served.sent() <= 100_000


def test_nothing_listening_is_one_line(quick_retries):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.safetensors"
    assert_clean_error(run_cli("inspect", url), url, contains="the connection failed", code=1)


def test_a_shard_outside_the_index_folder_is_refused_before_any_request_for_it(served):
    folder = served.root / "escape"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../secret.safetensors"}})
    )
    url = served.url("escape/model.safetensors.index.json")
    assert_clean_error(run_cli("inspect", url), url, contains="lies outside the folder", code=1)
    assert [r.path for r in served.log] == ["/escape/model.safetensors.index.json"]


@pytest.mark.parametrize("keep", [5000, 200_000])
def test_a_pickle_cut_short_is_the_same_error_as_locally(served, keep):
    """Cut inside the first request, and past it: the growing prefix reaches the end of the file."""
    text = ["x" * 1000 + str(i) for i in range(300)]
    (served.root / "cut.pkl").write_bytes(pickle.dumps({"notes": text, "w": 1}, protocol=2)[:keep])
    local, url = served.root / "cut.pkl", served.url("cut.pkl")
    expected = assert_clean_error(run_cli("inspect", local), local, contains="truncated", code=1)
    assert assert_clean_error(run_cli("inspect", url), url, code=1) == expected.replace(str(local), url)


def test_unpickled_bytes_past_the_prefix_are_fetched_until_the_pickle_ends(served):
    """A plain pickle far longer than the first request: read in growing prefixes, to its STOP."""
    text = ["x" * 1000 + str(i) for i in range(300)]  # 300 KB of strings
    (served.root / "long.pkl").write_bytes(pickle.dumps({"notes": text, "w": 1}, protocol=2))
    traffic = same_report(served, "long.pkl")
    assert traffic["bytes_read"] == (served.root / "long.pkl").stat().st_size
    assert traffic["requests"] <= 4  # 64 KiB, then 128, 256 and 512 KiB from the start


FIXTURE_FILES = [
    "imagenet_example.pth.tar",
    "legacy.pth",
    "tiny.safetensors",
    "tiny_state_dict.pth",
    "tied.pth",
    "ema.pth",
    "lightning.ckpt",
    "dtypes.pth",
    "dtypes.safetensors",
    "cuda_saved.pth",
    "numpy_extras.pth",
    "full_model.pth",
    "payload_os_system.pth",
    "scripted.pt",
    "compiled.pt",
    "sharded_bin/pytorch_model.bin.index.json",
    "sharded_safetensors/model.safetensors.index.json",
]


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_every_fixture_reads_the_same_over_http(served, fixtures_dir, name):
    if not (served.root / "fixtures").exists():
        shutil.copytree(fixtures_dir, served.root / "fixtures")
    same_report(served, f"fixtures/{name}", "--depth", "2")


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60)), max_size=12), st.integers(0, 300))
def test_the_range_cache_gives_back_exactly_the_bytes_fetched(fetches, probe):
    """Ranges added in any order, overlapping or touching, read back as the file's bytes."""
    content = bytes(range(256)) + bytes(range(100))
    ranges = remote._Ranges()
    for start, length in fetches:
        ranges.add(start, content[start : start + length])
    covered = {i for start, length in fetches for i in range(start, min(start + length, len(content)))}
    stop = min(probe + 40, len(content))
    gaps = ranges.gaps(probe, stop)
    assert {i for a, b in gaps for i in range(a, b)} == set(range(probe, stop)) - covered
    assert all(a < b for a, b in gaps) and gaps == sorted(gaps)
    for i in range(len(ranges.starts) - 1):  # sorted, and apart: ranges that touch are merged
        assert ranges.starts[i] + len(ranges.chunks[i]) < ranges.starts[i + 1]
    for start, chunk in zip(ranges.starts, ranges.chunks, strict=True):
        assert chunk == content[start : start + len(chunk)]
    if not gaps and probe < stop:
        assert ranges.take(probe, stop) == content[probe:stop]


# -- the examples of the docs ---------------------------------------------------------------------

# The pages show the server at these addresses; the tests' servers listen where they can.
DOC_SERVER, DOC_PLAIN_SERVER = "http://127.0.0.1:8000/", "http://127.0.0.1:8001/"
DOC_EXAMPLES = [
    (page.name, text)
    for page in (README, DOCS / "remote.md")
    for lang, text in fenced(page)
    if lang == "text"
    and text.startswith(("$ surgery inspect http://127.0.0.1:800", "$ surgery convert http://127.0.0.1:800"))
]
TIMES = re.compile(r"\d+\.\d+ s\b|\(\d+(\.\d+)? [KMGT]?i?B/s\)")  # how long it took: never the same twice


@pytest.fixture(scope="module")
def plain_server(server: Server) -> str:
    """Python's own http.server (it ignores Range) over the same folder: its address."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = QuietServer(("127.0.0.1", 0), partial(Quiet, directory=server.root))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_the_docs_have_remote_examples():
    assert {page for page, _ in DOC_EXAMPLES} == {"README.md", "remote.md"}
    assert len(DOC_EXAMPLES) >= 5


@pytest.mark.parametrize(
    "page, block", DOC_EXAMPLES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(DOC_EXAMPLES)]
)
def test_the_remote_examples_of_the_docs_print_what_they_show(
    served, big, plain_server, fixtures_dir, page, block, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where an example's output goes
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    if not (served.root / "fixtures").exists():
        shutil.copytree(fixtures_dir, served.root / "fixtures")
    addresses = {DOC_SERVER: served.url(""), DOC_PLAIN_SERVER: plain_server}
    command, _, shown = block.partition("\n")
    words = shlex.split(command.removeprefix("$ surgery "))
    for doc, real in addresses.items():
        words = [word.replace(doc, real) for word in words]
    run = run_cli(*words)
    printed = run.stdout + run.stderr  # as a shell shows them: the report, then the error
    for doc, real in addresses.items():
        printed = printed.replace(real, doc)
    printed, shown = TIMES.sub("(time)", printed), TIMES.sub("(time)", shown)
    assert printed == shown, f"{page} shows:\n{shown}\nthe run printed:\n{printed}"


def test_scan_judges_urls_by_their_headers_as_it_judges_files(served, tmp_path, fixtures_dir):
    canary = tmp_path / CANARY
    payload = {"w": torch.ones(100_000), "hook": RunsCommand(f"touch {canary}")}  # past the first range
    torch.save(payload, served.root / "scanned.pth")
    shutil.copy(fixtures_dir / "tiny.safetensors", served.root / "scanned.safetensors")
    urls = [
        served.url("scanned.pth"),
        served.url("scanned.safetensors"),
        served.url("scanned.pth", "norange"),
    ]
    sarif = tmp_path / "scan.sarif"
    run = run_cli("scan", *urls, "--json", "--sarif", str(sarif))
    assert run.exit_code == 1, run
    verdicts = {r["path"]: r["verdict"] for r in json.loads(run.stdout)["checkpoints"]}
    local = json.loads(run_cli("scan", str(served.root / "scanned.pth"), "--json").stdout)["checkpoints"][0]
    assert (
        verdicts == {urls[0]: local["verdict"], urls[1]: "safe", urls[2]: "error"}
        and local["verdict"] == "danger"
    )
    assert all(r.range for r in served.log), "a whole file was asked for"
    uris = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in json.loads(sarif.read_text())["runs"][0]["results"]
    }
    assert urls[0] in uris  # the URL as it is, not folded into a path
    assert not canary.exists()


def test_a_netrc_login_is_sent_to_its_host_and_a_bad_netrc_is_one_line(
    served, fixtures_dir, tmp_path, monkeypatch
):
    shutil.copy(fixtures_dir / "tiny.safetensors", served.root / "private.safetensors")
    url = served.url("private.safetensors", "basic")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))  # no file: nothing sent
    assert_clean_error(run_cli("inspect", url), url, contains="HTTP 401 Unauthorized", code=1)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login other password wrong\n")  # another host's
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert_clean_error(run_cli("inspect", url), url, contains="HTTP 401 Unauthorized", code=1)
    netrc_file.write_text("machine 127.0.0.1 login user password secret\n")
    netrc_file.chmod(0o600)
    assert run_cli("inspect", url).exit_code == 0
    netrc_file.write_text("not a netrc file\n")
    assert_clean_error(run_cli("inspect", url), netrc_file, contains="the netrc file cannot be read", code=2)
