"""Files that other files name, and paths that are not files: each answered cleanly.

An index or a DCP `.metadata` names its shards: a NUL byte in a name, an index
naming itself, a link out of the folder. The Hugging Face cache links every
snapshot file into `../../blobs`, and that is read. A FIFO or a device given
where a file belongs is refused before it is opened (opening a FIFO blocks).
A torch zip with two archive folders has every pickle scanned.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess, torch_save_bytes
from safetensors.torch import save_file

from surgery import SurgeryError, open_checkpoint, text

WATCHDOG_SECONDS = 20


@contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS) -> Iterator[None]:
    """A hang (a FIFO opened for reading) becomes a failure instead of a stuck test run."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise AssertionError(f"no answer after {seconds} s: surgery blocks on this input")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def sharded(folder: Path, weight_map: dict[str, str], shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A folder with real safetensors shards and an index with the given weight_map."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def save_dcp(state: dict, folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "no process group: assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)
    return folder


def rename_distcp(folder: Path, new: str) -> None:
    """Point every item of the DCP folder's `.metadata` at the file `new`."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = new
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.fixture
def small() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a": torch.randn(2, 3), "b": torch.arange(4, dtype=torch.int64)}


@pytest.fixture
def plain_file(tmp_path, small) -> Path:
    path = tmp_path / "plain.safetensors"
    save_file(small, str(path))
    return path


# -- NUL bytes in names a file gives ---------------------------------------------------------
@pytest.mark.parametrize(
    "char, says",
    [("\x00", "holds a NUL byte"), ("\ud800", "holds a lone surrogate")],
    ids=["nul", "surrogate"],
)
def test_a_shard_name_no_file_can_have_is_a_clean_error_in_every_command(
    tmp_path, small, plain_file, char, says
):
    index = sharded(tmp_path / "nul", {"a": f"model{char}.safetensors"}, {"model.safetensors": small})
    said = f"the index names shard {f'model{char}.safetensors'!r}, which {says}"
    for args in [
        ("inspect", index.parent),
        ("inspect", index),
        ("convert", index, "-o", tmp_path / "out.safetensors"),
        ("diff", index, plain_file),
        ("port", index, "--to", plain_file, "-o", tmp_path / "ported.safetensors"),
    ]:
        assert_clean_error(run_cli(*args), index, contains=said, code=1)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "ported.safetensors").exists()
    assert_clean_error(run_subprocess("inspect", index), index, contains=text.printable(said), code=1)


def test_nul_byte_in_a_dcp_relative_path_is_a_clean_error(tmp_path, small, plain_file):
    folder = save_dcp({"model": small}, tmp_path / "dcp")
    rename_distcp(folder, "__0_0\x00.distcp")
    with pytest.raises(SurgeryError, match="NUL byte"):
        open_checkpoint(folder)
    said = ".metadata names file '__0_0\\x00.distcp', which holds a NUL byte"
    assert_clean_error(run_cli("inspect", folder), folder, contains=said, code=1)
    assert_clean_error(run_cli("inspect", folder / ".metadata"), folder, contains=said, code=1)
    assert_clean_error(
        run_cli("convert", folder, "-o", tmp_path / "out.safetensors"), folder, contains=said, code=1
    )
    assert_clean_error(run_cli("diff", plain_file, folder), folder, contains=said, code=1)


# -- indexes naming indexes ------------------------------------------------------------------
def test_an_index_naming_itself_as_a_shard_is_refused(tmp_path, small):
    index = sharded(tmp_path / "self", {"a": "model.safetensors.index.json"}, {})
    said = "the index names shard 'model.safetensors.index.json', which is itself an index"
    with watchdog():
        for args in [("inspect", index), ("inspect", index.parent), ("convert", index, "-o", tmp_path / "o")]:
            assert_clean_error(run_cli(*args), index, contains=said, code=1)
    assert_clean_error(run_subprocess("inspect", index), index, contains=said, code=1)


def test_indexes_naming_each_other_are_refused(tmp_path, small):
    folder = tmp_path / "cycle"
    first = sharded(
        folder, {"a": "second.index.json", "b": "model.safetensors"}, {"model.safetensors": small}
    )
    (folder / "second.index.json").write_text(json.dumps({"weight_map": {"a": first.name}}))
    with watchdog():
        assert_clean_error(
            run_cli("inspect", first), first, contains="shard 'second.index.json', which is itself an index"
        )
        second = folder / "second.index.json"
        assert_clean_error(
            run_cli("inspect", second), second, contains=f"shard {first.name!r}, which is itself"
        )


# -- the Hugging Face cache: snapshot files are links into ../../blobs -------------------------
def hub_cache(root: Path, small: dict[str, torch.Tensor], subfolder: str = "") -> Path:
    """`models--org--name` as huggingface_hub lays it out: blobs by hash, snapshots linking to them."""
    repo = root / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd" / subfolder
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    up = "../" * (2 + len(Path(subfolder).parts)) + "blobs/"
    weight_map = {}
    for i, (name, tensor) in enumerate(small.items(), 1):
        shard = f"model-{i:05d}-of-{len(small):05d}.safetensors"
        save_file({name: tensor}, str(blobs / f"blob{i}"))
        (snapshot / shard).symlink_to(up + f"blob{i}")
        weight_map[name] = shard
    (blobs / "blob-index").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (snapshot / "model.safetensors.index.json").symlink_to(up + "blob-index")
    return snapshot


@pytest.mark.parametrize("subfolder", ["", "text_encoder"])
def test_the_hub_cache_layout_is_read_through_its_links(tmp_path, small, subfolder):
    snapshot = hub_cache(tmp_path, small, subfolder)
    ckpt = open_checkpoint(snapshot)
    assert ckpt.format == "sharded" and [t.name for t in ckpt.tensors] == ["a", "b"]
    for name, tensor in small.items():
        assert torch.equal(ckpt.tensor(name), tensor)

    for path in (snapshot, snapshot / "model.safetensors.index.json"):
        run = run_cli("inspect", path)
        assert run.exit_code == 0, run
        assert "2 safetensors shards" in run.stdout and "safety      ok" in run.stdout
    out = tmp_path / "whole.safetensors"
    assert run_cli("convert", snapshot, "-o", out).exit_code == 0
    assert run_cli("diff", snapshot, out, "--exit-code").exit_code == 0
    run = run_subprocess("inspect", snapshot, "--json")
    assert run.exit_code == 0, run.stderr
    assert [t["name"] for t in json.loads(run.stdout)["tensors"]] == ["a", "b"]


def test_a_link_leaving_the_hub_cache_is_refused(tmp_path, small):
    snapshot = hub_cache(tmp_path, small)
    save_file({"a": small["a"]}, str(tmp_path / "elsewhere.safetensors"))
    shard = snapshot / "model-00001-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to("../../../../elsewhere.safetensors")  # out of models--org--name
    index = snapshot / "model.safetensors.index.json"
    said = f"shard {shard.name!r}, which lies outside the folder (through a link)"
    assert_clean_error(run_cli("inspect", snapshot), index, contains=said, code=1)


def test_path_traversal_in_a_hub_cache_index_is_refused(tmp_path, small):
    snapshot = hub_cache(tmp_path, small)
    index = snapshot / "model.safetensors.index.json"
    index.unlink()  # the link: write a real index in its place, naming the blob by a path
    index.write_text(json.dumps({"weight_map": {"a": "../../blobs/blob1"}}))
    said = "shard '../../blobs/blob1', which lies outside the folder"
    assert_clean_error(run_cli("inspect", index), index, contains=said, code=1)


def test_a_link_out_of_a_plain_folder_is_still_refused(tmp_path, small):
    folder = tmp_path / "plain"
    save_file({"a": small["a"]}, str(tmp_path / "secret.safetensors"))
    index = sharded(folder, {"a": "model.safetensors"}, {})
    (folder / "model.safetensors").symlink_to("../secret.safetensors")
    said = "which lies outside the folder (through a link)"
    assert_clean_error(run_cli("inspect", index), index, contains=said, code=1)


# -- paths that are not regular files ---------------------------------------------------------
def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_without_being_opened(tmp_path, plain_file):
    pipe = fifo(tmp_path / "model.safetensors")
    said = "a named pipe (FIFO), not a regular file"
    with watchdog():
        for args in [
            ("inspect", pipe),
            ("convert", pipe, "-o", tmp_path / "out.safetensors"),
            ("diff", plain_file, pipe),
            ("port", pipe, "--to", plain_file, "-o", tmp_path / "ported.safetensors"),
        ]:
            assert_clean_error(run_cli(*args), pipe, contains=said, code=1)
    assert_clean_error(run_subprocess("inspect", pipe), pipe, contains=said, code=1)


def test_a_fifo_named_by_an_index_or_a_dcp_folder_is_refused(tmp_path, small):
    index = sharded(tmp_path / "sharded", {"a": "pipe.safetensors"}, {})
    fifo(index.parent / "pipe.safetensors")
    folder = save_dcp({"model": small}, tmp_path / "dcp")
    fifo(folder / "pipe.distcp")
    rename_distcp(folder, "pipe.distcp")
    with watchdog():
        said = "the index names shard 'pipe.safetensors', which is a named pipe (FIFO)"
        assert_clean_error(run_cli("inspect", index.parent), index, contains=said, code=1)
        said = ".metadata names file 'pipe.distcp', which is a named pipe (FIFO)"
        assert_clean_error(run_cli("inspect", folder), folder, contains=said, code=1)


def test_a_fifo_named_like_an_index_in_a_folder_is_refused(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    index = fifo(folder / "model.safetensors.index.json")
    with watchdog():
        assert_clean_error(run_cli("inspect", folder), index, contains="a named pipe (FIFO)", code=1)


def test_devices_and_sockets_are_refused(tmp_path):
    assert_clean_error(run_cli("inspect", "/dev/zero"), "/dev/zero", contains="a character device", code=1)
    path = tmp_path / "model.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert_clean_error(run_cli("inspect", path), path, contains="a socket, not a regular file", code=1)


# -- torch zips with more than one archive folder -----------------------------------------------
def payload() -> bytes:
    """A pickle that would run `id` if unpickled; only the pickle machine reads it here."""
    return b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R."


def two_folders(path: Path, evil_first: bool) -> Path:
    """torch.save's archive under `good/`, and a second archive folder `evil/` with a payload."""
    good = zipfile.ZipFile(io.BytesIO(torch_save_bytes({"w": torch.ones(4)})))
    prefix = good.namelist()[0].split("/")[0]
    members = [(f"good/{i.filename[len(prefix) + 1 :]}", good.read(i)) for i in good.infolist()]
    evil = [("evil/data.pkl", payload()), ("evil/version", b"3\n")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, body in [*evil, *members] if evil_first else [*members, *evil]:
            zf.writestr(name, body)
    return path


@pytest.mark.parametrize("evil_first", [False, True])
def test_every_archive_folder_is_scanned_and_torchs_choice_is_described(tmp_path, evil_first):
    path = two_folders(tmp_path / "two.pt", evil_first)
    # torch reads the folder of the first member, and torch.load refuses the whole file
    chosen = "evil" if evil_first else "good"
    reader = torch._C.PyTorchFileReader(str(path))
    assert reader.get_record("data.pkl") == zipfile.ZipFile(path).read(f"{chosen}/data.pkl")
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch.load(path, weights_only=True)

    ckpt = open_checkpoint(path)
    assert ckpt.metadata["archive"] == chosen
    danger = [f for f in ckpt.findings if f.severity == "danger"]
    assert danger and "os.system" in danger[0].message
    # the described data.pkl is named as always; another folder's by its member name
    assert danger[0].where.endswith("data.pkl byte 2" if evil_first else "evil/data.pkl byte 2")
    outside = [f for f in ckpt.findings if "outside the archive folder" in f.message]
    assert outside and all(f.severity == "corrupt" for f in outside)
    assert_clean_error(run_cli("inspect", path), path, contains="danger: global os.system", code=1)


def test_a_pkl_member_beside_data_pkl_is_scanned(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    prefix = zipfile.ZipFile(io.BytesIO(buf.getvalue())).namelist()[0].split("/")[0]
    path = tmp_path / "extra.pt"
    path.write_bytes(buf.getvalue())
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/extra/bytecode.pkl", payload())
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))  # torch ignores it

    ckpt = open_checkpoint(path)
    danger = [f for f in ckpt.findings if f.severity == "danger"]
    assert danger and f"{prefix}/extra/bytecode.pkl" in danger[0].where
    assert_clean_error(run_cli("inspect", path), path, contains="os.system", code=1)


# -- diff's internal-error line names its files --------------------------------------------------
def test_an_internal_error_in_diff_names_both_files(tmp_path, plain_file, monkeypatch):
    import surgery.commands.diff

    def broken(*args: Any, **kwargs: Any) -> Any:  # a bug injected after both files are open
        raise RuntimeError("injected")

    monkeypatch.setattr(surgery.commands.diff, "_aligned", broken)
    other = tmp_path / "other.safetensors"
    other.write_bytes(plain_file.read_bytes())
    run = run_cli("diff", plain_file, other)
    assert_clean_error(
        run, f"{plain_file}, {other}", contains="internal error: RuntimeError: injected", code=3
    )
