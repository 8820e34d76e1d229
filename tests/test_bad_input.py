"""Bad input: one `error: <path>: <what>` line, a non-zero exit, no traceback, the input untouched."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile

import pytest
from conftest import FIXTURES, assert_clean_error, run_cli, run_subprocess, torch_save_bytes

from surgery import NotACheckpoint, NotFound, SurgeryError, open_checkpoint


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def make_missing(tmp_path):
    return tmp_path / "nowhere.pth", "no such file or folder"


def make_empty_dir(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    return folder, "a folder with no *.index.json"


def make_empty(tmp_path):
    return _write(tmp_path / "empty.pth", b""), "empty file (0 bytes)"


def make_random(tmp_path):
    import random

    rng = random.Random(0)
    data = bytes([0x17]) + bytes(rng.randrange(256) for _ in range(4095))
    return _write(tmp_path / "random.bin", data), "not a checkpoint format surgery knows"


def make_truncated_zip(tmp_path):
    import torch

    data = torch_save_bytes({"w": torch.zeros(1000)})
    return _write(tmp_path / "cut.pth", data[: len(data) // 2]), "damaged or truncated zip archive"


def make_zip_not_checkpoint(tmp_path):
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    return path, "a zip archive but not a torch checkpoint: no data.pkl (holds readme.txt)"


def make_index_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded_safetensors", folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return (
        folder / "model.safetensors.index.json",
        "the index names shard 'model-00002-of-00002.safetensors', which is missing",
    )


def make_shard_outside(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (tmp_path / "secret.safetensors").write_bytes((FIXTURES / "tiny.safetensors").read_bytes())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"fc.weight": "../secret.safetensors"}}))
    return index, "which lies outside the folder"


def make_lfs_pointer(tmp_path):
    text = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 46827520\n"
    return _write(tmp_path / "model.bin", text), "a Git LFS pointer, not the weights: run `git lfs pull`"


def make_html(tmp_path):
    return _write(
        tmp_path / "resnet.pth", b"<!DOCTYPE html><html><body>Sign in</body></html>"
    ), "an HTML page"


def make_json_not_index(tmp_path):
    return _write(tmp_path / "config.json", b'{"hidden_size": 768}'), "without a weight_map"


def make_dcp_folder(tmp_path):
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"\x80\x04")
    (folder / "__0_0.distcp").write_bytes(b"")
    return folder, "torch.distributed.checkpoint"


CASES = [
    make_missing,
    make_empty_dir,
    make_empty,
    make_random,
    make_truncated_zip,
    make_zip_not_checkpoint,
    make_index_missing_shard,
    make_shard_outside,
    make_lfs_pointer,
    make_html,
    make_json_not_index,
    make_dcp_folder,
]


def _snapshot(path):
    if not path.exists():
        return None
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    return path.read_bytes()


@pytest.mark.parametrize("make", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_clean_error_line_and_changes_nothing(tmp_path, make):
    path, expected = make(tmp_path)
    before = _snapshot(path)
    assert_clean_error(run_cli("inspect", path), path, contains=expected, code=1)
    assert_clean_error(run_cli("inspect", path, "--json"), path, contains=expected, code=1)
    with pytest.raises(SurgeryError, match=re.escape(expected.split(":")[0])):
        open_checkpoint(path)
    assert _snapshot(path) == before
    assert sorted(p.name for p in tmp_path.rglob("*") if ".tmp" in p.name) == []


def test_errors_look_the_same_from_a_real_process(tmp_path):
    path, expected = make_truncated_zip(tmp_path)
    run = run_subprocess("inspect", path)
    assert run.stdout == ""
    assert_clean_error(run, path, contains=expected, code=1)


def test_folder_without_index_suggests_the_checkpoint_it_holds(tmp_path):
    path, _ = make_empty_dir(tmp_path)
    run = run_cli("inspect", path)
    assert "hint: it holds model.safetensors: inspect one of those" in run.stderr


def test_error_types_say_what_kind_of_problem_it_is(tmp_path):
    with pytest.raises(NotFound):
        open_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(NotACheckpoint):
        open_checkpoint(make_lfs_pointer(tmp_path)[0])


def test_bad_option_values_are_usage_errors():
    run = run_cli("inspect", FIXTURES / "tiny.safetensors", "--depth", "-1")
    assert run.exit_code == 2 and "Traceback" not in run.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_a_clean_error(tmp_path):
    path = tmp_path / "locked.pth"
    path.write_bytes((FIXTURES / "tiny_state_dict.pth").read_bytes())
    path.chmod(0)
    assert_clean_error(run_cli("inspect", path), path, contains="cannot read")
