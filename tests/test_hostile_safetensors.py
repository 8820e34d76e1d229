"""Hostile safetensors headers, and resource bombs in pickles, headers and indexes.

A malformed safetensors file is one clean error line (and a SurgeryError from the
library) and stays byte for byte as it was. A resource bomb ends: with a result
or a clean error, never a traceback, RecursionError, MemoryError, crash or hang.
Bombs run first in a real process (timeout 60 s, address space capped) and only
then in this one, under an alarm.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess, torch_save_bytes, write_torch_zip

from surgery import SurgeryError, open_checkpoint

# -- safetensors --------------------------------------------------------------------------------


def st(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if len(raw) % 256 == ord("{"):  # keep the length's first byte from reading as "{" (tested below)
        raw += b" "
    return struct.pack("<Q", len(raw)) + raw + data


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


W = f32([2, 2], 0, 16)

MALFORMED: dict[str, tuple[bytes, str]] = {
    "header_length_just_over_100MB": (struct.pack("<Q", 100_000_001) + b'{"a": 1}', "limit"),
    "header_length_2_to_the_40": (struct.pack("<Q", 2**40) + b'{"a": 1}', "limit"),
    "header_length_2_to_the_64_minus_1": (struct.pack("<Q", 2**64 - 1) + b'{"a": 1}', "limit"),
    "header_longer_than_the_file": (struct.pack("<Q", 5000) + b'{"w": {}}', "truncated"),
    "json_does_not_parse": (st(b'{"w": {"dtype": "F32", '), "not valid JSON"),
    "json_not_utf8": (st(b'{"w\xff": 1}'), "UTF-8"),
    "json_integer_with_5000_digits": (
        st(b'{"w": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}', bytes(4)),
        "JSON",
    ),
    "json_nested_100000_deep": (st(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "JSON"),
    "duplicate_keys": (
        st(b'{"w": ' + json.dumps(W).encode() + b', "w": ' + json.dumps(W).encode() + b"}", bytes(16)),
        "twice",
    ),
    "unknown_dtype": (st({"w": {**W, "dtype": "F99"}}, bytes(16)), "unknown dtype"),
    "dtype_not_a_string": (st({"w": {**W, "dtype": 4}}, bytes(16)), "dtype"),
    "missing_fields": (st({"w": {"dtype": "F32"}}, bytes(16)), "needs dtype, shape and data_offsets"),
    "tensor_entry_not_an_object": (st({"w": 5}, bytes(16)), "needs dtype"),
    "negative_dimension": (st({"w": f32([-2, -2], 0, 16)}, bytes(16)), "shape"),
    "float_offsets": (st({"w": {**W, "data_offsets": [0, 16.0]}}, bytes(16)), "data_offsets"),
    "offsets_reversed": (st({"w": f32([0], 16, 0)}, bytes(16)), "data_offsets"),
    "shape_and_dtype_need_more_bytes_than_the_range": (st({"w": f32([2, 2], 0, 12)}, bytes(12)), "needs 16"),
    "shape_and_dtype_need_fewer_bytes_than_the_range": (st({"w": f32([2], 0, 16)}, bytes(16)), "needs 8"),
    "shape_whose_size_has_5000_digits": (st({"w": f32([2**62] * 300, 0, 4)}, bytes(4)), "at most 64 ints"),
    "shape_whose_size_overflows_int64": (
        st({"w": f32([2**62] * 8, 0, 4)}, bytes(4)),
        "more than 2**63 elements",
    ),
    "offsets_past_the_end_of_the_file": (st({"w": f32([2, 2], 0, 16)}, bytes(8)), "past the end"),
    "offsets_far_past_the_end": (st({"w": f32([2**40], 0, 2**42)}, bytes(8)), "past the end"),
    "overlapping_tensors": (st({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12)), "overlap"),
    "same_bytes_for_two_tensors": (st({"a": f32([2], 0, 8), "b": f32([2], 0, 8)}, bytes(8)), "overlap"),
    "gap_between_tensors": (
        st({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, bytes(20)),
        "belong to no tensor",
    ),
    "gap_before_the_first_tensor": (st({"a": f32([2], 4, 12)}, bytes(12)), "belong to no tensor"),
    "trailing_bytes_after_the_last_tensor": (st({"a": f32([2], 0, 8)}, bytes(12)), "after the last tensor"),
    "metadata_value_not_a_string": (st({"__metadata__": {"format": 1}, "w": W}, bytes(16)), "__metadata__"),
    "metadata_not_an_object": (st({"__metadata__": ["pt"], "w": W}, bytes(16)), "__metadata__"),
    "metadata_nested_object": (st({"__metadata__": {"a": {"b": "c"}}, "w": W}, bytes(16)), "__metadata__"),
    "header_a_json_array": (st(b'[{"w": 1}]', bytes(16)), ""),
    "header_a_json_string": (st(b'"weights"', bytes(16)), ""),
}


# One file for each step of the reader (length, JSON, entries, offsets, metadata) is read by a real
# process too; every file by the in-process CLI (the same code, without a quarter second's start-up).
MALFORMED_IN_A_PROCESS = frozenset(
    {
        "header_longer_than_the_file",
        "json_does_not_parse",
        "json_nested_100000_deep",
        "unknown_dtype",
        "overlapping_tensors",
        "metadata_not_an_object",
    }
)


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_safetensors_is_one_clean_error_and_left_unchanged(tmp_path, name):
    raw, says = MALFORMED[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)

    with pytest.raises(SurgeryError):
        open_checkpoint(path)
    runs = [run_cli("inspect", path)]
    if name in MALFORMED_IN_A_PROCESS:
        runs.append(run_subprocess("inspect", path))
    for run in runs:
        assert_clean_error(run, path, contains=says, code=1)
    assert path.read_bytes() == raw


@pytest.mark.parametrize("header_bytes", [123, 123 + 256, 32 + 123 * 256])
def test_valid_safetensors_whose_header_length_starts_with_a_brace_byte_is_read(tmp_path, header_bytes):
    # The spec lets a header be padded with spaces; here its length's first byte is "{" (or " {").
    raw = json.dumps({"w": f32([2], 0, 8)}).encode()
    raw += b" " * (header_bytes - len(raw))
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.5, -2.0))

    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert torch.equal(ckpt.tensor("w"), torch.tensor([1.5, -2.0]))
    run = run_cli("inspect", path)
    assert run.exit_code == 0, run


def _limit_address_space(megabytes: int):
    def apply() -> None:
        limit = megabytes << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


@pytest.mark.parametrize("declared", [100_000_001, 2**31, 2**40, 2**64 - 1])
def test_huge_declared_header_is_refused_without_allocating_it(tmp_path, declared):
    # 150 MiB of address space runs surgery on a small file; it cannot hold a 100 MB header.
    path = tmp_path / "model.safetensors"
    raw = struct.pack("<Q", declared) + b'{"w": 1}'
    path.write_bytes(raw)
    proc = inspect_with_memory_cap(path, 150)
    assert_clean_error(proc_run(proc), path, contains="limit", code=1)
    assert path.read_bytes() == raw


@pytest.mark.slow
def test_valid_file_with_30000_empty_tensors_reads(tmp_path):
    header = {f"t{i}": f32([0], 0, 0) for i in range(30_000)}
    path = tmp_path / "model.safetensors"
    path.write_bytes(st(header))
    with deadline():
        ckpt = open_checkpoint(path)
    assert ckpt.num_tensors == 30_000 and ckpt.safe


# -- running a bomb -----------------------------------------------------------------------------


class _Run:
    def __init__(self, exit_code: int, stdout: str, stderr: str):
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def __repr__(self) -> str:
        return (
            f"Run(exit_code={self.exit_code}, stdout={self.stdout[-500:]!r}, stderr={self.stderr[-1500:]!r})"
        )


def proc_run(proc: subprocess.CompletedProcess) -> _Run:
    return _Run(proc.returncode, proc.stdout, proc.stderr)


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """Interrupt this process if a call runs away (a hang in C code is caught by the subprocess run first)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_ends_cleanly(run, path: Path) -> None:
    """A result (exit 0 or 1 for findings) or one error line; no traceback, crash or internal error."""
    assert run.exit_code in (0, 1), run
    text = run.stdout + run.stderr
    assert "Traceback" not in text and "internal error" not in text, run
    assert "RecursionError" not in text and "MemoryError" not in text, run
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == (1 if run.exit_code else 0), run
    if errors:
        assert errors[0].startswith(f"error: {path}: "), errors[0]


def inspect_with_memory_cap(path: Path, mib: int) -> subprocess.CompletedProcess:
    """`python -m surgery inspect PATH` in a process that cannot map more than `mib` MiB."""
    return subprocess.run(
        [sys.executable, "-m", "surgery", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_address_space(mib),
    )


def run_bomb(path: Path, expect: str):
    """The bomb in a real process, then in this one. Returns the Checkpoint, or None on a clean error."""
    try:
        proc = inspect_with_memory_cap(path, 2048)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`surgery inspect {path.name}` still running after 60 s")
    assert_ends_cleanly(proc_run(proc), path)

    with deadline():
        try:
            ckpt = open_checkpoint(path)
            ckpt.findings, ckpt.tensors, ckpt.extras  # noqa: B018 - what a caller reads next
        except SurgeryError as error:
            ckpt = None
            assert error.message and str(path) == error.where
        run = run_cli("inspect", "--json", path)  # the text report ran in the real process above
        assert_ends_cleanly(run, path)
        if ckpt is not None:
            json.loads(run.stdout)
    if expect == "result":
        assert ckpt is not None, "a well-formed pickle must open"
    elif expect == "error":
        assert ckpt is None, "a malformed pickle must be refused"
        assert proc.returncode == 1
    elif expect == "refused":  # read to the end, the values too deep to hash stood in for
        assert ckpt is not None and not ckpt.safe
        assert any(f.severity == "corrupt" and "refused to build" in f.message for f in ckpt.findings)
        assert proc.returncode == 1
    return ckpt


# -- pickle bombs -------------------------------------------------------------------------------


def u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


M = 100_000  # memo indices the state dict's own pickle never uses
DEEP = 100_000


def _self_containing_list() -> bytes:
    return b"]" + put(M) + get(M) + b"a"


def _self_containing_dict() -> bytes:
    return b"}" + put(M) + u("me") + get(M) + b"s"


def _dicts_nested_by_setitem() -> bytes:
    return b"}" + (u("a") + b"}") * DEEP + b"s" * DEEP


def _dicts_nested_by_mark() -> bytes:
    return (b"(" + u("a")) * DEEP + b"}" + b"d" * DEEP


def _lists_nested() -> bytes:
    return b"]" * DEEP + b"a" * (DEEP - 1)


def _tuples_nested_by_tuple1() -> bytes:
    return b"N" + b"\x85" * DEEP


def _tuples_nested_by_mark() -> bytes:
    return b"(" * DEEP + b"t" * DEEP


def _frozensets_nested() -> bytes:
    return b"(" * DEEP + b"\x91" * DEEP


def _billion_laughs(container: bytes) -> bytes:
    """60 levels, each referencing the one below twice: 2**60 leaves if anything expands it."""
    out = b"]" + put(M) + b"0"
    for level in range(1, 61):
        if container == b"l":
            out += b"(" + get(M + level - 1) + get(M + level - 1) + b"l"
        else:
            out += b"(" + u("a") + get(M + level - 1) + u("b") + get(M + level - 1) + b"d"
        out += put(M + level) + b"0"
    return out + get(M + 60)


def _declared(opcode: bytes, fmt: str, size: int) -> bytes:
    return opcode + struct.pack(fmt, size) + b"only a few bytes follow"


def _tensor(shape: list[int], stride: list[int]) -> bytes:
    """A float tensor of storage "0" with this shape and stride."""

    def long1(value: int) -> bytes:
        raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw

    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"("
        + u("storage")
        + b"ctorch\nFloatStorage\n"
        + u("0")
        + u("cpu")
        + b"K\x01tQ"
        + b"K\x00"
        + b"("
        + b"".join(long1(d) for d in shape)
        + b"t("
        + b"".join(long1(s) for s in stride)
        + b"t\x89ccollections\nOrderedDict\n)Rt"
        + b"R"
    )


# name -> (opcodes that push one value, outcome expected: result | error | refused | either)
BOMBS: dict[str, tuple[bytes, str]] = {
    "list_that_contains_itself": (_self_containing_list(), "result"),
    "dict_that_contains_itself": (_self_containing_dict(), "result"),
    # deeper than pickle.dumps can write (pickle_vm.MAX_DEPTH): refused as soon as seen
    "dicts_nested_100000_deep_by_setitem": (_dicts_nested_by_setitem(), "error"),
    "dicts_nested_100000_deep_by_mark": (_dicts_nested_by_mark(), "error"),
    "lists_nested_100000_deep": (_lists_nested(), "error"),
    "tuples_nested_100000_deep_by_tuple1": (_tuples_nested_by_tuple1(), "refused"),
    "tuples_nested_100000_deep_by_mark": (_tuples_nested_by_mark(), "error"),
    "frozensets_nested_100000_deep": (_frozensets_nested(), "error"),
    "billion_laughs_of_lists": (_billion_laughs(b"l"), "result"),
    "billion_laughs_of_dicts": (_billion_laughs(b"d"), "result"),
    "binbytes8_declaring_2_to_the_62": (_declared(b"\x8e", "<Q", 2**62), "error"),
    "binunicode8_declaring_2_to_the_62": (_declared(b"\x8d", "<Q", 2**62), "error"),
    "bytearray8_declaring_2_to_the_62": (_declared(b"\x96", "<Q", 2**62), "error"),
    "binbytes_declaring_4_GiB": (_declared(b"B", "<I", 2**32 - 1), "error"),
    "long4_declaring_2_GiB": (_declared(b"\x8b", "<i", 2**31 - 1), "error"),
    "long4_negative_length": (_declared(b"\x8b", "<i", -5), "error"),
    "long_with_100000_digits": (b"L" + b"9" * 100_000 + b"L\n", "error"),
    "frame_declaring_2_to_the_63": (_declared(b"\x95", "<Q", 2**63), "error"),
    "binget_of_a_missing_index": (b"h\xfe", "error"),
    "long_binget_of_a_missing_index": (get(2**32 - 1), "error"),
    "get_of_a_missing_index": (b"g99999999999999999999\n", "error"),
    "long_binput_at_the_largest_index": (b"N" + put(2**32 - 1), "result"),
    "marks_100000_deep_never_closed": (b"(" * DEEP + b"N", "either"),
    "tensor_whose_size_has_5000_digits": (_tensor([2**62] * 300, [1] * 300), "either"),
    "tensor_whose_size_overflows_a_float": (_tensor([2**62] * 22, [1] * 22), "either"),
}


def plain_bomb(fragment: bytes) -> bytes:
    return b"\x80\x02" + fragment + b"."


STATE = {"conv.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "conv.bias": torch.ones(2)}


def _state_parts() -> tuple[bytes, dict[str, bytes]]:
    zf = zipfile.ZipFile(io.BytesIO(torch_save_bytes(STATE)))
    prefix = zf.namelist()[0].split("/")[0]
    storages = {
        n[len(f"{prefix}/data/") :]: zf.read(n) for n in zf.namelist() if n.startswith(f"{prefix}/data/")
    }
    return zf.read(f"{prefix}/data.pkl"), storages


STATE_PKL, STORAGES = _state_parts()


def zip_bomb_pickle(fragment: bytes) -> bytes:
    """{"weights": <real state dict>, "bomb": <fragment>}."""
    return b"\x80\x02}" + u("weights") + STATE_PKL[2:-1] + b"s" + u("bomb") + fragment + b"s."


@pytest.mark.slow
@pytest.mark.parametrize("name", BOMBS)
def test_pickle_bomb_as_a_plain_pickle_ends_cleanly(tmp_path, name):
    fragment, expect = BOMBS[name]
    path = tmp_path / "bomb.pkl"
    path.write_bytes(plain_bomb(fragment))

    run_bomb(path, expect)


@pytest.mark.slow
@pytest.mark.parametrize("name", BOMBS)
def test_pickle_bomb_in_a_torch_zip_ends_cleanly(tmp_path, name):
    fragment, expect = BOMBS[name]
    path = write_torch_zip(tmp_path / "bomb.pth", zip_bomb_pickle(fragment), STORAGES)

    ckpt = run_bomb(path, expect)
    if ckpt is not None and expect == "result":
        assert [t.name for t in ckpt.tensors] == list(STATE)
        assert torch.equal(ckpt.state_dict()["conv.weight"], STATE["conv.weight"])


def _tuple_dag_as_dict_key(levels: int = 60) -> bytes:
    # Each tuple holds the one below twice: hashing it (as a dict key) visits 2**60 tuples.
    out = b"N" + put(M) + b"0"
    for level in range(1, levels + 1):
        out += get(M + level - 1) + get(M + level - 1) + b"\x86" + put(M + level) + b"0"
    return out + b"}" + get(M + levels) + u("v") + b"s"


def _many_state_dicts_sharing_one_big_list(dicts: int = 3000, items: int = 30_000) -> bytes:
    # 3000 small dicts that look like state dicts, each also holding the same 30000-item list.
    out = _tensor([1], [1]) + put(M) + b"0"
    out += b"](" + b"N" * items + b"e" + put(M + 1) + b"0"
    out += b"]("
    for _ in range(dicts):
        out += b"}(" + u("w") + get(M) + u("x") + get(M + 1) + b"u"
    return out + b"e"


def _tensor_with_200000_dimensions() -> bytes:
    return _tensor([2**62] * 200_000, [0] * 200_000)


@pytest.mark.slow
@pytest.mark.parametrize(
    "build", [_tuple_dag_as_dict_key, _many_state_dicts_sharing_one_big_list, _tensor_with_200000_dimensions]
)
def test_small_pickle_that_would_take_superlinear_work_ends_cleanly(tmp_path, build):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(plain_bomb(build()))
    assert path.stat().st_size < 5_000_000

    run_bomb(path, "either")


@pytest.mark.slow
def test_safetensors_shape_with_200000_dimensions_ends_cleanly(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(st({"w": f32([2**62] * 200_000, 0, 4)}, bytes(4)))

    run_bomb(path, "error")


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        b'{"weight_map": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"weight_map": {}, "metadata": {"total_size": 1' + b"0" * 5000 + b"}}",
    ],
    ids=["nested_100000_deep", "integer_with_5000_digits"],
)
def test_hostile_index_json_is_one_clean_error(tmp_path, text):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(text)

    run_bomb(index, "error")
    assert_clean_error(run_cli("inspect", index), index, code=1)
    assert index.read_bytes() == text
