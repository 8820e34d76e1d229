"""Hostile pickles: every route a pickle has to run code is reported as a danger, and never runs.

Each payload here is real: loading the same bytes with plain `pickle` creates a
marker file (checked first, so a payload that proves nothing fails the test).
Then surgery reads the file through the library and the in-process CLI, and the
marker must never appear. A real `python -m surgery` process reads one case of
each family too (and the payload that names torch, which that process has not
imported): the other cases take the same path through the same code, and a
process costs a quarter of a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess, torch_save_bytes, write_torch_zip

from surgery import SurgeryError, open_checkpoint

# -- a real state dict to hide payloads beside -------------------------------------------------

STATE = {
    "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2),
    "conv.bias": torch.tensor([0.5, -1.5]),
    "steps": torch.tensor(7),
}


def _zip_parts(raw: bytes) -> tuple[bytes, dict[str, bytes]]:
    """data.pkl and the storage members of a torch.save archive."""
    zf = zipfile.ZipFile(io.BytesIO(raw))
    prefix = zf.namelist()[0].split("/")[0]
    storages = {
        name[len(f"{prefix}/data/") :]: zf.read(name)
        for name in zf.namelist()
        if name.startswith(f"{prefix}/data/")
    }
    return zf.read(f"{prefix}/data.pkl"), storages


def _pickle_end(data: bytes, start: int) -> int:
    """Offset just past the STOP of the pickle starting at `start`."""
    for op, _, pos in pickletools.genops(data[start:]):
        if op.name == "STOP":
            return start + pos + 1
    raise AssertionError("no STOP")


def _legacy_parts(raw: bytes) -> list[bytes]:
    """magic, protocol, sys_info, object, storage keys pickles, then the storage bytes."""
    parts, pos = [], 0
    for _ in range(5):
        end = _pickle_end(raw, pos)
        parts.append(raw[pos:end])
        pos = end
    return [*parts, raw[pos:]]


STATE_PKL, STATE_STORAGES = _zip_parts(torch_save_bytes(STATE))
LEGACY = _legacy_parts(torch_save_bytes(STATE, _use_new_zipfile_serialization=False))
LEGACY_MAGIC_PICKLE = LEGACY[0]

# -- opcode helpers ---------------------------------------------------------------------------


def u(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def binbytes(raw: bytes) -> bytes:
    """BINBYTES."""
    return b"B" + struct.pack("<I", len(raw)) + raw


def text_string(text: str) -> bytes:
    """Protocol 0 STRING, quoted."""
    assert "'" not in text and "\\" not in text
    return b"S'" + text.encode() + b"'\n"


def touch(marker: Path) -> str:
    return f"touch {marker}"


# -- the payloads: each pushes one value, and creating it creates the marker --------------------


@dataclass(frozen=True)
class Payload:
    build: Callable[[Path], bytes]  # marker -> opcodes that push one value
    proto: int  # protocol the opcodes need (0: text pickle, no PROTO)
    expect: tuple[str, ...]  # each appears in some danger finding
    setup: str = ""  # what the loading process must have done (copyreg extensions)
    nested: bool = False  # the os.system hides in a nested pickle
    needs_torch: bool = False  # proving it needs torch: done in this process, which has it


def _global_reduce(m: Path) -> bytes:
    return b"cos\nsystem\n" + u(touch(m)) + b"\x85R"


def _stack_global(m: Path) -> bytes:
    return u("os") + u("system") + b"\x93" + u(touch(m)) + b"\x85R"


def _memo_names(m: Path) -> bytes:
    # The names are memoised, popped, and only come back through BINGET / LONG_BINGET.
    return (
        u("o" + "s")
        + b"q\xc8"
        + b"0"
        + u("sys" + "tem")
        + b"r"
        + struct.pack("<I", 1000)
        + b"0"
        + b"h\xc8"
        + b"j"
        + struct.pack("<I", 1000)
        + b"\x93"
        + u(touch(m))
        + b"\x85R"
    )


def _dotted(m: Path) -> bytes:
    return u("pathlib") + u("os.system") + b"\x93" + u(touch(m)) + b"\x85R"


def _getattr_chain(m: Path) -> bytes:
    return (
        b"cbuiltins\ngetattr\n"
        + b"cbuiltins\n__import__\n"
        + u("os")
        + b"\x85R"
        + u("system")
        + b"\x86R"
        + u(touch(m))
        + b"\x85R"
    )


def _inst(m: Path) -> bytes:
    return b"(" + text_string(touch(m)) + b"ios\nsystem\n"


def _obj(m: Path) -> bytes:
    return b"(cos\nsystem\n" + text_string(touch(m)) + b"o"


def _text_protocol_0(m: Path) -> bytes:
    return b"cos\nsystem\n(" + text_string(touch(m)) + b"tR"


def _inner(m: Path) -> bytes:
    return b"\x80\x02" + _global_reduce(m) + b"."


def _nested_pickle_loads(m: Path) -> bytes:
    return b"cpickle\nloads\n" + binbytes(_inner(m)) + b"\x85R"


def _nested_twice(m: Path) -> bytes:
    middle = b"\x80\x02" + _nested_pickle_loads(m) + b"."
    return b"c_pickle\nloads\n" + binbytes(middle) + b"\x85R"


def _nested_torch_load_from_bytes(m: Path) -> bytes:
    return b"ctorch.storage\n_load_from_bytes\n" + binbytes(_inner(m)) + b"\x85R"


def _newobj(m: Path) -> bytes:
    # functools.partial.__new__(partial, os.system, cmd), then called with no arguments.
    return b"cfunctools\npartial\n" + b"cos\nsystem\n" + u(touch(m)) + b"\x86\x81" + b")R"


def _newobj_ex(m: Path) -> bytes:
    return b"cfunctools\npartial\n" + b"cos\nsystem\n" + u(touch(m)) + b"\x86}\x92" + b")R"


def _ext1(m: Path) -> bytes:
    return b"\x82\x42" + u(touch(m)) + b"\x85R"


def _ext2(m: Path) -> bytes:
    return b"\x83" + struct.pack("<H", 0x1234) + u(touch(m)) + b"\x85R"


def _open_for_writing(m: Path) -> bytes:
    return b"cbuiltins\nopen\n" + u(str(m)) + u("w") + b"\x86R"


def _subprocess_check_call(m: Path) -> bytes:
    return b"csubprocess\ncheck_call\n(" + u("touch") + u(str(m)) + b"l\x85R"


def _python2_eval(m: Path) -> bytes:
    return b"c__builtin__\neval\n" + u(f"__import__('os').system('{touch(m)}')") + b"\x85R"


PAYLOADS: dict[str, Payload] = {
    "global_reduce": Payload(_global_reduce, 2, ("os.system (GLOBAL)", "touch")),
    "stack_global": Payload(_stack_global, 4, ("os.system (STACK_GLOBAL)", "touch")),
    "names_through_the_memo": Payload(_memo_names, 4, ("os.system (STACK_GLOBAL)",)),
    "dotted_name": Payload(_dotted, 4, ("pathlib + os.system",)),
    "getattr_import_chain": Payload(
        _getattr_chain, 2, ("builtins.getattr", "builtins.__import__", "calls the result of another call")
    ),
    "inst": Payload(_inst, 0, ("os.system (INST)", "touch")),
    "obj": Payload(_obj, 0, ("os.system", "touch")),
    "text_protocol_0": Payload(_text_protocol_0, 0, ("os.system (GLOBAL)", "touch")),
    "nested_pickle_loads": Payload(_nested_pickle_loads, 2, ("pickle.loads",), nested=True),
    "nested_twice": Payload(_nested_twice, 2, ("_pickle.loads",), nested=True),
    "nested_torch_load_from_bytes": Payload(
        _nested_torch_load_from_bytes, 2, ("torch.storage._load_from_bytes",), nested=True, needs_torch=True
    ),
    "newobj_unknown_class": Payload(_newobj, 2, ("functools.partial", "calls the result of another call")),
    "newobj_ex_unknown_class": Payload(
        _newobj_ex, 4, ("functools.partial", "calls the result of another call")
    ),
    "ext1": Payload(
        _ext1, 2, ("extension code 66",), setup="import copyreg; copyreg.add_extension('os', 'system', 66)"
    ),
    "ext2": Payload(
        _ext2,
        2,
        ("extension code 4660",),
        setup="import copyreg; copyreg.add_extension('os', 'system', 0x1234)",
    ),
    "builtins_open": Payload(_open_for_writing, 2, ("builtins.open",)),
    "subprocess_check_call": Payload(_subprocess_check_call, 2, ("subprocess.check_call",)),
    "python2_builtin_eval": Payload(_python2_eval, 2, ("builtins.eval",)),
}


def standalone(payload: Payload, marker: Path) -> bytes:
    """The payload as a whole pickle."""
    head = b"\x80" + bytes([payload.proto]) if payload.proto >= 2 else b""
    return head + payload.build(marker) + b"."


def beside_weights(payload: Payload, marker: Path, state_pkl: bytes, tail: bytes = b"s.") -> bytes:
    """{"hook": <payload>, "weights": <the state dict>}: the payload runs before any tensor is rebuilt."""
    head = b"\x80" + bytes([max(2, payload.proto)])
    assert state_pkl[:1] == b"\x80" and state_pkl[-1:] == b"."
    return head + b"}" + u("hook") + payload.build(marker) + b"s" + u("weights") + state_pkl[2:-1] + tail


# -- proving a payload is real, and that surgery never runs it ----------------------------------

PLAIN_LOAD = 'import pickle,sys; pickle.loads(open(sys.argv[1],"rb").read())'
# A legacy torch file is pickles in a row; torch.load reads them in turn.
SEQUENTIAL_LOAD = "import pickle,sys\nf = open(sys.argv[1], 'rb')\nwhile True: pickle.load(f)"
# The payloads run before any tensor is rebuilt: the proving process need not spend
# seconds importing torch for the tensors that follow (their GLOBAL then fails).
NO_TORCH = "import sys; sys.modules['torch'] = None"


# The cases of each parametrized family that a real `python -m surgery` process reads as well.
IN_A_PROCESS = frozenset({"global_reduce", "nested_torch_load_from_bytes"})
PROTOCOL_IN_A_PROCESS = 2  # torch.save's own


def prove_payload_runs(
    data_file: Path, marker: Path, *, setup: str = "", sequential: bool = False, in_process: bool = False
) -> None:
    """Plain pickle runs these bytes and creates the marker; then the marker is removed."""
    assert not marker.exists()
    if in_process:  # torch is imported here already; a subprocess would spend seconds importing it
        with open(data_file, "rb") as f, contextlib.suppress(Exception):
            while True:
                pickle.load(f)
                if not sequential:
                    break
    else:
        script = NO_TORCH + "\n" + setup + "\n" + (SEQUENTIAL_LOAD if sequential else PLAIN_LOAD)
        # -S: plain pickle needs no site-packages, and skipping them saves ~80 ms a process
        subprocess.run([sys.executable, "-S", "-c", script, str(data_file)], capture_output=True, timeout=60)
    assert marker.exists(), "plain pickle did not run the payload: this test would prove nothing"
    marker.unlink()


def danger_findings(findings) -> list:
    return [f for f in findings if f.severity == "danger"]


def assert_expected_dangers(findings, payload_expect: tuple[str, ...], nested: bool = False) -> None:
    dangers = danger_findings(findings)
    assert dangers, findings
    for text in payload_expect:
        assert any(text in f.message for f in dangers), (text, findings)
    if nested:
        inner = [f for f in dangers if "nested pickle" in f.where and "os.system" in f.message]
        assert inner, findings


def inspect_runs(path: Path, in_a_process: bool) -> list:
    """`surgery inspect PATH` in-process, and as a real process when asked."""
    return [run_cli("inspect", path), *([run_subprocess("inspect", path)] if in_a_process else [])]


def assert_reported_and_never_run(
    path: Path, marker: Path, expect: tuple[str, ...], nested: bool = False, *, in_a_process: bool = True
):
    """Library, in-process CLI, real process (if asked) and --json all report the danger; nothing runs."""
    ckpt = open_checkpoint(path)
    assert not marker.exists()
    assert_expected_dangers(ckpt.findings, expect, nested)
    assert ckpt.safe is False

    for run in inspect_runs(path, in_a_process):
        assert not marker.exists()
        assert_clean_error(run, path, code=1)
        assert "danger:" in run.stdout, run.stdout

    run = run_cli("inspect", "--json", path)
    assert not marker.exists()
    assert run.exit_code == 1, run
    assert "Traceback" not in run.stdout + run.stderr
    doc = json.loads(run.stdout)
    assert doc["safe"] is False
    assert any(f["severity"] == "danger" for f in doc["findings"]), doc["findings"]
    for text in expect:
        assert any(f["severity"] == "danger" and text in f["message"] for f in doc["findings"]), text
    return ckpt


def assert_refused_with_danger(
    path: Path, marker: Path, expect: tuple[str, ...], *, in_a_process: bool = True
) -> None:
    """The danger is reported whether or not the rest of the file can be read."""
    try:
        findings = open_checkpoint(path).findings
    except SurgeryError as error:
        findings = error.findings
    assert not marker.exists()
    assert_expected_dangers(findings, expect)
    for run in inspect_runs(path, in_a_process):
        assert not marker.exists()
        assert_clean_error(run, path, code=1)
        assert "danger:" in run.stdout + run.stderr, run


def assert_weights_intact_and_payload_inert(ckpt, marker: Path) -> None:
    """The tree still shows the real tensors, and reading them runs nothing."""
    assert ckpt.container == ("weights",)
    assert [t.name for t in ckpt.tensors] == list(STATE)
    loaded = ckpt.state_dict()
    assert not marker.exists()
    assert set(loaded) == set(STATE)
    for name, tensor in STATE.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(ckpt.tensor("conv.weight"), STATE["conv.weight"])
    assert not marker.exists()


def write_legacy(path: Path, object_pickle: bytes, *, magic: bytes | None = None, keys: bytes | None = None):
    magic_pickle, version, sys_info, _, storage_keys, storages = LEGACY
    path.write_bytes(
        (magic or magic_pickle) + version + sys_info + object_pickle + (keys or storage_keys) + storages
    )
    return path


# -- every route, in every container ----------------------------------------------------------


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_as_a_plain_pickle_is_reported_and_never_runs(tmp_path, name):
    payload = PAYLOADS[name]
    marker = tmp_path / "MARKER"
    path = tmp_path / "payload.pkl"
    path.write_bytes(standalone(payload, marker))
    prove_payload_runs(path, marker, setup=payload.setup, in_process=payload.needs_torch)

    assert_reported_and_never_run(
        path, marker, payload.expect, payload.nested, in_a_process=name in IN_A_PROCESS
    )


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_in_torch_zip_beside_real_weights_is_reported_and_never_runs(tmp_path, name):
    payload = PAYLOADS[name]
    marker = tmp_path / "MARKER"
    data_pkl = beside_weights(payload, marker, STATE_PKL)
    (tmp_path / "data.pkl").write_bytes(data_pkl)
    prove_payload_runs(tmp_path / "data.pkl", marker, setup=payload.setup, in_process=payload.needs_torch)
    path = write_torch_zip(tmp_path / "model.pth", data_pkl, STATE_STORAGES)

    ckpt = assert_reported_and_never_run(
        path, marker, payload.expect, payload.nested, in_a_process=name in IN_A_PROCESS
    )
    assert ckpt.format == "torch-zip"
    assert_weights_intact_and_payload_inert(ckpt, marker)


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_in_legacy_torch_file_is_reported_and_never_runs(tmp_path, name):
    payload = PAYLOADS[name]
    marker = tmp_path / "MARKER"
    path = write_legacy(tmp_path / "legacy.pth", beside_weights(payload, marker, LEGACY[3]))
    prove_payload_runs(path, marker, setup=payload.setup, sequential=True, in_process=payload.needs_torch)

    ckpt = assert_reported_and_never_run(
        path, marker, payload.expect, payload.nested, in_a_process=name in IN_A_PROCESS
    )
    assert ckpt.format == "torch-legacy"
    assert_weights_intact_and_payload_inert(ckpt, marker)


@pytest.mark.parametrize("keeps_magic_value", [True, False], ids=["magic_value_kept", "magic_value_replaced"])
@pytest.mark.parametrize("name", ["global_reduce", "stack_global", "getattr_import_chain", "inst"])
def test_payload_hidden_in_the_legacy_magic_number_pickle_is_reported(tmp_path, name, keeps_magic_value):
    # Kept: the first pickle still yields the magic number (the payload's result is
    # popped) and torch.load goes on. Replaced: torch.load says "Invalid magic number",
    # after the payload ran. Either way plain pickle.loads of the file runs it.
    payload = PAYLOADS[name]
    marker = tmp_path / "MARKER"
    if keeps_magic_value:
        magic = LEGACY_MAGIC_PICKLE[:-1] + payload.build(marker) + b"0."
    else:
        magic = LEGACY_MAGIC_PICKLE[:-1] + b"0" + payload.build(marker) + b"."
    path = write_legacy(tmp_path / "legacy.pth", LEGACY[3], magic=magic)
    prove_payload_runs(path, marker)

    assert_refused_with_danger(path, marker, payload.expect, in_a_process=name in IN_A_PROCESS)


# -- pickles written by Python's own pickle.dumps of a __reduce__ ---------------------------------


class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class OpensFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class CallsSubprocess:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (subprocess.call, (["touch", self.path],))


REDUCERS = {
    "os_system": (lambda m: RunsCommand(touch(m)), "system"),
    "open": (lambda m: OpensFile(str(m)), "open"),
    "subprocess_call": (lambda m: CallsSubprocess(str(m)), "subprocess.call"),
}


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("reducer", REDUCERS)
def test_reduce_payload_from_pickle_dumps_is_reported_and_never_runs(tmp_path, reducer, protocol):
    make, expect = REDUCERS[reducer]
    marker = tmp_path / "MARKER"
    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps(make(marker), protocol=protocol))
    prove_payload_runs(path, marker)

    assert_reported_and_never_run(path, marker, (expect,), in_a_process=protocol == PROTOCOL_IN_A_PROCESS)


@pytest.mark.parametrize("protocol", range(6))
def test_reduce_payload_after_other_data_in_a_plain_pickle_is_reported(tmp_path, protocol):
    # A pickle need not start with its payload: here 300 bytes of ordinary data come first.
    marker = tmp_path / "MARKER"
    path = tmp_path / "payload.pkl"
    path.write_bytes(
        pickle.dumps({"padding": "x" * 300, "hook": RunsCommand(touch(marker))}, protocol=protocol)
    )
    prove_payload_runs(path, marker)

    assert_reported_and_never_run(path, marker, ("system",), in_a_process=protocol == PROTOCOL_IN_A_PROCESS)


@pytest.mark.parametrize("protocol", range(6))
def test_reduce_payload_saved_by_torch_save_in_a_zip_is_reported(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    raw = torch_save_bytes({"hook": RunsCommand(touch(marker)), "weights": STATE}, pickle_protocol=protocol)
    data_pkl, _ = _zip_parts(raw)
    (tmp_path / "data.pkl").write_bytes(data_pkl)
    prove_payload_runs(tmp_path / "data.pkl", marker)
    path = tmp_path / "model.pth"
    path.write_bytes(raw)

    assert_refused_with_danger(path, marker, ("system",), in_a_process=protocol == PROTOCOL_IN_A_PROCESS)
    if protocol >= 1:  # torch writes protocol 0 persistent ids that torch.load itself cannot read
        ckpt = assert_reported_and_never_run(
            path, marker, ("system",), in_a_process=protocol == PROTOCOL_IN_A_PROCESS
        )
        assert_weights_intact_and_payload_inert(ckpt, marker)


@pytest.mark.parametrize("protocol", range(6))
def test_reduce_payload_saved_by_legacy_torch_save_is_reported(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    raw = torch_save_bytes(
        {"hook": RunsCommand(touch(marker)), "weights": STATE},
        pickle_protocol=protocol,
        _use_new_zipfile_serialization=False,
    )
    path = tmp_path / "legacy.pth"
    path.write_bytes(raw)
    prove_payload_runs(path, marker, sequential=True)

    assert_refused_with_danger(path, marker, ("system",), in_a_process=protocol == PROTOCOL_IN_A_PROCESS)
    if protocol >= 1:  # torch.load reads these files back (protocol 0: its persistent ids are str)
        ckpt = assert_reported_and_never_run(
            path, marker, ("system",), in_a_process=protocol == PROTOCOL_IN_A_PROCESS
        )
        assert_weights_intact_and_payload_inert(ckpt, marker)


# -- a payload, then something broken: the finding still comes first ---------------------------

BREAKAGES = {
    "unknown_opcode": b"\xff",
    "truncated": b"X\xff\xff\x00\x00abc",
    "no_stop": b"",
}


def _assert_finding_then_one_error(run, path: Path) -> None:
    assert_clean_error(run, path, code=1)
    lines = run.stderr.splitlines()
    error_at = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    danger_at = [i for i, line in enumerate(lines) if "danger:" in line and "os.system" in line]
    assert danger_at and max(danger_at) < error_at, run.stderr


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("container", ["plain", "torch_zip", "legacy"])
def test_payload_followed_by_a_broken_pickle_is_reported_before_the_error(tmp_path, container, breakage):
    payload = PAYLOADS["global_reduce"]
    marker = tmp_path / "MARKER"
    broken = b"\x80\x02}" + u("hook") + payload.build(marker) + b"s" + BREAKAGES[breakage]
    if container == "plain":
        path = tmp_path / "payload.pkl"
        path.write_bytes(broken)
        prove_payload_runs(path, marker)
    elif container == "torch_zip":
        (tmp_path / "data.pkl").write_bytes(broken)
        prove_payload_runs(tmp_path / "data.pkl", marker)
        path = write_torch_zip(tmp_path / "model.pth", broken, STATE_STORAGES)
    else:
        path = write_legacy(tmp_path / "legacy.pth", broken)
        prove_payload_runs(path, marker, sequential=True)

    with pytest.raises(SurgeryError) as caught:
        open_checkpoint(path)
    assert not marker.exists()
    assert_expected_dangers(caught.value.findings, ("os.system",))
    for run in inspect_runs(path, in_a_process=breakage == "unknown_opcode"):
        assert not marker.exists()
        _assert_finding_then_one_error(run, path)


def test_payload_in_legacy_object_followed_by_a_bad_storage_key_list_is_still_reported(tmp_path):
    marker = tmp_path / "MARKER"
    obj = beside_weights(PAYLOADS["global_reduce"], marker, LEGACY[3])
    path = write_legacy(tmp_path / "legacy.pth", obj, keys=pickle.dumps(5, protocol=2))
    prove_payload_runs(path, marker, sequential=True)

    # The broken key list is itself a finding: the file still inspects, the danger first.
    assert_reported_and_never_run(path, marker, ("os.system",))
    ckpt = open_checkpoint(path)
    assert any(f.severity == "corrupt" and "storage key list" in f.message for f in ckpt.findings)


# -- trailing data -----------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["plain", "torch_zip"])
def test_trailing_bytes_after_stop_are_a_notice_beside_the_danger(tmp_path, container):
    marker = tmp_path / "MARKER"
    payload = PAYLOADS["global_reduce"]
    data = standalone(payload, marker) if container == "plain" else beside_weights(payload, marker, STATE_PKL)
    trailing = b"\x00trailing bytes that no loader reads"
    data += trailing
    if container == "plain":
        path = tmp_path / "payload.pkl"
        path.write_bytes(data)
        prove_payload_runs(path, marker)
    else:
        (tmp_path / "data.pkl").write_bytes(data)
        prove_payload_runs(tmp_path / "data.pkl", marker)
        path = write_torch_zip(tmp_path / "model.pth", data, STATE_STORAGES)

    ckpt = assert_reported_and_never_run(path, marker, ("os.system",))
    notices = [f for f in ckpt.findings if f.severity == "notice" and "follow the pickle's STOP" in f.message]
    assert notices, ckpt.findings
    assert f"{len(trailing)} bytes" in notices[0].message


# -- files whose first bytes look like something else ------------------------------------------


def _sniffs_as_safetensors(m: Path) -> bytes:
    # Byte 8 is "{": the layout of a safetensors header.
    return b"\x80\x02" + u("a{b") + b"0" + _global_reduce(m) + b"."


def _starts_with_none(m: Path) -> bytes:
    return b"N0" + _global_reduce(m) + b"."


def _starts_with_a_string(m: Path) -> bytes:
    return text_string("harmless") + b"0" + _text_protocol_0(m) + b"."


@pytest.mark.parametrize(
    "build",
    [_sniffs_as_safetensors, _starts_with_none, _starts_with_a_string],
)
def test_pickle_whose_first_bytes_look_unusual_is_still_scanned_for_its_payload(tmp_path, build):
    # torch.load(weights_only=False) reads any of these as a legacy file: its first pickle runs.
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pth"
    path.write_bytes(build(marker))
    prove_payload_runs(path, marker)

    assert_refused_with_danger(path, marker, ("system",))


# -- gadgets that run code from modules outside the obvious list -------------------------------


def _cprofile_run(m: Path) -> bytes:
    return b"\x80\x02ccProfile\nrun\n" + u(f"__import__('os').system('{touch(m)}')") + b"\x85R."


def _pydoc_pipepager(m: Path) -> bytes:
    return b"\x80\x02cpydoc\npipepager\n" + u("") + u(touch(m)) + b"\x86R."


@pytest.mark.parametrize("build", [_cprofile_run, _pydoc_pipepager])
def test_code_running_gadget_in_an_unlisted_module_is_a_danger(tmp_path, build):
    marker = tmp_path / "MARKER"
    path = tmp_path / "payload.pkl"
    path.write_bytes(build(marker))
    prove_payload_runs(path, marker)

    assert_reported_and_never_run(path, marker, ())


# -- sharded checkpoints -----------------------------------------------------------------------


def _write_shards(folder: Path, first: bytes, second: bytes) -> Path:
    folder.mkdir()
    (folder / "model-1.bin").write_bytes(first)
    (folder / "model-2.bin").write_bytes(second)
    index = folder / "model.bin.index.json"
    weight_map = {"conv.weight": "model-1.bin", "conv.bias": "model-2.bin"}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_payload_in_one_shard_is_reported_through_the_index(tmp_path):
    marker = tmp_path / "MARKER"
    first = torch_save_bytes({"conv.weight": STATE["conv.weight"], "hook": RunsCommand(touch(marker))})
    second = torch_save_bytes({"conv.bias": STATE["conv.bias"]})
    index = _write_shards(tmp_path / "sharded", first, second)

    ckpt = assert_reported_and_never_run(index, marker, ("system",))
    assert {t.name for t in ckpt.tensors} == {"conv.weight", "conv.bias"}
    ckpt.state_dict()
    assert not marker.exists()


def test_payload_in_one_shard_is_still_reported_when_a_later_shard_is_broken(tmp_path):
    marker = tmp_path / "MARKER"
    first = torch_save_bytes({"conv.weight": STATE["conv.weight"], "hook": RunsCommand(touch(marker))})
    second = torch_save_bytes({"conv.bias": STATE["conv.bias"]})
    index = _write_shards(tmp_path / "sharded", first, second[: len(second) // 2])

    with pytest.raises(SurgeryError) as caught:
        open_checkpoint(index)
    assert not marker.exists()
    assert_expected_dangers(caught.value.findings, ("system",))
    run = run_cli("inspect", index)
    assert not marker.exists()
    assert run.exit_code == 1, run
    assert "Traceback" not in run.stdout + run.stderr
    assert len([line for line in run.stderr.splitlines() if line.startswith("error: ")]) == 1, run.stderr
    assert "danger:" in run.stderr, run.stderr
