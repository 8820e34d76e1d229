"""Small files that ask for huge work: expanded views and pickles nested a million deep.

A 1.6 KB `torch.save` of `torch.zeros(1).expand(2**40)` is a valid, "safe" file whose one
tensor is 4 TiB when written out: inspect says so, convert refuses it before writing (past
--max-output-ratio, or past the free space), diff compares it without expanding it, and
port fails cleanly. Pickles nested deeper than pickle.dumps can write are refused.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess
from safetensors.torch import load_file

import surgery
from surgery import SurgeryError, UsageError
from surgery.formats import pickle_vm
from surgery.formats.torch_pickle import KNOWN

TIB4 = 4 * 2**40


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("amplify")


@pytest.fixture(scope="module")
def expanded(folder) -> Path:
    """4 bytes viewed as 2**40 float32 elements (stride 0)."""
    path = folder / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(2**40), "b": torch.ones(3)}, path)
    return path


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_reports_what_a_conversion_writes(expanded):
    run = run_cli("inspect", expanded)
    assert run.exit_code == 0, run.stderr
    assert "  bytes        16 (16 B)\n" in run.stdout
    line = next(line for line in run.stdout.splitlines() if line.startswith("  converts to"))
    assert f"{TIB4 + 12:,} (4.0 TiB)" in line
    doc = json.loads(run_cli("inspect", expanded, "--json").stdout)
    assert doc["bytes"] == 16 and doc["bytes_out"] == TIB4 + 12


def test_two_views_of_one_storage_are_written_twice(folder):
    path = folder / "views.pt"
    w = torch.randn(4, 8)
    torch.save({"w": w, "w_t": w.t(), "tied": w}, path)
    ckpt = surgery.open_checkpoint(path)
    assert ckpt.nbytes == 128 and ckpt.nbytes_out == 256  # `tied` is the very same view: once
    line = next(x for x in run_cli("inspect", path).stdout.splitlines() if "converts to" in x)
    assert line.split()[2:4] == ["256", "(256"]


def test_ordinary_checkpoint_has_no_extra_line(fixtures_dir):
    run = run_cli("inspect", fixtures_dir / "imagenet_example.pth.tar")
    assert "converts to" not in run.stdout
    doc = json.loads(run_cli("inspect", fixtures_dir / "imagenet_example.pth.tar", "--json").stdout)
    assert doc["bytes_out"] == doc["bytes"]


# -- convert ------------------------------------------------------------------------------------
def test_convert_refuses_past_the_output_ratio_before_writing(expanded, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_subprocess("convert", expanded, "-o", out)
    line = assert_clean_error(run, expanded, contains="the output would be 4.0 TiB", code=1)
    assert "--max-output-ratio 4" in line and "tensor 'w' alone is 4.0 TiB, viewed from 4 B" in line
    assert "hint: " in run.stderr and "--exclude" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_past_the_free_space(expanded, tmp_path):
    out = tmp_path / "out.pt"
    assert shutil.disk_usage(out.parent).free < TIB4, "this test needs less than 4 TiB free"
    run = run_cli("convert", expanded, "-o", out, "--max-output-ratio", "inf")
    assert_clean_error(run, out, contains="free on its filesystem", code=1)
    assert list(tmp_path.iterdir()) == []


def test_convert_writes_an_expansion_when_allowed(tmp_path):
    """1 MiB of zeros from a 4-byte storage: past the default ratio, written when asked."""
    path = tmp_path / "small_expand.pt"
    torch.save({"w": torch.zeros(1).expand(2**18)}, path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SurgeryError, match="--max-output-ratio 4"):
        surgery.convert(path, out)
    result = surgery.convert(path, out, max_output_ratio=1000, verify=True)
    assert result.verified == 1 and torch.equal(load_file(out)["w"], torch.zeros(2**18))


def test_dry_run_reports_the_size_without_refusing(expanded):
    result = surgery.convert(expanded, expanded.parent / "out.safetensors", dry_run=True)
    assert result.bytes_out == TIB4 + 12 and not result.written


def test_bad_ratio_is_a_usage_error(expanded):
    with pytest.raises(UsageError, match="more than 0"):
        surgery.convert(expanded, expanded.parent / "out.safetensors", max_output_ratio=0)
    run = run_cli("convert", expanded, "-o", expanded.parent / "out.safetensors", "--max-output-ratio", "-1")
    assert_clean_error(run, "--max-output-ratio", code=2)


# -- diff and port ------------------------------------------------------------------------------
def test_diff_compares_views_repeating_alike_without_expanding_them(expanded, folder):
    ones = folder / "ones.pt"
    torch.save({"w": torch.ones(1).expand(2**40), "b": torch.ones(3)}, ones)
    assert surgery.diff(expanded, expanded).same
    changes = surgery.diff(expanded, ones)
    (difference,) = changes.differences
    assert difference.name == "w" and difference.differing == 2**40 and difference.max_abs == 1
    assert changes.bytes_read < 1 << 10


def test_diff_refuses_views_repeating_along_other_dimensions(folder):
    rows, cols = folder / "rows.pt", folder / "cols.pt"
    torch.save({"w": torch.zeros(2**20, 1).expand(2**20, 2**20)}, rows)  # repeats along dim 1
    torch.save({"w": torch.zeros(1, 2**20).expand(2**20, 2**20)}, cols)  # repeats along dim 0
    run = run_cli("diff", rows, cols)
    assert_clean_error(run, rows, contains="comparing it would read 8.0 TiB", code=1)
    assert "--exclude w" in run.stderr


def test_port_of_an_expanded_view_fails_cleanly(expanded, tmp_path):
    out = tmp_path / "out.pt"
    run = run_cli("port", expanded, "--to", expanded, "-o", out)
    assert_clean_error(run, out, contains="free on its filesystem", code=1)
    assert list(tmp_path.iterdir()) == []


# -- pickles nested a million deep ----------------------------------------------------------------
DEPTH = 1_000_000
GLOBAL = b"cfoo\nbar\n"
NESTED = {
    "lists via MARK": b"(" * DEPTH + b"l" * DEPTH,
    "lists via APPEND": b"]" * DEPTH + b"a" * (DEPTH - 1),
    "dicts via SETITEM": b"}X\x01\x00\x00\x00k" * DEPTH + b"N" + b"s" * DEPTH,
    "tuples via MARK": b"(" * DEPTH + b"t" * DEPTH,
    "calls with MARK arguments": (GLOBAL + b"(") * DEPTH + b"N" + b"tR" * DEPTH,
    "calls with TUPLE1 arguments": GLOBAL * DEPTH + b"N" + b"\x85R" * DEPTH,
    "objects built from their state": (GLOBAL + b")R") * DEPTH + b"b" * (DEPTH - 1),
    "known calls": b"ccollections\nOrderedDict\n" * DEPTH + b")" + b"\x85R" * DEPTH,
}


@pytest.mark.parametrize("shape", NESTED)
def test_pickle_nested_a_million_deep_is_refused(shape):
    with pytest.raises(pickle_vm.PickleError, match="nested deeper than 1000 levels"):
        pickle_vm.run(b"\x80\x02" + NESTED[shape] + b".", known=KNOWN)


def test_nested_data_pkl_is_a_clean_error(tmp_path):
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + NESTED["calls with MARK arguments"] + b".")
        zf.writestr("archive/byteorder", "little")
    run = run_subprocess("inspect", path)
    assert_clean_error(run, path, contains="nested deeper than 1000 levels", code=1)


def test_payload_before_the_nesting_is_still_reported(tmp_path):
    """Reading stops at the nesting: what was seen before it comes with the error."""
    path = tmp_path / "deep.pt"
    payload = b"cos\nsystem\nX\x04\x00\x00\x00echo\x85R"  # os.system('echo'): recorded, never called
    body = b"\x80\x02}X\x04\x00\x00\x00hook" + payload + b"X\x04\x00\x00\x00deep" + NESTED["lists via MARK"]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", body + b"s.")
        zf.writestr("archive/byteorder", "little")
    run = run_cli("inspect", path)
    assert_clean_error(run, path, contains="nested deeper than 1000 levels", code=1)
    assert "danger: " in run.stderr and "os.system" in run.stderr


class Node:
    """An object holding another: pickled as a call and a BUILD of its state."""

    def __init__(self, child: object):
        self.child = child


@pytest.mark.parametrize(
    "wrap", [lambda x: [x], lambda x: {"k": x}, lambda x: (x,), Node], ids=["list", "dict", "tuple", "Node"]
)
def test_deepest_pickle_that_pickle_dumps_writes_is_still_read(wrap):
    """pickle.dumps stops at Python's recursion limit: the depth limit never refuses what it writes."""
    value, deepest = 0, None
    while True:
        try:
            deepest = pickle.dumps(value, protocol=2)
        except RecursionError:
            break
        value = wrap(value)
    assert deepest is not None and len(deepest) > 400
    pickle_vm.run(deepest, known=KNOWN)
