"""Hostile torch.distributed.checkpoint folders: every pickle torch would run is scanned, none is run.

DCP loads each bytes item with `torch.load(weights_only=False)`, which unpickles
anything that is not a zip from its first byte, whatever the pickle protocol;
`.metadata` itself is loaded with plain `pickle.load`. Folders are written by the
real `dcp.save`, then one item or the metadata is replaced, as an attacker would.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_clean_error, run_cli, run_subprocess
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from surgery import open_checkpoint

CANARY = "CANARY"


class RunsCommand:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def save_dcp(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():  # "no process group: assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)
    return folder


def read_metadata(folder: Path):
    """torch's own view of .metadata: the test wrote it, so loading it here is safe."""
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)


def write_metadata(folder: Path, metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def replace_bytes_item(folder: Path, fqn: str, payload: bytes, **info_changes) -> None:
    """Store `payload` as the bytes of item `fqn`: appended to its .distcp file, the metadata pointed at it."""
    metadata = read_metadata(folder)
    key, info = next((k, v) for k, v in metadata.storage_data.items() if k.fqn == fqn)
    distcp = folder / info.relative_path
    offset = distcp.stat().st_size
    distcp.write_bytes(distcp.read_bytes() + payload)
    metadata.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(payload), **info_changes)
    write_metadata(folder, metadata)


def dcp_load(folder: Path) -> dict:
    """What torch's own dcp.load makes of the folder (it runs what the bytes items hold)."""
    state = {"model": {"w": torch.zeros(3)}, "epoch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=folder)
    return state


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_dcp({"model": {"w": torch.ones(3)}, "epoch": 5}, tmp_path / "ckpt")


# -- bytes items -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_bytes_item_pickled_at_protocol_0_or_1_is_a_danger_and_never_runs(folder, tmp_path, protocol):
    canary = tmp_path / CANARY
    payload = pickle.dumps(RunsCommand(f"touch {canary}"), protocol=protocol)
    assert payload[:1] != b"\x80"  # no PROTO opcode: what the scan used to skip
    replace_bytes_item(folder, "epoch", payload)
    with pytest.raises(CheckpointException, match="Invalid magic number"):  # after running the payload
        dcp_load(folder)
    assert canary.exists(), "dcp.load did not run the payload: the test proves nothing"
    canary.unlink()

    ckpt = open_checkpoint(folder)
    assert not ckpt.safe
    danger = [f for f in ckpt.findings if f.severity == "danger"]
    assert danger and "system(" in danger[0].message and "(epoch)" in danger[0].where
    run = run_subprocess("inspect", folder)
    assert_clean_error(run, folder, code=1)
    assert "danger: global posix.system" in run.stdout
    assert not canary.exists()

    # Every command that reads the folder, even told to trust it, reads it the same way.
    template = tmp_path / "template.safetensors"
    save_file({"w": torch.zeros(3)}, str(template))
    other = save_dcp({"model": {"w": torch.ones(3)}, "epoch": 5}, tmp_path / "other")
    for args in (
        ("convert", folder, "-o", tmp_path / "refused.safetensors"),
        ("convert", folder, "-o", tmp_path / "out.safetensors", "--trust"),
        ("diff", folder, other),
        ("diff", folder, other, "--trust"),
        ("port", folder, "--to", template, "-o", tmp_path / "refused_port.safetensors"),
        ("port", folder, "--to", template, "-o", tmp_path / "port.safetensors", "--trust", "--key", "model"),
    ):
        run = run_cli(*args)
        assert "Traceback" not in run.stderr, (args, run)
        assert not canary.exists(), args
    assert not (tmp_path / "refused.safetensors").exists()
    assert torch.equal(open_checkpoint(tmp_path / "out.safetensors").tensor("w"), torch.ones(3))
    assert torch.equal(open_checkpoint(tmp_path / "port.safetensors").tensor("w"), torch.ones(3))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_bytes_item_pickled_at_any_later_protocol_is_a_danger_too(folder, tmp_path, protocol):
    replace_bytes_item(
        folder, "epoch", pickle.dumps(RunsCommand(f"touch {tmp_path / CANARY}"), protocol=protocol)
    )
    ckpt = open_checkpoint(folder)
    assert any(f.severity == "danger" and "posix.system" in f.message for f in ckpt.findings)
    assert not (tmp_path / CANARY).exists()


def test_a_bytes_item_that_is_not_a_pickle_is_corrupt(folder):
    replace_bytes_item(folder, "epoch", b"hello, not a pickle")
    with pytest.raises(CheckpointException):  # torch.load cannot read it either
        dcp_load(folder)
    ckpt = open_checkpoint(folder)
    [finding] = ckpt.findings
    assert finding.severity == "corrupt"
    assert "neither a torch.save archive nor a valid pickle" in finding.message
    run = run_cli("inspect", folder)
    assert_clean_error(run, folder, code=1)


def test_a_harmless_bare_pickle_is_corrupt_because_torch_load_fails_on_it(folder):
    replace_bytes_item(folder, "epoch", pickle.dumps(5, protocol=0))
    with pytest.raises(CheckpointException, match="Invalid magic number"):
        dcp_load(folder)
    [finding] = open_checkpoint(folder).findings
    assert finding.severity == "corrupt" and "not a torch.save archive" in finding.message


def test_a_legacy_torch_save_stream_is_read_through_every_pickle(folder, tmp_path):
    """torch.load reads a pre-1.6 stream as five pickles: a payload in the object pickle runs."""
    canary = tmp_path / CANARY
    buf = io.BytesIO()
    torch.save({"hook": RunsCommand(f"touch {canary}")}, buf, _use_new_zipfile_serialization=False)
    replace_bytes_item(folder, "epoch", buf.getvalue())
    assert dcp_load(folder)["epoch"] == {"hook": 0}  # os.system's exit status
    assert canary.exists()
    canary.unlink()

    ckpt = open_checkpoint(folder)
    assert any(f.severity == "danger" and "(epoch): object" in f.where for f in ckpt.findings)
    assert not canary.exists()


def test_a_clean_legacy_torch_save_stream_is_safe(folder):
    buf = io.BytesIO()
    torch.save({"step": 7}, buf, _use_new_zipfile_serialization=False)
    replace_bytes_item(folder, "epoch", buf.getvalue())
    assert dcp_load(folder)["epoch"] == {"step": 7}
    ckpt = open_checkpoint(folder)
    assert ckpt.findings == []
    assert {e.name: e.summary for e in ckpt.extras}["epoch"].endswith("a legacy torch.save stream (not read)")


def test_a_bytes_item_behind_a_transform_cannot_be_checked_and_is_unsafe(folder):
    """DCP decodes such an item (zstandard) before torch.load: surgery cannot look inside."""
    payload = b"(\xb5/\xfd" + bytes(40)  # what a zstandard frame starts with
    replace_bytes_item(folder, "epoch", payload, transform_descriptors=["zstandard/1"])
    [finding] = open_checkpoint(folder).findings
    assert finding.severity == "unsafe"
    assert "zstandard/1" in finding.message and "cannot decode" in finding.message
    assert_clean_error(run_cli("inspect", folder), folder, code=1)


# -- .metadata ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_class_named_in_metadata_is_never_imported(folder, tmp_path):
    """A module whose import alone runs code: plain pickle.load of .metadata imports it."""
    canary = tmp_path / CANARY
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "canary_mod.py").write_text(f"open({str(canary)!r}, 'w').close()\n\nclass Thing:\n    pass\n")
    fake = types.ModuleType("canary_mod")  # pickled by name without importing the real one
    fake.Thing = type("Thing", (), {"__module__": "canary_mod"})
    sys.modules["canary_mod"] = fake
    try:
        metadata = read_metadata(folder)
        metadata.storage_meta = fake.Thing()
        write_metadata(folder, metadata)
    finally:
        del sys.modules["canary_mod"]
    env = {"PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    script = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run(
        [sys.executable, "-c", script, str(folder / ".metadata")], env={**os.environ, **env}, timeout=120
    )
    assert canary.exists(), "plain pickle.load did not import the module: the test proves nothing"
    canary.unlink()

    run = run_subprocess("inspect", folder, env=env)
    assert_clean_error(run, folder, code=1)
    assert "unsafe: global canary_mod.Thing" in run.stdout
    assert not canary.exists()
    run = run_subprocess("convert", folder, "-o", tmp_path / "out.safetensors", "--trust", env=env)
    assert run.exit_code == 0, run
    assert not canary.exists()
