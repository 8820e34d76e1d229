"""Remote checkpoints downloaded for the work that needs their tensor bytes.

`port`, `convert`, `diff`, `merge` and `extract` given a URL read its headers by ranges and judge
them (a dangerous file is refused before its tensor bytes are fetched), then download it into a
temporary folder and work on the copy, which is removed when done: the output is the one the
local file gives. `inspect --download` reads a copy too (for --verify, or a server that ignores
Range). A real HTTP server (tests/test_remote.py's, with its ways to fail) serves real files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_remote import CANARY, RunsCommand, Server, _handler, listening

import surgery
from surgery.formats import download, remote


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_resnet18) -> Server:
    """resnet18 as a torch zip, a safetensors file and an index of 3 shards, served."""
    served = Server(tmp_path_factory.mktemp("served"))
    shutil.copy(seeded_resnet18.plain, served.root / "resnet18.pth")
    shutil.copy(seeded_resnet18.safetensors, served.root / "resnet18.safetensors")
    state, names = seeded_resnet18.state, list(seeded_resnet18.state)
    (served.root / "sharded").mkdir()
    weight_map = {}
    for shard, part in enumerate((names[:40], names[40:80], names[80:])):
        name = f"model-{shard + 1:05d}-of-00003.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(served.root / "sharded" / name))
        weight_map |= dict.fromkeys(part, name)
    (served.root / "sharded" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    with listening(served, _handler(served)):
        yield served


@pytest.fixture
def served(server: Server) -> Server:
    server.reset()
    return server


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch) -> Path:
    """TMPDIR of the test's own; nothing may be left in it once the work is done."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(remote, "BACKOFF", 0.001)
    yield folder
    gc.collect()
    assert list(folder.iterdir()) == [], "a download was left behind"


def downloads(server: Server) -> list:
    """The requests that asked for a whole file (no Range) or the rest of one (`bytes=N-`)."""
    return [r for r in server.log if r.range is None or r.range.endswith("-")]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the work a local file gets, from a URL ------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["resnet18.pth", "resnet18.safetensors", "sharded/model.safetensors.index.json"]
)
def test_convert_of_a_url_writes_what_converting_the_file_writes(served, tmp_path, name):
    local, url = tmp_path / "local.safetensors", tmp_path / "url.safetensors"
    assert run_cli("convert", str(served.root / name), "-o", str(local)).exit_code == 0
    served.reset()
    run = run_cli("convert", served.url(name), "-o", str(url), "--json")
    assert run.exit_code == 0, run
    assert_same_tensors(tensors(url), tensors(local))
    assert json.loads(run.stdout)["source"] == served.url(name)
    files = [served.root / name]
    if name.startswith("sharded"):
        files += sorted((served.root / "sharded").glob("*.safetensors"))
    # Headers first (ranges), then each file once, whole.
    assert sorted(r.path for r in downloads(served)) == sorted(
        f"/{f.relative_to(served.root)}" for f in files
    )


def test_port_of_a_url_records_the_url_and_the_digest_of_what_it_read(served, tmp_path):
    out = tmp_path / "out.safetensors"
    url = served.url("resnet18.pth")
    run = run_cli("port", url, "--to", "torchvision:resnet18", "-o", str(out))
    assert run.exit_code == 0, run
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    digest = hashlib.sha256((served.root / "resnet18.pth").read_bytes()).hexdigest()
    assert meta["surgery.source"] == url
    assert json.loads(meta["surgery.source_files"]) == [{"path": url, "sha256": digest}]
    local = tmp_path / "local.safetensors"
    assert (
        run_cli(
            "port", str(served.root / "resnet18.pth"), "--to", "torchvision:resnet18", "-o", str(local)
        ).exit_code
        == 0
    )
    assert_same_tensors(tensors(out), tensors(local))


def test_a_dry_run_port_of_a_url_reads_its_headers_only(served):
    url = served.url("resnet18.pth")
    run = run_cli("port", url, "--to", "torchvision:resnet18", "--dry-run", "--json")
    assert run.exit_code == 0, run
    assert len(json.loads(run.stdout)["matched"]) == 122
    assert downloads(served) == []
    assert served.sent() < 0.05 * (served.root / "resnet18.pth").stat().st_size


def test_a_dry_run_port_of_a_file_no_range_reads_downloads_it(served):
    """Its headers cannot be read by ranges: the copy's are (inspect alone refuses without --download)."""
    run = run_cli("port", served.url("resnet18.pth", "norange"), "--to", "torchvision:resnet18", "--dry-run")
    assert run.exit_code == 0, run
    assert [r.range for r in served.log] == [f"bytes=0-{remote.HEAD - 1}", None]


@pytest.mark.parametrize("sides", ["url-file", "url-url"])
def test_diff_compares_the_values_of_a_url(served, sides):
    a = served.url("resnet18.pth")
    b = (
        served.url("resnet18.safetensors")
        if sides == "url-url"
        else str(served.root / "resnet18.safetensors")
    )
    run = run_cli("diff", a, b, "--json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert doc["identical"] == 122 and doc["differences"] == [], doc


def test_merge_and_extract_read_urls(served, tmp_path):
    a, b = served.url("resnet18.pth"), served.url("resnet18.safetensors")
    root = served.root
    merged, local = tmp_path / "mean.safetensors", tmp_path / "local.safetensors"
    assert run_cli("merge", a, b, "-o", str(merged)).exit_code == 0
    assert (
        run_cli(
            "merge", str(root / "resnet18.pth"), str(root / "resnet18.safetensors"), "-o", str(local)
        ).exit_code
        == 0
    )
    assert_same_tensors(tensors(merged), tensors(local))

    # A fine-tune of rank 1 in fc, extracted from two URLs, merges back into its base.
    state = tensors(root / "resnet18.safetensors")
    tuned = dict(state, **{"fc.weight": state["fc.weight"] + torch.outer(torch.ones(1000), torch.ones(512))})
    save_file(tuned, str(root / "tuned.safetensors"))
    adapter, back = tmp_path / "adapter", tmp_path / "back.safetensors"
    run = run_cli("extract", served.url("tuned.safetensors"), "--base", b, "--rank", "1", "-o", str(adapter))
    assert run.exit_code == 0, run
    assert (
        run_cli(
            "merge", str(root / "resnet18.safetensors"), "--adapter", str(adapter), "-o", str(back)
        ).exit_code
        == 0
    )
    assert (
        tensors(back)["fc.weight"] - tuned["fc.weight"]
    ).abs().max() < 1e-3  # float32 SVD of a 1000 x 512 change of 1.0


# -- safety: judged before the bytes come, and again from them ----------------------------------


@pytest.mark.parametrize("command", ["convert", "port"])
def test_a_dangerous_pickle_is_refused_before_its_tensor_bytes_are_downloaded(served, tmp_path, command):
    canary = tmp_path / CANARY
    name = f"payload-{command}.pth"
    torch.save({"weight": torch.ones(1 << 20), "hook": RunsCommand(f"touch {canary}")}, served.root / name)
    url, out = served.url(name), tmp_path / "out.safetensors"
    args = ["--to", "torchvision:resnet18"] if command == "port" else []
    run = run_cli(command, url, *args, "-o", str(out))
    assert_clean_error(run, url, contains="not safe to load (danger", code=1)
    assert downloads(served) == [] and served.sent() < 0.1 * (served.root / name).stat().st_size
    assert not out.exists() and not canary.exists()


def test_with_trust_a_dangerous_pickle_is_downloaded_and_its_tensors_read_never_run(served, tmp_path):
    canary = tmp_path / CANARY
    torch.save(
        {"weight": torch.arange(6.0), "hook": RunsCommand(f"touch {canary}")}, served.root / "trusted.pth"
    )
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", served.url("trusted.pth"), "-o", str(out), "--trust")
    assert run.exit_code == 0, run
    assert torch.equal(tensors(out)["weight"], torch.arange(6.0))
    assert not canary.exists()


def test_a_file_changed_on_the_server_after_its_headers_were_read_is_refused(served, tmp_path):
    """Judged from one version and used as another: no (the `swap` server gives another file to a
    download than to range requests)."""
    shutil.copy(served.root / "resnet18.safetensors", served.root / "changed.safetensors")
    save_file({"other": torch.zeros(3)}, str(served.root / "changed.safetensors.swap"))
    url, out = served.url("changed.safetensors", "swap"), tmp_path / "out.safetensors"
    run = run_cli("convert", url, "-o", str(out))
    assert_clean_error(run, url, contains="changed on the server while downloaded", code=1)
    assert not out.exists()


# -- the transfer: resumed, retried, refused in one line -----------------------------------------


def test_a_download_cut_short_is_resumed_where_it_broke_off(served, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", served.url("resnet18.safetensors", "dropsonce"), "-o", str(out))
    assert run.exit_code == 0, run
    assert_same_tensors(tensors(out), tensors(served.root / "resnet18.safetensors"))
    whole, rest = downloads(served)
    size = (served.root / "resnet18.safetensors").stat().st_size
    assert whole.range is None and 0 < whole.sent < size
    resumed_at = int(rest.range.removeprefix("bytes=").removesuffix("-"))  # what reached the file
    assert 0 < resumed_at <= whole.sent and rest.status == 206 and resumed_at + rest.sent == size


def test_a_download_that_keeps_breaking_is_one_line_and_leaves_nothing(served, tmp_path):
    url, out = served.url("resnet18.safetensors", "dropsalways"), tmp_path / "out.safetensors"
    run = run_cli("convert", url, "-o", str(out))
    assert_clean_error(run, url, contains="ended early", code=1)
    assert "(after 4 tries)" in run.stderr and not out.exists()


def test_a_server_ignoring_range_is_downloaded_by_work_that_needs_the_bytes(served, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", served.url("resnet18.pth", "norange"), "-o", str(out))
    assert run.exit_code == 0, run
    expected = load_file(str(served.root / "resnet18.safetensors"))
    assert sorted(tensors(out)) == sorted(expected)
    assert all(torch.equal(tensors(out)[k], v) for k, v in expected.items())
    # The first range asked was answered with the whole file (refused at its headers); then the
    # download, judged from the copy.
    assert [r.range for r in served.log] == [f"bytes=0-{remote.HEAD - 1}", None]


def no_room(monkeypatch, free: int = 1000) -> None:
    """The disk where downloads go has `free` bytes left (as `shutil.disk_usage` says)."""
    monkeypatch.setattr(
        download.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free)
    )


@pytest.mark.parametrize("variant", [None, "norange"])
def test_a_download_with_no_room_is_refused_before_it_is_written(
    served, tmp_path, monkeypatch, scratch, variant
):
    """Refused before a request for the file when its headers told its size; else at its answer's."""
    no_room(monkeypatch)
    url, out = served.url("resnet18.safetensors", variant), tmp_path / "out.safetensors"
    run = run_cli("convert", url, "-o", str(out))
    line = assert_clean_error(run, url, contains=f"downloading it needs 44.6 MiB in {scratch}, which", code=1)
    assert "which has 1000 B free" in line and "hint: set TMPDIR" in run.stderr
    assert not out.exists()
    assert downloads(served) == ([] if variant is None else [served.log[-1]])


def test_a_command_in_a_new_process_leaves_no_download_behind(served, tmp_path, scratch):
    out = tmp_path / "out.safetensors"
    run = run_subprocess(
        "convert", served.url("resnet18.safetensors"), "-o", str(out), env={"TMPDIR": str(scratch)}
    )
    assert run.exit_code == 0, run
    assert run.stderr == ""  # no bar off a terminal
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("output", ["convert", "port"])
def test_sigterm_during_a_download_or_the_work_after_it_leaves_nothing(served, tmp_path, scratch, output):
    """The process ends as killed by SIGTERM (finalizers do not run then): the copy goes first."""
    out = tmp_path / "out.safetensors"
    args = ["--to", "torchvision:resnet18"] if output == "port" else []
    argv = [sys.executable, "-m", "surgery", output, served.url("resnet18.safetensors", "trickle"), *args]
    proc = subprocess.Popen(
        [*argv, "-o", str(out)], env={**os.environ, "TMPDIR": str(scratch)}, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 1 << 20 for p in scratch.rglob("*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "the download did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM
    assert list(scratch.iterdir()) == [] and not out.exists()


def test_sigterm_while_an_output_is_written_removes_the_output_then_the_copy(served, tmp_path, scratch):
    """The writer's handler (its temporary output) runs first, then the copies go, then the process
    ends as killed: the two handlers chain."""
    code = (
        "import os, signal, sys, surgery\n"
        "from pathlib import Path\n"
        "from surgery.writers.outputs import _on_sigterm\n"
        "ckpt = surgery.open_checkpoint(sys.argv[1], download=True)\n"
        "with _on_sigterm(lambda: Path(sys.argv[2]).write_text('cleaned')):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('not reached')\n"
    )
    marker = tmp_path / "marker"
    argv = [sys.executable, "-c", code, served.url("resnet18.safetensors"), str(marker)]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert marker.read_text() == "cleaned" and "not reached" not in proc.stdout
    assert list(scratch.iterdir()) == []


# -- inspect --download and the library ----------------------------------------------------------


def test_inspect_download_reads_the_copy_and_verifies_it(served):
    name = "resnet18.pth"
    local = json.loads(run_cli("inspect", str(served.root / name), "--json", "--verify").stdout)
    run = run_cli("inspect", served.url(name, "norange"), "--download", "--verify", "--json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    size = (served.root / name).stat().st_size
    assert doc["download"] == {
        "address": served.url(name, "norange"),
        "files": 1,
        "bytes": size,
        "seconds": doc["download"]["seconds"],
        "to": "a temporary folder",
    }
    assert doc["remote"] is None and doc["path"] == served.url(name, "norange")
    assert (
        doc["tensors"] == local["tensors"]
        and doc["metadata"]["crc_checked"] == local["metadata"]["crc_checked"]
    )
    page = run_cli("inspect", served.url(name), "--download")
    assert page.exit_code == 0 and "downloaded" in page.stdout and "to a temporary folder" in page.stdout


def test_a_dangerous_pickle_downloaded_is_the_danger_it_is_and_never_runs(served, tmp_path):
    canary = tmp_path / CANARY
    torch.save({"w": torch.ones(2), "hook": RunsCommand(f"touch {canary}")}, served.root / "inspected.pth")
    url = served.url("inspected.pth")
    run = run_cli("inspect", url, "--download")
    line = assert_clean_error(run, url, contains="not safe to load: danger", code=1)
    assert "system" in line and "surgery-download" not in run.stdout + run.stderr
    assert f"[{url}: data.pkl byte" in run.stdout  # the finding names the URL, not the copy
    assert not canary.exists()


def test_the_library_reads_tensors_of_a_downloaded_url_and_hears_its_progress(served, scratch):
    heard: list[tuple[str, int]] = []
    ticks: list[int] = []

    def show(name: str, total: int):
        heard.append((name, total))
        return ticks.append

    with download.showing(show):
        ckpt = surgery.open_checkpoint(served.url("resnet18.safetensors"), download=True)
    size = (served.root / "resnet18.safetensors").stat().st_size
    assert heard == [("resnet18.safetensors", size)] and sum(ticks) == size
    assert_same_tensors(ckpt.state_dict(), dict(load_file(str(served.root / "resnet18.safetensors"))))
    assert str(ckpt.path) == served.url("resnet18.safetensors") and len(list(scratch.iterdir())) == 1
    del ckpt
    gc.collect()
    assert list(scratch.iterdir()) == []  # the copy goes with the checkpoint


def test_without_download_a_remote_checkpoints_tensors_are_refused_in_one_line(served):
    ckpt = surgery.open_checkpoint(served.url("resnet18.safetensors"))
    with pytest.raises(remote.NeedsDownload, match="needs a download") as refused:
        ckpt.tensor(ckpt.tensors[0].name)
    assert "download=True" in refused.value.hint
    assert downloads(served) == []


def test_converting_a_local_file_loads_none_of_the_remote_machinery(seeded_resnet18, tmp_path):
    """Start-up counts for local work: no httpx, no range reader, no downloader."""
    code = (
        "import sys, surgery\n"
        "surgery.convert(sys.argv[1], sys.argv[2])\n"
        "print(sorted(m for m in ('httpx', 'surgery.formats.remote', 'surgery.formats.download') if m in sys.modules))\n"
    )
    argv = [sys.executable, "-c", code, str(seeded_resnet18.safetensors), str(tmp_path / "out.safetensors")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
