"""Zip-level tricks on real torch.save archives: what readers disagree on is reported, nothing runs,
and damage ends in one clean error line.

Every file starts as the bytes of a real `torch.save` and is then rewritten with
`zipfile` or patched byte by byte.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess, torch_save_bytes, write_torch_zip

from surgery import SurgeryError, open_checkpoint

STATE = {
    "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2),
    "conv.bias": torch.tensor([0.5, -1.5]),
    "steps": torch.tensor(7),
}
RAW = torch_save_bytes(STATE)
PREFIX = zipfile.ZipFile(io.BytesIO(RAW)).namelist()[0].split("/")[0]
DATA_PKL = f"{PREFIX}/data.pkl"


def _parts(raw: bytes) -> tuple[bytes, dict[str, bytes]]:
    zf = zipfile.ZipFile(io.BytesIO(raw))
    storages = {
        name[len(f"{PREFIX}/data/") :]: zf.read(name)
        for name in zf.namelist()
        if name.startswith(f"{PREFIX}/data/")
    }
    return zf.read(DATA_PKL), storages


STATE_PKL, STORAGES = _parts(RAW)


def u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def payload_pickle(marker: Path) -> bytes:
    """{"hook": os.system("touch MARKER"), "weights": <the real state dict>}."""
    system = b"cos\nsystem\n" + u(f"touch {marker}") + b"\x85R"
    return b"\x80\x02}" + u("hook") + system + b"s" + u("weights") + STATE_PKL[2:-1] + b"s."


# -- byte-level zip editing ---------------------------------------------------------------------


def _info(raw: bytes, name: str) -> zipfile.ZipInfo:
    matches = [i for i in zipfile.ZipFile(io.BytesIO(raw)).infolist() if i.filename == name]
    assert len(matches) == 1, name
    return matches[0]


def _central_entries(raw: bytes) -> dict[str, int]:
    """Where each member's central directory entry starts."""
    eocd = raw.rfind(b"PK\x05\x06")
    offset = struct.unpack_from("<I", raw, eocd + 16)[0]
    if offset == 0xFFFFFFFF:
        offset = struct.unpack_from("<Q", raw, raw.rfind(b"PK\x06\x06") + 48)[0]
    entries, pos = {}, offset
    while raw[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", raw, pos + 28)
        entries[raw[pos + 46 : pos + 46 + n].decode()] = pos
        pos += 46 + n + m + k
    assert entries, "no central directory found"
    return entries


def _data_offset(raw: bytes, name: str) -> int:
    local = _info(raw, name).header_offset
    n, m = struct.unpack_from("<HH", raw, local + 26)
    return local + 30 + n + m


def set_flag_bits(raw: bytes, name: str, bits: int) -> bytes:
    """Set general-purpose flag bits in both the local header and the central directory entry."""
    buf = bytearray(raw)
    for at in (_info(raw, name).header_offset + 6, _central_entries(raw)[name] + 8):
        struct.pack_into("<H", buf, at, struct.unpack_from("<H", buf, at)[0] | bits)
    return bytes(buf)


def patch(raw: bytes, at: int, new: bytes) -> bytes:
    return raw[:at] + new + raw[at + len(new) :]


def write(tmp_path: Path, raw: bytes, name: str = "model.pth") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A zip with exactly these members, duplicates included, in this order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, blob in members:
                zf.writestr(name, blob)
    return path


def torch_members(data_pkl: bytes, storages: dict[str, bytes] | None = None) -> list[tuple[str, bytes]]:
    storages = STORAGES if storages is None else storages
    return [
        (f"{PREFIX}/data.pkl", data_pkl),
        (f"{PREFIX}/byteorder", b"little"),
        *((f"{PREFIX}/data/{key}", blob) for key, blob in storages.items()),
        (f"{PREFIX}/version", b"3\n"),
    ]


# -- assertions ---------------------------------------------------------------------------------


def findings_of(path: Path, severity: str, text: str = "", **kwargs) -> list:
    ckpt = open_checkpoint(path, **kwargs)
    return [f for f in ckpt.findings if f.severity == severity and text in f.message]


def assert_opens_cleanly(run, *, code: int) -> None:
    assert run.exit_code == code, run
    assert "Traceback" not in run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == (1 if code else 0), run.stderr


def assert_blocked(path: Path, *args: str) -> None:
    """The report is printed and the verdict is one error line with exit code 1, in process and out."""
    for run in (run_cli("inspect", path, *args), run_subprocess("inspect", path, *args)):
        assert_clean_error(run, path, code=1)
        assert "Traceback" not in run.stdout


def assert_danger_everywhere(path: Path, marker: Path) -> None:
    """The library and both CLIs report the os.system danger; the marker never appears."""
    try:
        findings = open_checkpoint(path).findings
    except SurgeryError as error:
        findings = error.findings
    assert not marker.exists()
    assert any(f.severity == "danger" and "os.system" in f.message for f in findings), findings
    for run in (run_cli("inspect", path), run_subprocess("inspect", path)):
        assert not marker.exists()
        assert_clean_error(run, path, code=1)
        assert "danger:" in run.stdout + run.stderr, run


def prove_with_python_zipfile(path: Path, marker: Path) -> None:
    """Python's zipfile (the last copy of a name wins) plus plain pickle run the payload."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import pickle, zipfile\n"
        f"pickle.loads(zipfile.ZipFile(sys.argv[1]).read({DATA_PKL!r}))"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=60)
    assert marker.exists(), "the payload did not run: this test would prove nothing"
    marker.unlink()


def prove_with_torch_load(path: Path, marker: Path) -> None:
    """torch.load(weights_only=False), as users run it, runs the payload (harmless: it touches a file)."""
    with contextlib.suppress(Exception):
        torch.load(path, weights_only=False)
    assert marker.exists(), "torch.load did not run the payload: this test would prove nothing"
    marker.unlink()


# -- members with the same name -----------------------------------------------------------------


@pytest.mark.parametrize("payload_copy", ["second", "first"])
def test_data_pkl_twice_with_a_payload_in_either_copy_is_reported(tmp_path, payload_copy):
    marker = tmp_path / "MARKER"
    copies = [STATE_PKL, payload_pickle(marker)]
    if payload_copy == "first":
        copies.reverse()
    members = [(DATA_PKL, copies[0]), (DATA_PKL, copies[1]), *torch_members(b"")[1:]]
    path = write_members(tmp_path / "model.pth", members)
    if payload_copy == "second":
        prove_with_python_zipfile(path, marker)  # Python's zipfile reads the last copy
    else:
        prove_with_torch_load(path, marker)  # torch's reader takes the first

    assert_danger_everywhere(path, marker)
    ckpt = open_checkpoint(path)
    dupes = [f for f in ckpt.findings if f.severity == "corrupt" and "appears 2 times" in f.message]
    assert dupes, ckpt.findings
    assert not ckpt.safe
    assert_blocked(path)
    ckpt.state_dict()
    assert not marker.exists()


def test_data_pkl_twice_with_a_broken_first_copy_still_reports_the_payload_in_the_second(tmp_path):
    marker = tmp_path / "MARKER"
    broken = STATE_PKL[:-10]
    members = [(DATA_PKL, broken), (DATA_PKL, payload_pickle(marker)), *torch_members(b"")[1:]]
    path = write_members(tmp_path / "model.pth", members)
    prove_with_python_zipfile(path, marker)

    assert_danger_everywhere(path, marker)


def test_storage_member_twice_with_different_bytes_is_corrupt(tmp_path):
    members = torch_members(STATE_PKL)
    key = next(iter(STORAGES))
    members.append((f"{PREFIX}/data/{key}", bytes(len(STORAGES[key]))))
    path = write_members(tmp_path / "model.pth", members)

    assert findings_of(path, "corrupt", "appears 2 times")
    assert_blocked(path)


@pytest.mark.parametrize("layout", ["only_a_differently_cased_copy", "differently_cased_copy_first"])
def test_data_pkl_under_a_differently_cased_name_is_scanned_too(tmp_path, layout):
    # torch's zip reader looks member names up case-insensitively: it loads `Data.pkl`.
    marker = tmp_path / "MARKER"
    evil = (f"{PREFIX}/Data.pkl", payload_pickle(marker))
    rest = torch_members(b"")[1:]
    if layout == "only_a_differently_cased_copy":
        members = [evil, *rest]
    else:
        members = [evil, (DATA_PKL, STATE_PKL), *rest]
    path = write_members(tmp_path / "model.pth", members)
    prove_with_torch_load(path, marker)

    assert_danger_everywhere(path, marker)


# -- headers that disagree ----------------------------------------------------------------------


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_local_header_naming_another_file_than_the_central_directory_is_corrupt(tmp_path, member):
    name = f"{PREFIX}/{member}"
    local = _info(RAW, name).header_offset
    raw = patch(RAW, local + 30 + len(name) - 1, b"X")  # last letter of the local header's name
    path = write(tmp_path, raw)

    found = findings_of(path, "corrupt", "local header names")
    assert found and name in found[0].message, found
    assert_blocked(path)
    assert path.read_bytes() == raw


@pytest.mark.parametrize("bits", [0x2, 0x4, 0x6])
def test_unusual_flag_bits_are_a_notice_and_the_weights_still_read(tmp_path, bits):
    raw = RAW
    for name in (DATA_PKL, f"{PREFIX}/data/0"):
        raw = set_flag_bits(raw, name, bits)
    path = write(tmp_path, raw)

    ckpt = open_checkpoint(path)
    notices = [f for f in ckpt.findings if f.severity == "notice" and "unusual zip flag bits" in f.message]
    assert len(notices) == 2, ckpt.findings
    assert ckpt.safe
    loaded = ckpt.state_dict()
    for key, tensor in STATE.items():
        assert torch.equal(loaded[key], tensor)
    for run in (run_cli("inspect", path), run_subprocess("inspect", path)):
        assert_opens_cleanly(run, code=0)
        assert "unusual zip flag bits" in run.stdout


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_encrypted_member_is_corrupt(tmp_path, member):
    path = write(tmp_path, set_flag_bits(RAW, f"{PREFIX}/{member}", 0x1))

    try:
        findings = open_checkpoint(path).findings
    except SurgeryError as error:
        findings = error.findings
    assert any(f.severity == "corrupt" and "encrypted" in f.message for f in findings), findings
    assert_blocked(path)


# -- CRCs ---------------------------------------------------------------------------------------


def test_bad_crc_on_a_storage_is_a_notice_found_by_verify(tmp_path):
    name = f"{PREFIX}/data/0"
    at = _data_offset(RAW, name)
    raw = patch(RAW, at, bytes([RAW[at] ^ 0xFF]))
    path = write(tmp_path, raw)

    assert not [f for f in open_checkpoint(path).findings if "CRC" in f.message]
    crc = findings_of(path, "notice", "CRC mismatch", verify=True)
    assert crc and name in crc[0].message, crc
    assert open_checkpoint(path, verify=True).safe
    for run in (run_cli("inspect", "--verify", path), run_subprocess("inspect", "--verify", path)):
        assert_opens_cleanly(run, code=0)
        assert "CRC mismatch" in run.stdout and name in run.stdout
    assert path.read_bytes() == raw


def test_bad_crc_on_data_pkl_is_a_notice_without_verify(tmp_path):
    assert RAW.count(b"conv.bias") == 1
    raw = RAW.replace(b"conv.bias", b"conv.bIas")  # still a valid pickle, no longer its CRC
    path = write(tmp_path, raw)

    crc = findings_of(path, "notice", "CRC mismatch")
    assert crc and DATA_PKL in crc[0].message, crc
    ckpt = open_checkpoint(path)
    assert [t.name for t in ckpt.tensors] == ["conv.weight", "conv.bIas", "steps"]
    assert ckpt.safe
    run = run_cli("inspect", path)
    assert_opens_cleanly(run, code=0)
    assert "CRC mismatch" in run.stdout


# -- storages and the tensors that use them -----------------------------------------------------


def test_storage_member_no_tensor_uses_is_a_notice(tmp_path):
    path = write_torch_zip(tmp_path / "model.pth", STATE_PKL, {**STORAGES, "99": b"hidden bytes"})

    found = findings_of(path, "notice", "not used by any tensor")
    assert found and "'99'" in found[0].message and "12 bytes" in found[0].message, found
    ckpt = open_checkpoint(path)
    assert ckpt.safe and ckpt.num_tensors == len(STATE)
    assert_opens_cleanly(run_cli("inspect", path), code=0)


SINGLE = {"w": torch.arange(77, dtype=torch.float32)}
SINGLE_PKL, SINGLE_STORAGES = _parts(torch_save_bytes(SINGLE))


def _edit_int(data_pkl: bytes, which: str, value: int) -> bytes:
    """Rewrite one BININT1 of a one-tensor torch pickle: the storage's numel, the offset or the size."""
    ops = list(pickletools.genops(data_pkl))
    persid = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    if which == "numel":
        index = max(i for i in range(persid) if ops[i][0].name == "BININT1")
    elif which == "offset":
        index = persid + 1
    else:  # size: the first int after the offset
        index = next(i for i in range(persid + 2, len(ops)) if ops[i][0].name == "BININT1")
    op, arg, pos = ops[index]
    assert op.name == "BININT1" and arg == (0 if which == "offset" else 77), (which, op.name, arg)
    return data_pkl[: pos + 1] + bytes([value]) + data_pkl[pos + 2 :]


@pytest.mark.parametrize(
    "damage",
    ["size_runs_past_the_storage", "offset_runs_past_the_storage", "storage_member_truncated"],
)
def test_tensor_reaching_past_its_storage_is_corrupt_and_not_read(tmp_path, damage):
    data_pkl, storages = SINGLE_PKL, dict(SINGLE_STORAGES)
    if damage == "size_runs_past_the_storage":
        data_pkl = _edit_int(data_pkl, "size", 200)
    elif damage == "offset_runs_past_the_storage":
        data_pkl = _edit_int(data_pkl, "offset", 50)
    else:
        storages["0"] = storages["0"][: len(storages["0"]) // 2]
    path = write_torch_zip(tmp_path / "model.pth", data_pkl, storages)
    before = path.read_bytes()

    ckpt = open_checkpoint(path)
    corrupt = [f for f in ckpt.findings if f.severity == "corrupt"]
    assert any("'w'" in f.message or "'0'" in f.message for f in corrupt), ckpt.findings
    assert not ckpt.safe
    with pytest.raises(SurgeryError):
        ckpt.tensor("w")
    with pytest.raises(SurgeryError):
        ckpt.state_dict()
    assert_blocked(path)
    assert path.read_bytes() == before


def test_storage_numel_larger_than_its_member_is_corrupt(tmp_path):
    path = write_torch_zip(tmp_path / "model.pth", _edit_int(SINGLE_PKL, "numel", 200), SINGLE_STORAGES)

    found = findings_of(path, "corrupt", "declares 800 bytes")
    assert found and "308" in found[0].message, found
    assert_blocked(path)


def test_storage_member_that_does_not_exist_is_corrupt(tmp_path):
    path = write_torch_zip(tmp_path / "model.pth", SINGLE_PKL, {})

    found = findings_of(path, "corrupt", "not in the file")
    assert found and "'0'" in found[0].message, found
    ckpt = open_checkpoint(path)
    assert ckpt.num_tensors == 1 and not ckpt.safe
    with pytest.raises(SurgeryError):
        ckpt.tensor("w")
    assert_blocked(path)


# -- damage after the pickle: the payload still reported ----------------------------------------


def test_payload_is_still_reported_when_a_later_member_is_damaged(tmp_path):
    marker = tmp_path / "MARKER"
    path = write_torch_zip(tmp_path / "staged.pth", payload_pickle(marker), STORAGES)
    raw = path.read_bytes()
    prove_with_python_zipfile(path, marker)
    # The byteorder member's local header loses its signature: readers cannot find its bytes.
    raw = patch(raw, _info(raw, f"{PREFIX}/byteorder").header_offset, b"PK\x07\x08")
    path = write(tmp_path, raw)

    assert_danger_everywhere(path, marker)


# -- not a (whole) checkpoint -------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.9, "all_but_one_byte", "all_but_the_end_record"])
def test_truncated_zip_is_one_clean_error(tmp_path, keep):
    if keep == "all_but_one_byte":
        size = len(RAW) - 1
    elif keep == "all_but_the_end_record":
        size = RAW.rfind(b"PK\x05\x06")
    else:
        size = int(len(RAW) * keep)
    path = write(tmp_path, RAW[:size])

    with pytest.raises(SurgeryError):
        open_checkpoint(path)
    for run in (run_cli("inspect", path), run_subprocess("inspect", path)):
        assert_clean_error(run, path, code=1)
    assert path.read_bytes() == RAW[:size]


def _zip_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, blob in members:
            zf.writestr(name, blob)
    return buf.getvalue()


@pytest.mark.parametrize(
    "raw, says",
    [
        (_zip_of([("readme.txt", b"hello")]), "not a torch checkpoint"),
        (_zip_of([]), "not a torch checkpoint"),
        (_zip_of([("a/b/data.pkl", pickle.dumps({"w": 1}, protocol=2))]), "not a torch checkpoint"),
    ],
    ids=["text_file", "empty_zip", "data_pkl_too_deep"],
)
def test_zip_that_is_not_a_checkpoint_is_one_clean_error(tmp_path, raw, says):
    path = write(tmp_path, raw, "archive.zip")

    with pytest.raises(SurgeryError):
        open_checkpoint(path)
    for run in (run_cli("inspect", path), run_subprocess("inspect", path)):
        assert_clean_error(run, path, contains=says, code=1)
    assert path.read_bytes() == raw


def test_compressed_data_pkl_holding_a_payload_is_reported(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in torch_members(payload_pickle(marker)):
            zf.writestr(name, blob)
    prove_with_python_zipfile(path, marker)

    assert_danger_everywhere(path, marker)
    ckpt = open_checkpoint(path)
    loaded = ckpt.state_dict()
    assert torch.equal(loaded["conv.weight"], STATE["conv.weight"])
    assert not marker.exists()
