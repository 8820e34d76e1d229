"""Bad input to `surgery convert`: one line, a non-zero exit, nothing left behind, the input untouched."""

from __future__ import annotations

import hashlib
import resource
import signal
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, Run, assert_clean_error, run_cli
from safetensors.torch import save_file

import surgery


def digest(path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "src.safetensors"
    save_file({f"layer{i}.weight": torch.randn(256, 256) for i in range(8)}, path)
    return path


def refused(tmp_path, args, where, contains, code=1, inputs=()) -> Run:
    """Run the CLI, check the one-line error, that the folder did not change, and the inputs neither."""
    before, sums = listing(tmp_path), [digest(p) for p in inputs]
    run = run_cli("convert", *args)
    assert_clean_error(run, where, contains=contains, code=code)
    assert listing(tmp_path) == before
    assert [digest(p) for p in inputs] == sums
    return run


def test_an_existing_output_needs_force(tmp_path, source):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    refused(tmp_path, [source, "-o", out], out, "exists", code=2, inputs=[source, out])
    assert run_cli("convert", source, "-o", out, "--force").exit_code == 0
    assert surgery.open_checkpoint(out).num_tensors == 8


def test_a_non_empty_output_folder_needs_force_and_only_holds_a_checkpoint(tmp_path, source):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    refused(tmp_path, [source, "-o", folder, "--shard-size", "1MB"], folder, "not empty", code=2)
    refused(tmp_path, [source, "-o", folder, "--shard-size", "1MB", "--force"], folder, "notes.txt", code=2)
    (folder / "notes.txt").unlink()
    assert run_cli("convert", source, "-o", folder, "--shard-size", "1MB").exit_code == 0  # empty is fine
    first = digest(folder)
    assert run_cli("convert", source, "-o", folder, "--shard-size", "1MB", "--force").exit_code == 0
    assert sorted(first) == sorted(digest(folder))


def test_the_output_cannot_be_an_input(tmp_path, source):
    refused(tmp_path, [source, "-o", source, "--force"], source, "input", code=2, inputs=[source])
    refused(tmp_path, [source, "-o", tmp_path, "--shard-size", "1MB", "--force"], tmp_path, "input", code=2)
    missing = tmp_path / "no" / "out.safetensors"
    refused(tmp_path, [source, "-o", missing], missing, "does not exist", code=2)


def sharded(tmp_path, source):
    surgery.convert(source, tmp_path / "shards", shard_size="600KB")
    return tmp_path / "shards"


def test_a_shard_missing_from_the_index(tmp_path, source):
    folder = sharded(tmp_path, source)
    (folder / "model-00002-of-00004.safetensors").unlink()
    out = tmp_path / "out.safetensors"
    index = folder / "model.safetensors.index.json"
    refused(tmp_path, [folder, "-o", out], index, "missing", inputs=[folder])


def test_two_shards_holding_the_same_name(tmp_path, source):
    folder = sharded(tmp_path, source)
    index = folder / "model.safetensors.index.json"
    first = folder / "model-00001-of-00004.safetensors"
    (folder / "model-00002-of-00004.safetensors").write_bytes(first.read_bytes())
    refused(tmp_path, [folder, "-o", tmp_path / "out.safetensors"], index, "corrupt", inputs=[folder])


def test_a_truncated_source(tmp_path, source):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[:-1000])
    refused(tmp_path, [cut, "-o", tmp_path / "out.safetensors"], cut, "", inputs=[cut])


def test_an_unsafe_source_is_refused_unless_trusted_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = FIXTURES / "payload_os_system.pth"
    out = tmp_path / "out.safetensors"
    refused(tmp_path, [payload, "-o", out], payload, "not safe", inputs=[payload])
    run = subprocess.run(
        [sys.executable, "-m", "surgery", "convert", str(payload), "-o", str(out), "--trust"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "surgery-fixture-payload" not in run.stdout + run.stderr  # the echo never ran
    assert surgery.open_checkpoint(out).num_tensors > 0


@pytest.mark.parametrize(
    "flags, where, contains",
    [
        (["--dtype", "int8"], "--dtype", "bf16"),
        (["--format", "onnx"], "--format", "onnx"),
        (["--shard-size", "abc"], "--shard-size", "size"),
        (["--shard-size", "0"], "--shard-size", "more than 0"),
        (["--shard-size", "-1GB"], "--shard-size", ""),
        (["--shard-size", "1GB", "--format", "dcp"], "--shard-size", "dcp"),
        (["--rename", "layer\\d=layer"], "--rename", "would both become"),
        (["--include", "nothing*"], "SOURCE", "no tensors left"),
    ],
)
def test_bad_flags_are_usage_errors(tmp_path, source, flags, where, contains):
    where = source if where == "SOURCE" else where
    refused(
        tmp_path,
        [source, "-o", tmp_path / "out.safetensors", *flags],
        where,
        contains,
        code=2,
        inputs=[source],
    )


def test_a_dtype_safetensors_cannot_store(tmp_path):
    torch.save({"z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    out = tmp_path / "out.safetensors"
    run = refused(tmp_path, [tmp_path / "c.pt", "-o", out], out, "complex128", code=2)
    assert "hint:" in run.stderr


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.parametrize(
    "out, flags",
    [
        ("out.safetensors", []),
        ("out.pt", []),
        ("out.safetensors", ["--dtype", "fp16"]),
        ("shards", ["--shard-size", "1500KB"]),
        ("dcp", ["--format", "dcp"]),
    ],
)
def test_the_disk_filling_up_mid_write_leaves_nothing(tmp_path, source, out, flags):
    """The write fails part way (a 1 MiB file-size limit, like a full disk): clean error, nothing left."""
    before, sums = listing(tmp_path), digest(source)
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "convert", str(source), "-o", str(tmp_path / out), *flags],
        capture_output=True,
        text=True,
        preexec_fn=_small_file_limit,
    )
    run = Run(proc.returncode, proc.stdout, proc.stderr)
    assert_clean_error(run, tmp_path / out, contains="cannot write", code=1)
    assert listing(tmp_path) == before  # no output, no temporary file or folder
    assert digest(source) == sums


def test_a_failed_verify_leaves_nothing(tmp_path, source, monkeypatch):
    """--verify runs before the rename: an output that does not match is never put in place."""
    from surgery import converting

    def broken(written, plan, where=None):
        raise surgery.SurgeryError(where, "verify: tensor 'layer0.weight' differs from its source")

    monkeypatch.setattr(converting, "verify_conversion", broken)
    before = listing(tmp_path)
    run = run_cli("convert", source, "-o", tmp_path / "out.safetensors", "--verify")
    assert_clean_error(run, tmp_path / "out.safetensors", contains="differs", code=1)
    assert listing(tmp_path) == before


def test_json_on_errors_keeps_stdout_empty(tmp_path, source):
    run = run_cli("convert", source, "-o", source, "--json", "--force")
    assert run.exit_code == 2 and run.stdout == ""  # the error goes to stderr only
