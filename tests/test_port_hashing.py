"""`surgery port` and its source's bytes: the provenance's sha256 of every source file is
computed by a background thread while the target is built and loaded
(`commands.port_files.SourceDigests`), a template target is written by copying byte ranges as
they lie, and `--verify` compares each tensor once with the bytes it was written from.

What must hold: the recorded digest is the file's own (`sha256sum`), for one file and for
every shard; a read that fails while hashing is a clean error with nothing written, and a
refused port stops the hashing; a source changed while it is ported is refused; `--verify`
still catches a corrupted write and a source changed under it; a port into a template
imports no torch at all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_clean_error, run_cli, run_subprocess

import surgery
from surgery import writers
from surgery.commands import port_files as port_command
from surgery.models import loading

LINEAR = "torch.nn:Linear?in_features=600&out_features=700"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A torch zip source of 1.7 MB (more than one hashing chunk, not a multiple of one), a
    safetensors template with the same keys and other values, and the source as two shards."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hashing")
    torch.manual_seed(0)
    state = {"weight": torch.randn(700, 600), "bias": torch.randn(700)}
    torch.save(state, folder / "src.pth")
    save_file({k: torch.randn_like(v) for k, v in state.items()}, folder / "template.safetensors")
    save_file({k: v.double() for k, v in state.items()}, folder / "template64.safetensors")
    sharded = folder / "sharded"
    sharded.mkdir()
    save_file({"weight": state["weight"]}, sharded / SHARDS[0])
    save_file({"bias": state["bias"]}, sharded / SHARDS[1])
    index = {"metadata": {}, "weight_map": {"weight": SHARDS[0], "bias": SHARDS[1]}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert (folder / "src.pth").stat().st_size > port_command.SourceDigests.CHUNK
    return SimpleNamespace(
        folder=folder,
        src=folder / "src.pth",
        template=folder / "template.safetensors",
        template64=folder / "template64.safetensors",
        sharded=sharded,
        state=state,
    )


def sha256sum(path: Path) -> str:
    """The digest as `sha256sum` prints it (hashlib where the tool is missing)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if shutil.which("sha256sum"):
        printed = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
        assert printed.stdout.split()[0] == digest
    return digest


def provenance(out: Path) -> dict[str, str]:
    if out.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(out, "pt") as f:
            return f.metadata()
    with zipfile.ZipFile(out) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/.data/surgery.json"))
        return json.loads(zf.read(member))


def recorded(out: Path) -> dict[str, str]:
    """path -> sha256 from the output's `surgery.source_files`."""
    return {e["path"]: e["sha256"] for e in json.loads(provenance(out)["surgery.source_files"])}


def written(out: Path) -> dict:
    import torch

    if out.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(out)
    return torch.load(out, weights_only=True)


def nothing_written(folder: Path, *kept: str) -> None:
    """No output and no temporary file: the folder holds only what it held."""
    assert sorted(os.listdir(folder)) == sorted(kept)


def hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "surgery-sha256"]


def copy_source(files: SimpleNamespace, folder: Path) -> Path:
    src = folder / "src.pth"
    shutil.copyfile(files.src, src)
    return src


# -- the digest is the file's ---------------------------------------------------
@pytest.mark.parametrize("to", ["template", "built"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_recorded_digest_is_the_sha256sum_of_the_source(files, tmp_path, to, suffix):
    out = tmp_path / f"out{suffix}"
    run = run_cli("port", files.src, "--to", files.template if to == "template" else LINEAR, "-o", out)
    assert run.exit_code == 0, run
    assert recorded(out) == {str(files.src.resolve()): sha256sum(files.src)}
    got = written(out)
    assert all(got[k].equal(v) for k, v in files.state.items())


def test_every_shard_of_a_sharded_source_is_hashed_whole(files, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli("port", files.sharded, "--to", files.template, "-o", out, "--verify")
    assert run.exit_code == 0, run
    every = [files.sharded / "model.safetensors.index.json", *(files.sharded / s for s in SHARDS)]
    assert recorded(out) == {str(p.resolve()): sha256sum(p) for p in every}


def test_a_cast_into_a_template_records_the_digest_and_verifies(files, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli("port", files.src, "--to", files.template64, "-o", out, "--verify")
    assert run.exit_code == 0, run
    assert "2 tensors bit-identical" in run.stdout
    assert recorded(out) == {str(files.src.resolve()): sha256sum(files.src)}
    got = written(out)
    assert all(got[k].equal(v.double()) for k, v in files.state.items())


# -- failures while hashing -----------------------------------------------------
def test_a_read_failing_while_hashing_is_a_clean_error_and_writes_nothing(files, tmp_path, monkeypatch):
    real = port_command._sha256
    failing = files.sharded / SHARDS[1]

    def read_fails(path, stop, chunk):
        if Path(path) == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(path, stop, chunk)

    monkeypatch.setattr(port_command, "_sha256", read_fails)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for to in (files.template, LINEAR):
        run = run_cli("port", files.sharded, "--to", to, "-o", out_dir / "out.safetensors", "--verify")
        assert_clean_error(
            run, failing, contains="cannot read the file to hash it: Input/output error", code=1
        )
        nothing_written(out_dir)
        assert not hashing_threads()


def test_a_refused_port_stops_its_hashing(files, monkeypatch):
    seen: list[bool] = []

    def slow(path, stop, chunk):  # a file that takes long to read: waits until told to stop
        seen.append(stop.wait(timeout=60))
        return None

    monkeypatch.setattr(port_command, "_sha256", slow)
    request = surgery.PortRequest(str(files.src), LINEAR.replace("700", "701"), out="unused.safetensors")
    with pytest.raises(surgery.PortFailed):  # strict, and the shapes differ
        surgery.port_file(request)
    assert seen == [True]  # stopped, not timed out
    assert not hashing_threads()


def test_hashing_stopped_before_the_end_is_never_a_missing_digest(files):
    digests = port_command.SourceDigests([files.src])
    digests.close()
    try:
        result = digests.result()
    except surgery.SurgeryError as exc:
        assert "hashing stopped before the end" in str(exc)
    else:  # it finished before it was told to stop
        assert result == {files.src: sha256sum(files.src)}


# -- a source that changes while it is ported -------------------------------------
def change_source_after_first_tensor(monkeypatch, ckpt_path: Path, *, keep_mtime: bool) -> None:
    """Once the first tensor is written, flip a byte of its bytes in the source file."""
    ranges = surgery.open_checkpoint(ckpt_path)
    real = loading.Output.release
    done: list[str] = []

    def release(self, name):
        real(self, name)
        if done:
            return
        done.append(name)
        path, offset, _ = ranges.byte_range(name)
        before = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        if keep_mtime:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    monkeypatch.setattr(loading.Output, "release", release)


@pytest.mark.parametrize("to", ["template", "built"])
def test_a_source_changed_while_ported_is_refused(files, tmp_path, monkeypatch, to):
    src = copy_source(files, tmp_path)
    change_source_after_first_tensor(monkeypatch, src, keep_mtime=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = run_cli("port", src, "--to", files.template if to == "template" else LINEAR, "-o", out_dir / "o.pt")
    assert_clean_error(run, src, contains="the file changed while it was ported", code=1)
    nothing_written(out_dir)


@pytest.mark.parametrize("to", ["template", "built"])
def test_verify_catches_a_source_changed_under_it_with_its_time_kept(files, tmp_path, monkeypatch, to):
    src = copy_source(files, tmp_path)
    change_source_after_first_tensor(monkeypatch, src, keep_mtime=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = files.template if to == "template" else LINEAR
    run = run_cli("port", src, "--to", target, "-o", out_dir / "o.safetensors", "--verify")
    error = assert_clean_error(run, out_dir / "o.safetensors", contains="verify: tensor", code=1)
    assert "differs from its source" in error
    nothing_written(out_dir)


# -- verify and the writer --------------------------------------------------------
@pytest.mark.parametrize("to", ["template", "built"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_verify_catches_a_byte_the_writer_got_wrong(files, tmp_path, monkeypatch, to, suffix):
    real = writers.write_state_dict

    def flips_a_byte(out, entries, get, metadata, *, check=None, **kwargs):
        def corrupted_then_checked(written: Path) -> None:  # one byte of "weight" flipped on disk
            _, offset, length = surgery.open_checkpoint(written).byte_range("weight")
            with open(written, "r+b") as f:
                f.seek(offset + length // 2)
                byte = f.read(1)[0]
                f.seek(offset + length // 2)
                f.write(bytes([byte ^ 0x01]))
            check(written)

        return real(out, entries, get, metadata, check=corrupted_then_checked, **kwargs)

    monkeypatch.setattr(writers, "write_state_dict", flips_a_byte)
    out = tmp_path / f"o{suffix}"
    run = run_cli(
        "port", files.src, "--to", files.template if to == "template" else LINEAR, "-o", out, "--verify"
    )
    assert_clean_error(run, out, contains="verify: tensor 'weight' differs", code=1)
    nothing_written(tmp_path)


# -- a template target is copied as it lies ---------------------------------------
def test_a_port_into_a_template_imports_no_torch(files, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_subprocess(
        "port", files.src, "--to", files.template, "-o", out, "--verify", env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert run.exit_code == 0, run
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line}
    assert "surgery.commands.port" in imported  # the import log is there
    assert "torch" not in imported
    assert "2 tensors bit-identical" in run.stdout
    got = written(out)
    assert all(got[k].equal(v) for k, v in files.state.items())
    assert recorded(out) == {str(files.src.resolve()): sha256sum(files.src)}
