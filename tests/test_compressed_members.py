"""Deflated zip members: read as torch reads them, inflated in bounded steps, damage refused cleanly.

torch.save stores every member uncompressed; archives re-zipped by other tools deflate
them, and torch still reads them. Every file here starts as a real `torch.save` archive,
re-zipped with `zipfile` and then patched byte by byte.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess, torch_save_bytes

import surgery
from surgery.errors import CorruptCheckpoint
from surgery.formats import torchzip

STATE = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.linspace(-1, 1, 5)}


def rezip(raw: bytes, method=lambda name: zipfile.ZIP_DEFLATED) -> bytes:
    """The archive's members again, each compressed with `method(name)`."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=(2020, 1, 1, 0, 0, 0))
            copy.compress_type = method(info.filename)
            zf.writestr(copy, src.read(info))
    return out.getvalue()


def storage_name(raw: bytes) -> str:
    return next(n for n in zipfile.ZipFile(io.BytesIO(raw)).namelist() if n.endswith("/data/0"))


def patch(raw: bytes, name: str, *, crc: int | None = None, size: int | None = None) -> bytes:
    """Set a member's CRC or inflated size in its local header and its central entry alike."""
    out = bytearray(raw)
    for signature, name_at, crc_at in ((b"PK\x03\x04", 30, 14), (b"PK\x01\x02", 46, 16)):
        length_at = 26 if signature == b"PK\x03\x04" else 28
        i = out.find(signature)
        while i >= 0:
            n = struct.unpack_from("<H", out, i + length_at)[0]
            if out[i + name_at : i + name_at + n] == name.encode():
                if crc is not None:
                    struct.pack_into("<I", out, i + crc_at, crc)
                if size is not None:
                    struct.pack_into("<I", out, i + crc_at + 8, size)
            i = out.find(signature, i + 1)
    return bytes(out)


def replace_compressed(raw: bytes, name: str, body: bytes) -> bytes:
    """Overwrite a member's compressed bytes in place (same length), headers untouched."""
    info = zipfile.ZipFile(io.BytesIO(raw)).getinfo(name)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    assert len(body) <= info.compress_size
    return raw[:start] + body + raw[start + len(body) :]


@pytest.fixture(scope="module")
def deflated(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deflated") / "deflated.pt"
    path.write_bytes(rezip(torch_save_bytes(STATE)))
    return path


def write(tmp_path: Path, data: bytes, name: str = "damaged.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- good deflated archives ----------------------------------------------------------------------
def test_deflated_archive_reads_as_torch_reads_it(deflated):
    expected = torch.load(deflated, weights_only=True)
    ckpt = surgery.open_checkpoint(deflated)
    assert all(torch.equal(ckpt.tensor(k), v) for k, v in expected.items())


def test_deflated_archive_converts_and_verifies(deflated, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli("convert", deflated, "-o", out, "--verify")
    assert run.exit_code == 0, run.stderr
    assert surgery.diff(deflated, out).same


def test_verify_checks_deflated_storages_too(deflated):
    run = run_cli("inspect", deflated, "--verify")
    assert run.exit_code == 0, run.stdout + run.stderr
    assert "every storage checked" in run.stdout and "CRC" not in run.stdout


# -- damaged deflated storages -------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_deflated(deflated) -> bytes:
    return deflated.read_bytes()


def bad_crc(raw: bytes) -> bytes:
    name = storage_name(raw)
    return patch(raw, name, crc=zipfile.ZipFile(io.BytesIO(raw)).getinfo(name).CRC ^ 1)


def broken_stream(raw: bytes) -> bytes:
    return replace_compressed(raw, storage_name(raw), b"\xff")  # BTYPE 11: no such deflate block


def short_stream(raw: bytes) -> bytes:
    name = storage_name(raw)
    return patch(raw, name, size=zipfile.ZipFile(io.BytesIO(raw)).getinfo(name).file_size + 8)


DAMAGE = {
    "bad CRC": (bad_crc, "fails its CRC check"),
    "broken stream": (broken_stream, "does not inflate"),
    "stream shorter than declared": (short_stream, "inflates to 256 bytes, its header declares 264"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_storage_is_refused_by_convert_naming_the_member(raw_deflated, tmp_path, damage):
    make, message = DAMAGE[damage]
    path = write(tmp_path, make(raw_deflated))
    name = storage_name(raw_deflated)
    out = tmp_path / "out.safetensors"
    line = assert_clean_error(run_cli("convert", path, "-o", out), path, contains=message, code=1)
    assert name in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "convert left output behind"


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_storage_is_refused_by_diff_and_reading(raw_deflated, tmp_path, damage):
    make, message = DAMAGE[damage]
    path = write(tmp_path, make(raw_deflated))
    assert_clean_error(run_cli("diff", path, path), path, contains=message, code=1)
    with pytest.raises(CorruptCheckpoint, match=message):
        surgery.open_checkpoint(path).tensor("w")


def test_bad_crc_is_refused_although_torch_reads_it(raw_deflated, tmp_path):
    path = write(tmp_path, bad_crc(raw_deflated))
    assert torch.equal(torch.load(path, weights_only=True)["w"], STATE["w"])
    run = run_cli("inspect", path, "--verify")
    assert run.exit_code == 1 and "corrupt: CRC mismatch in" in run.stdout


def test_broken_stream_found_by_verify(raw_deflated, tmp_path):
    path = write(tmp_path, broken_stream(raw_deflated))
    run = run_cli("inspect", path, "--verify")
    assert run.exit_code == 1 and "does not inflate" in run.stdout


def test_stream_longer_than_declared_never_fills_more_than_declared(tmp_path):
    """A 256-byte storage whose header declares 248, under a view of its first 128 bytes:
    refused while inflating, never written past the 248 bytes."""
    raw = rezip(torch_save_bytes({"w": torch.arange(64, dtype=torch.float32)[:32]}))
    path = write(tmp_path, patch(raw, storage_name(raw), size=248))
    ckpt = surgery.open_checkpoint(path)
    assert not ckpt.safe  # the storage is larger than the member: a corrupt finding
    with pytest.raises(CorruptCheckpoint, match="inflates past the 248 bytes its header declares"):
        ckpt.tensor("w")


def test_size_deflate_cannot_reach_is_refused_before_any_allocation(raw_deflated, tmp_path):
    name = storage_name(raw_deflated)
    path = write(tmp_path, patch(raw_deflated, name, size=2**31))
    run = run_cli("inspect", path)
    assert run.exit_code == 1 and "more than deflate can make" in run.stdout
    with pytest.raises(CorruptCheckpoint, match="more than deflate can make"):
        surgery.open_checkpoint(path).tensor("w")


def test_verify_names_the_storages_it_could_not_check(tmp_path):
    """bzip2 is not a method torch reads: inspect --verify says it did not check that member."""
    raw = rezip(torch_save_bytes(STATE), lambda n: zipfile.ZIP_BZIP2 if n.endswith("/data/0") else 0)
    path = write(tmp_path, raw)
    run = run_cli("inspect", path, "--verify")
    name = storage_name(raw)
    assert f"every storage checked but {name} (compression method 12)" in run.stdout
    doc = surgery.open_checkpoint(path, verify=True).metadata
    assert doc["crc_checked"] == "some storages" and doc["crc_not_checked"] == {name: "compression method 12"}


# -- deflated data.pkl ---------------------------------------------------------------------------
def pickle_bomb(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", body)
        zf.writestr("archive/byteorder", "little")
    return path


def test_small_file_inflating_to_millions_of_dicts_is_refused(tmp_path):
    """8 MB of EMPTY_DICT opcodes deflate to 8 KB; inflated and run they took 1.88 GB."""
    path = pickle_bomb(tmp_path, b"\x80\x02" + b"}" * (8 << 20) + b".")
    assert path.stat().st_size < 16 << 10
    run = run_subprocess("inspect", path)
    assert_clean_error(run, path, contains="member archive/data.pkl inflates past", code=1)


def test_bomb_that_lies_about_its_size_stops_at_the_declared_size(tmp_path):
    path = pickle_bomb(tmp_path, b"\x80\x02" + b"N0" * (4 << 20) + b"N.")
    path.write_bytes(patch(path.read_bytes(), "archive/data.pkl", size=1000))
    assert_clean_error(run_cli("inspect", path), path, contains="inflates past the 1,000 bytes", code=1)


def test_large_deflated_pickle_of_real_data_is_read(tmp_path):
    """5 MB of varied numbers deflate about 1.1x: past RATIO_FREE, far under MAX_RATIO."""
    rng = random.Random(0)
    history = [rng.random() for _ in range(600_000)]
    raw = rezip(torch_save_bytes({"state_dict": STATE, "history": history}))
    info = next(i for i in zipfile.ZipFile(io.BytesIO(raw)).infolist() if i.filename.endswith("data.pkl"))
    assert info.file_size > torchzip.RATIO_FREE
    ckpt = surgery.open_checkpoint(write(tmp_path, raw))
    assert ckpt.safe and {t.name for t in ckpt.tensors} == set(STATE)


def test_inflate_refuses_past_its_limit_before_inflating():
    body = zlib.compress(b"\0" * 10_000)[2:-4]  # raw deflate
    assert torchzip.inflate("f", "m", body, 10_000) == bytearray(10_000)
    with pytest.raises(CorruptCheckpoint, match="member m inflates past 9,999 bytes"):
        torchzip.inflate("f", "m", body, 10_000, limit=9_999)


def test_pickle_limits():
    assert torchzip.pickle_limit(100) == torchzip.RATIO_FREE
    assert torchzip.pickle_limit(1 << 20) == torchzip.MAX_RATIO << 20
    assert torchzip.pickle_limit(1 << 30) == torchzip.MAX_INFLATED
