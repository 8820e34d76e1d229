"""`surgery inspect hf://ORG/REPO[@REVISION][/PATH]`: the Hugging Face Hub through huggingface_hub,
and its local cache.

A real HTTP server in a thread stands in for the Hub (`HF_ENDPOINT` points to it) with the
endpoints huggingface_hub 2.x asks: `GET /api/models/{repo}/tree/{revision}` (the listing) and
`HEAD`/`GET /{repo}/resolve/{revision}/{path}` (the file: ETag and X-Repo-Commit, as
`hf_hub_download` needs, and Range as tests/test_remote.py's server answers it), failing as the
Hub does (`X-Error-Code` RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). It serves
files written by torch.save and safetensors, and logs every request: a read from the cache is
one the log does not see.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from conftest import Run, assert_clean_error, run_cli, run_subprocess
from doc_pages import DOCS, fenced
from safetensors.torch import load_file, save_file
from test_remote import CANARY, RunsCommand, Served, _range, listening

pytest.importorskip("huggingface_hub")

from huggingface_hub import hf_hub_download  # noqa: E402

COMMIT = "4f1c2e9d8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
TOKEN = "hf_surgery_test_token"
GATED = "org/gated"


@dataclass
class Hub:
    """The stand-in Hub: a folder per repo under `root` (`root/org/name/...`), one commit each."""

    root: Path
    port: int = 0
    log: list[Served] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)  # each request's Authorization header
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.auth.clear()

    def repo(self, repo: str) -> Path:
        folder = self.root / repo
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self.serve(body=False)

        def do_GET(self) -> None:
            self.serve(body=True)

        def serve(self, body: bool) -> None:
            self.record = Served(f"{self.command} {self.path}", self.headers.get("Range"), 0, 0)
            with hub.lock:
                hub.log.append(self.record)
                hub.auth.append(self.headers.get("Authorization"))
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
            if parts[:1] == ["api"] and parts[1:2] in (["models"], ["datasets"]) and parts[4:5] == ["tree"]:
                kind = "" if parts[1] == "models" else "datasets/"  # datasets live under root/datasets/
                return self.tree(f"{kind}{parts[2]}/{parts[3]}", parts[5])
            if parts[0] == "cdn":  # where the gated repo's files redirect: another origin, no credentials
                return self.file(hub.root.joinpath(*parts[1:]), body)
            kind = "datasets/" if parts[0] == "datasets" else ""
            parts = parts[1:] if kind else parts
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(f"{kind}{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
            return self.fail(404, "NotFound")

        def known(self, repo: str, revision: str) -> Path | None:
            folder = hub.root / repo
            if not folder.is_dir():
                self.fail(401, "RepoNotFound", "Repository not found")  # as the Hub: 401, not 404
                return None
            if revision not in ("main", COMMIT):
                self.fail(404, "RevisionNotFound", "Invalid rev id: " + revision)
                return None
            return folder

        def tree(self, repo: str, revision: str) -> None:
            folder = self.known(repo, revision)
            if folder is None:
                return
            entries = [
                {
                    "type": "file",
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                    "size": p.stat().st_size,
                    "path": p.relative_to(folder).as_posix(),
                }
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            ]
            self.send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

        def resolve(self, repo: str, revision: str, path: str, body: bool) -> None:
            folder = self.known(repo, revision)
            if folder is None:
                return
            if repo == GATED and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.fail(401, "GatedRepo", f"Access to model {repo} is restricted.")
            if not (folder / path).is_file():
                return self.fail(404, "EntryNotFound", "Entry not found")
            if repo == GATED and self.command == "GET":  # as the Hub sends large files to its CDN
                cdn = f"http://localhost:{hub.port}/cdn/{repo}/{path}"
                return self.send(302, b"", {"Location": cdn, "X-Repo-Commit": COMMIT})
            self.file(folder / path, body)

        def file(self, file: Path, body: bool) -> None:
            if not file.is_file():
                return self.fail(404, "NotFound")
            data = file.read_bytes()
            wanted = _range(self.headers.get("Range"), len(data))
            if wanted == "unsatisfiable":
                return self.fail(416, "RangeNotSatisfiable")
            first, last = wanted or (0, len(data) - 1)
            headers = {
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": COMMIT,
                "Accept-Ranges": "bytes",
            }
            if wanted:
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            self.send(206 if wanted else 200, data[first : last + 1], headers, body)

        def fail(self, status: int, code: str, message: str = "") -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message or code, "X-Repo-Commit": COMMIT}
            self.send(status, json.dumps({"error": message or code}).encode(), headers)

        def send(self, status: int, data: bytes, headers: dict[str, str], body: bool = True) -> None:
            self.record.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.record.sent = len(data)
                try:
                    self.wfile.write(data)
                except ConnectionError:  # the client hung up without reading it
                    self.close_connection = True

    return Handler


@dataclass(frozen=True)
class Repos:
    state: dict  # the tensors every repo's weights hold
    local: Path  # model.safetensors of them on disk, to compare reports with


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Hub:
    served = Hub(tmp_path_factory.mktemp("hub"))
    with listening(served, _handler(served)):
        yield served


@pytest.fixture(scope="module")
def repos(hub: Hub) -> Repos:
    """The repos the stand-in Hub holds, written by torch.save and safetensors."""
    state = {f"encoder.layer.{i}.weight": torch.full((8, 4), float(i)) for i in range(6)}
    state["head.bias"] = torch.zeros(3, dtype=torch.float16)
    config = json.dumps({"architectures": ["TinyModel"], "model_type": "tiny"})
    for repo in ("org/safe", GATED):
        save_file(state, str(hub.repo(repo) / "model.safetensors"))
        (hub.repo(repo) / "config.json").write_text(config)
        (hub.repo(repo) / "README.md").write_text("# a tiny model\n")
    torch.save(state, hub.repo("org/torch") / "pytorch_model.bin")
    (hub.repo("org/torch") / "checkpoints").mkdir()
    (hub.repo("org/torch") / "config.json").write_text(config)
    torch.save({"epoch": 3, "state_dict": state}, hub.repo("org/torch") / "checkpoints" / "last.ckpt")
    names = list(state)
    weight_map = {}
    for shard, keys in enumerate((names[:4], names[4:])):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in keys}, str(hub.repo("org/sharded") / name))
        weight_map |= dict.fromkeys(keys, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (hub.repo("org/sharded") / "model.safetensors.index.json").write_text(json.dumps(index))
    (hub.repo("org/sharded") / "config.json").write_text(config)
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors"):  # a shard missing
        (hub.repo("org/broken") / name).write_bytes((hub.repo("org/sharded") / name).read_bytes())
    (hub.repo("org/docs-only") / "README.md").write_text("# no weights here\n")
    (hub.repo("org/docs-only") / "config.json").write_text(config)
    torch.save(state, hub.repo("org/two") / "a.pth")
    torch.save(state, hub.repo("org/two") / "b.pth")
    local = hub.root.parent / "local.safetensors"
    save_file(state, str(local))
    return Repos(state, local)


@pytest.fixture
def env(hub: Hub, repos: Repos, tmp_path: Path, monkeypatch) -> Path:
    """HF_ENDPOINT at the stand-in Hub, an empty Hub cache of the test's own: the cache folder."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    hub.reset()
    return cache


def download(hub: Hub, cache: Path, repo: str, *names: str) -> None:
    """huggingface_hub's own download into the test's cache (then the log is cleared)."""
    for name in names:
        hf_hub_download(repo, name, cache_dir=cache, endpoint=hub.endpoint, token=False)
    hub.reset()


def inspect_json(*args: str) -> dict:
    run = run_cli("inspect", *args, "--json")
    assert run.exit_code == 0, run
    return json.loads(run.stdout)


def tensors_of(doc: dict) -> list:
    return [(t["name"], t["shape"], t["dtype"]) for t in doc["tensors"]]


# -- a file named by its path ------------------------------------------------------------------


@pytest.mark.parametrize(
    "repo, path, local",
    [
        ("org/safe", "model.safetensors", "model.safetensors"),
        ("org/torch", "pytorch_model.bin", "pytorch_model.bin"),
        ("org/torch", "checkpoints/last.ckpt", "checkpoints/last.ckpt"),
        (f"org/safe@{COMMIT}", "model.safetensors", "model.safetensors"),
    ],
)
def test_a_path_is_read_from_its_resolve_url_as_an_https_url_is(hub, env, repo, path, local):
    folder = hub.root / repo.partition("@")[0]
    doc = inspect_json(f"hf://{repo}/{path}")
    url = doc["path"]
    revision = repo.partition("@")[2] or "main"
    assert url == f"{hub.endpoint}/{folder.relative_to(hub.root).as_posix()}/resolve/{revision}/{path}"
    here = json.loads(run_cli("inspect", folder / local, "--json").stdout)
    for key in ("path", "files", "remote", "hub"):
        doc.pop(key), here.pop(key)
    assert doc == here
    # the range reader's requests, and nothing else: no listing, no HEAD
    assert hub.log and all(r.path.startswith("GET ") and "/resolve/" in r.path for r in hub.log)
    assert all(r.range and r.status == 206 for r in hub.log)


def test_the_report_says_where_the_file_was_read_from(hub, env):
    run = run_cli("inspect", "hf://org/safe/model.safetensors")
    assert run.exit_code == 0, run
    assert (
        "  hub         hf://org/safe/model.safetensors: model.safetensors, read from the Hub, over HTTP"
        in (run.stdout)
    )
    assert "  fetched     " in run.stdout


# -- a repo: its files listed, its weights read ------------------------------------------------


@pytest.mark.parametrize(
    "repo, picked",
    [
        ("org/safe", "model.safetensors"),
        ("org/torch", "pytorch_model.bin"),
        ("org/sharded", "model.safetensors.index.json"),
        ("org/two@main", None),
    ],
)
def test_a_repo_lists_its_files_and_reads_its_weights(hub, env, repos, repo, picked):
    run = run_cli("inspect", f"hf://{repo}", "--json")
    if picked is None:  # two checkpoints, neither the model's weights: the user names one
        assert_clean_error(run, f"hf://{repo}", contains="2 checkpoint files and none is the model's weights")
        assert "hint: name one: hf://org/two/a.pth" in run.stderr
        return
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert sorted(tensors_of(doc)) == sorted(tensors_of(inspect_json(repos.local)))
    folder = hub.root / repo
    listed = {f["path"]: (f["size"], f["checkpoint"]) for f in doc["hub"]["files"]}
    on_disk = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert {path: size for path, (size, _) in listed.items()} == on_disk
    assert not listed["config.json"][1] and listed[picked][1]
    assert (doc["hub"]["file"], doc["hub"]["source"], doc["hub"]["revision"]) == (picked, "network", "main")
    assert hub.log[0].path.startswith(f"GET /api/models/{repo}/tree/main")
    page = run_cli("inspect", f"hf://{repo}").stdout
    others = sum(not checkpoint for _, checkpoint in listed.values())
    assert f"  {picked}  " in page and f"({others} other file" in page, page


# -- the local Hub cache, and offline ------------------------------------------------------------


def test_a_file_huggingface_hub_downloaded_is_read_from_the_cache_without_a_request(
    hub, env, repos, monkeypatch
):
    download(hub, env, "org/safe", "model.safetensors", "config.json")
    address = "hf://org/safe/model.safetensors"
    doc = inspect_json(address)
    assert hub.log == []
    assert doc["hub"]["source"] == "cache" and doc["remote"] is None
    cached = env / "models--org--safe" / "snapshots" / COMMIT / "model.safetensors"
    assert doc["path"] == str(cached)
    assert tensors_of(doc) == tensors_of(inspect_json(repos.local))

    # offline, with the path and without: the cached snapshot, still no request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tensors_of(inspect_json(address)) == tensors_of(doc)
    offline = inspect_json("hf://org/safe")
    assert [f["path"] for f in offline["hub"]["files"]] == ["config.json", "model.safetensors"]
    assert offline["hub"]["file"] == "model.safetensors" and hub.log == []


def test_an_index_is_read_from_the_cache_only_with_every_shard(hub, env, monkeypatch):
    download(hub, env, "org/sharded", "model.safetensors.index.json", "model-00001-of-00002.safetensors")
    doc = inspect_json("hf://org/sharded/model.safetensors.index.json")
    assert doc["hub"]["source"] == "network" and doc["num_tensors"] == 7  # a shard is missing: the Hub
    download(hub, env, "org/sharded", "model-00002-of-00002.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    doc = inspect_json("hf://org/sharded")
    assert doc["hub"]["source"] == "cache" and doc["format"] == "sharded" and doc["num_tensors"] == 7
    assert hub.log == []


def test_offline_a_file_not_cached_is_one_line_and_no_request(hub, env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for address, says in (
        ("hf://org/safe/model.safetensors", "not in the local Hub cache"),
        ("hf://org/safe", "revision main is not in the local Hub cache"),
    ):
        assert_clean_error(run_cli("inspect", address), address, contains=says, code=1)
    download_env = {"HF_HUB_OFFLINE": "1"}
    run = run_subprocess("inspect", "hf://org/safe/model.safetensors", env=download_env)
    assert_clean_error(run, "hf://org/safe/model.safetensors", contains="HF_HUB_OFFLINE=1", code=1)
    assert hub.log == []


# -- work that needs the tensors: downloaded into the Hub cache -----------------------------------


@pytest.mark.parametrize("repo", ["org/safe", "org/torch", "org/sharded"])
def test_convert_downloads_an_hf_address_into_the_hub_cache_and_then_reads_it_offline(
    hub, env, repos, tmp_path, monkeypatch, repo
):
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", f"hf://{repo}", "-o", str(out), "--json")
    assert run.exit_code == 0, run
    written = load_file(str(out))
    assert sorted(written) == sorted(repos.state)
    assert all(torch.equal(written[k], v) for k, v in repos.state.items())
    snapshot = env / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    assert json.loads(run.stdout)["source"].startswith(str(snapshot))  # the cached copy, kept
    weights = sorted(p.name for p in snapshot.iterdir() if p.name != "config.json")
    assert weights == sorted(
        {"org/safe": ["model.safetensors"], "org/torch": ["pytorch_model.bin"]}.get(
            repo,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ],
        )
    )

    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = tmp_path / "again.safetensors"
    assert run_cli("convert", f"hf://{repo}", "-o", str(again)).exit_code == 0
    assert hub.log == [] and load_file(str(again)).keys() == written.keys()


def test_a_model_repo_is_a_model_folder_once_cached(hub, env, repos, tmp_path):
    """Its config comes with its weights: `--format hf` writes a folder from_pretrained reads."""
    out = tmp_path / "folder"
    run = run_cli("convert", "hf://org/safe", "-o", str(out), "--format", "hf")
    assert run.exit_code == 0, run
    assert (out / "config.json").read_text() == (hub.repo("org/safe") / "config.json").read_text()
    assert sorted(load_file(str(out / "model.safetensors"))) == sorted(repos.state)
    doc = inspect_json("hf://org/safe")  # cached now: the folder, with its config
    assert doc["hub"]["source"] == "cache" and doc["metadata"]["hf_config"]["architectures"] == ["TinyModel"]
    assert (
        inspect_json("hf://org/safe/model.safetensors")["metadata"].get("hf_config") is None
    )  # a file named


def test_a_hub_download_with_no_room_is_refused_before_it_starts(hub, env, tmp_path, monkeypatch):
    from test_download import no_room

    no_room(monkeypatch)
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", "hf://org/torch", "-o", str(out))
    assert_clean_error(run, "hf://org/torch@main", contains=f"in {env}, which has 1000 B free", code=1)
    assert "hint: set HF_HUB_CACHE" in run.stderr and not out.exists()
    assert not list(env.glob("models--org--torch/blobs/*"))


def test_inspect_download_of_an_hf_address_fills_the_cache_and_verifies(hub, env):
    doc = inspect_json("hf://org/torch", "--download", "--verify")
    assert doc["download"]["to"] == "the Hub cache" and doc["download"]["bytes"] > 0
    assert doc["hub"]["source"] == "cache" and doc["metadata"]["crc_checked"] == "every storage"
    assert inspect_json("hf://org/torch", "--download")["download"]["bytes"] == 0  # all cached now


def test_a_dataset_repo_is_read_and_downloaded_as_a_model_repo_is(hub, env, repos, tmp_path):
    """hf://datasets/ORG/NAME: huggingface_hub's repo_type, its cache folder `datasets--ORG--NAME`."""
    save_file(repos.state, str(hub.repo("datasets/org/ckpts") / "run-3.safetensors"))
    doc = inspect_json("hf://datasets/org/ckpts/run-3.safetensors")
    assert doc["hub"]["repo_type"] == "dataset" and doc["hub"]["source"] == "network"
    assert tensors_of(doc) == tensors_of(inspect_json(repos.local))
    assert inspect_json("hf://datasets/org/ckpts")["hub"]["file"] == "run-3.safetensors"  # its one checkpoint
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", "hf://datasets/org/ckpts/run-3.safetensors", "-o", str(out))
    assert run.exit_code == 0, run
    assert sorted(load_file(str(out))) == sorted(repos.state)
    assert (env / "datasets--org--ckpts" / "snapshots" / COMMIT / "run-3.safetensors").is_file()
    hub.reset()
    cached = inspect_json("hf://datasets/org/ckpts/run-3.safetensors")
    assert cached["hub"]["source"] == "cache" and hub.log == []
    missing = "hf://datasets/org/none/x.safetensors"
    assert_clean_error(run_cli("inspect", missing), missing, contains="repository org/none not found", code=1)


def test_scan_of_a_repo_judges_every_checkpoint_in_it(hub, env, repos, tmp_path):
    """As picklescan's --huggingface: each checkpoint file (an index for its shards), by headers."""
    canary = tmp_path / CANARY
    repo = hub.repo("org/mixed")
    torch.save(repos.state, repo / "a.pth")
    (repo / "checkpoints").mkdir(exist_ok=True)
    torch.save({"w": torch.ones(2), "hook": RunsCommand(f"touch {canary}")}, repo / "checkpoints" / "b.ckpt")
    (repo / "README.md").write_text("# not a checkpoint\n")
    for name in (
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ):
        (repo / name).write_bytes((hub.repo("org/sharded") / name).read_bytes())
    run = run_cli("scan", "hf://org/mixed", "--json")
    assert run.exit_code == 1, run
    verdicts = {r["path"]: r["verdict"] for r in json.loads(run.stdout)["checkpoints"]}
    assert verdicts == {
        "hf://org/mixed/a.pth": "safe",
        "hf://org/mixed/checkpoints/b.ckpt": "danger",
        "hf://org/mixed/model.safetensors.index.json": "safe",
    }
    assert all(r.range for r in hub.log if "/resolve/" in r.path and r.path.startswith("GET")), "a whole file"
    assert not canary.exists()
    folder = json.loads(run_cli("scan", "hf://org/mixed/checkpoints", "--json").stdout)["checkpoints"]
    assert [r["path"] for r in folder] == ["hf://org/mixed/checkpoints/b.ckpt"]
    nothing = json.loads(run_cli("scan", "hf://org/docs-only", "--json").stdout)["checkpoints"]
    assert [(r["verdict"], "no checkpoint file" in r["error"]) for r in nothing] == [("error", True)]


def test_port_of_an_hf_address_records_it(hub, env, repos, tmp_path):
    out = tmp_path / "out.safetensors"
    address = "hf://org/torch/checkpoints/last.ckpt"
    run = run_cli("port", address, "--to", str(repos.local), "-o", str(out))
    assert run.exit_code == 0, run
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        files = json.loads(f.metadata()["surgery.source_files"])
    cached = hub.root / "org" / "torch" / "checkpoints" / "last.ckpt"  # what the Hub served
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    assert files == [{"path": "hf://org/torch@main/checkpoints/last.ckpt", "sha256": digest}]


def test_a_dangerous_pickle_in_a_repo_is_refused_before_the_download(hub, env, tmp_path):
    canary = tmp_path / CANARY
    torch.save(
        {"w": torch.ones(1 << 18), "hook": RunsCommand(f"touch {canary}")},
        hub.repo("org/evil2") / "pytorch_model.bin",
    )
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", "hf://org/evil2", "-o", str(out))
    resolve = f"{hub.endpoint}/org/evil2/resolve/main/pytorch_model.bin"  # judged over HTTP
    assert_clean_error(run, resolve, contains="not safe to load (danger", code=1)
    assert not out.exists() and not canary.exists()
    assert not list(env.glob("models--org--evil2/blobs/*")), "downloaded although refused"


def test_merge_takes_a_lora_adapter_from_the_hub(hub, env, repos, tmp_path):
    """Its config and weights downloaded into the Hub cache (not its README), then merged as from a folder."""
    folder = hub.repo("org/lora") / "run-1"
    folder.mkdir(exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layer.0"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("# not asked for\n")
    a, b = torch.arange(8.0).reshape(2, 4), torch.ones(8, 2)
    save_file(
        {
            "base_model.model.encoder.layer.0.lora_A.weight": a,
            "base_model.model.encoder.layer.0.lora_B.weight": b,
        },
        str(folder / "adapter_model.safetensors"),
    )
    out = tmp_path / "merged.safetensors"
    run = run_cli("merge", "hf://org/safe", "--adapter", "hf://org/lora/run-1", "-o", str(out))
    assert run.exit_code == 0, run
    merged = load_file(str(out))
    expected = repos.state["encoder.layer.0.weight"] + (4 / 2) * (b @ a)
    assert torch.allclose(merged["encoder.layer.0.weight"], expected)
    assert torch.equal(merged["encoder.layer.1.weight"], repos.state["encoder.layer.1.weight"])
    cached = sorted(p.name for p in (env / "models--org--lora" / "snapshots" / COMMIT / "run-1").iterdir())
    assert cached == ["adapter_config.json", "adapter_model.safetensors"]
    missing = "hf://org/lora/nowhere"
    assert_clean_error(
        run_cli("merge", "hf://org/safe", "--adapter", missing, "-o", str(tmp_path / "x.safetensors")),
        missing,
        contains="holds none of adapter_config.json",
        code=1,
    )


# -- nothing fetched is run ------------------------------------------------------------------------


def test_a_malicious_pickle_in_a_repo_is_the_danger_it_is_on_disk_and_never_runs(hub, env, tmp_path):
    canary = tmp_path / CANARY
    evil = hub.repo("org/evil")
    torch.save({"weight": torch.ones(3), "hook": RunsCommand(f"touch {canary}")}, evil / "pytorch_model.bin")
    torch.load(evil / "pytorch_model.bin", weights_only=False)
    assert canary.exists(), "torch.load did not run the payload: the test proves nothing"
    canary.unlink()

    run = run_subprocess("inspect", "hf://org/evil")
    line = assert_clean_error(run, "hf://org/evil", code=1)
    assert "not safe to load: danger" in line and "danger: global posix.system" in run.stdout
    download(hub, env, "org/evil", "pytorch_model.bin")
    cached = run_cli("inspect", "hf://org/evil/pytorch_model.bin")
    assert cached.exit_code == 1 and "danger: global posix.system" in cached.stdout
    assert not canary.exists(), "the payload ran"


# -- access, and failures: one line, non-zero exit ----------------------------------------------------


def test_hf_token_is_sent_for_a_gated_repo(hub, env, monkeypatch, repos):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    doc = inspect_json("hf://org/gated")
    assert tensors_of(doc) == tensors_of(inspect_json(repos.local))
    sent = [(r.path.split("/")[1], r.status, auth) for r, auth in zip(hub.log, hub.auth, strict=True)]
    # the listing and the resolve URL with the token; the CDN it redirects to without it
    assert sent == [
        ("api", 200, f"Bearer {TOKEN}"),
        ("org", 302, f"Bearer {TOKEN}"),
        ("cdn", 206, None),
    ], sent


@pytest.mark.parametrize(
    "address, says, code",
    [
        ("hf://org/missing", "repository org/missing not found (HTTP 401)", 1),
        ("hf://org/missing/model.safetensors", "repository org/missing not found (HTTP 401)", 1),
        ("hf://org/gated", "org/gated is gated: access refused (HTTP 401)", 1),
        ("hf://org/gated/model.safetensors", "org/gated is gated: access refused (HTTP 401)", 1),
        ("hf://org/safe@v9", "revision v9 not found in org/safe (HTTP 404)", 1),
        ("hf://org/safe@v9/model.safetensors", "revision v9 not found in org/safe (HTTP 404)", 1),
        (
            "hf://org/safe/missing.safetensors",
            "no file missing.safetensors in org/safe at main (HTTP 404)",
            1,
        ),
        ("hf://org/broken", "no file model-00002-of-00002.safetensors in org/broken at main (HTTP 404)", 1),
        ("hf://org/docs-only", "no checkpoint file in the repo (2 files: README.md, config.json)", 1),
        ("hf://org", "not a Hub address: hf://ORG/REPO[@REVISION][/PATH]", 2),
        ("hf://org/safe@", "not a Hub address", 2),
        ("hf://org/safe/../other/model.bin", "lies outside the folder", 2),
    ],
)
def test_a_failure_is_one_line_and_a_non_zero_exit(hub, env, address, says, code):
    assert_clean_error(run_cli("inspect", address), address, contains=says, code=code)


def test_a_failure_in_a_new_process_is_one_line_too(hub, env):
    run = run_subprocess("inspect", "hf://org/gated/model.safetensors")
    assert_clean_error(run, "hf://org/gated/model.safetensors", contains="is gated", code=1)
    assert "HF_TOKEN" in run.stderr  # the hint


def test_huggingface_hub_is_imported_for_hf_addresses_only_and_torch_never(hub, env, repos):
    code = (
        "import sys, surgery\n"
        "surgery.open_checkpoint(sys.argv[1]); print('torch' in sys.modules, 'huggingface_hub' in sys.modules)\n"
    )
    for path, expected in (("hf://org/safe/model.safetensors", "False True"), (repos.local, "False False")):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected, (path, proc.stdout)


def test_without_huggingface_hub_an_hf_address_is_one_line_with_the_extra_to_install(hub, env):
    code = (
        "import sys; sys.modules['huggingface_hub'] = None  # as if not installed\n"
        "sys.argv = ['surgery', 'inspect', 'hf://org/safe']\n"
        "from surgery.cli import run; run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    run = Run(proc.returncode, proc.stdout, proc.stderr)
    assert_clean_error(run, "hf://org/safe", contains="reading the Hub needs huggingface_hub", code=2)
    assert 'pip install "surgery[hub]"' in run.stderr and hub.log == []


# -- the examples of the docs ---------------------------------------------------------------------

DOC_ENDPOINT = "http://127.0.0.1:8000"
DOC_CACHE = "~/.cache/huggingface/hub"
DOC_EXAMPLES = [
    text
    for lang, text in fenced(DOCS / "remote.md")
    if lang == "text" and " surgery inspect hf://" in text.partition("\n")[0]
]


def test_the_docs_have_hub_examples():
    assert len(DOC_EXAMPLES) >= 3


@pytest.mark.parametrize("block", DOC_EXAMPLES, ids=[str(i) for i in range(len(DOC_EXAMPLES))])
def test_the_hub_examples_of_the_docs_print_what_they_show(hub, env, repos, monkeypatch, block):
    """Each block runs on its own: the cache holds what `hf_hub_download` fetched for it first
    (model.safetensors of org/safe, for the examples that say HF_HUB_OFFLINE=1)."""
    command, _, shown = block.partition("\n")
    words = shlex.split(command.removeprefix("$ "))
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    if os.environ.get("HF_HUB_OFFLINE"):
        download(hub, env, "org/safe", "model.safetensors", "config.json")
    assert words[0] == "surgery"
    run = run_cli(*words[1:])
    printed = (run.stdout + run.stderr).replace(hub.endpoint, DOC_ENDPOINT).replace(str(env), DOC_CACHE)
    assert printed == shown, f"remote.md shows:\n{shown}\nthe run printed:\n{printed}"
