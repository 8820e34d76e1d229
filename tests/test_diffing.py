"""`surgery diff`: what differs between two checkpoints, checked against values computed here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, assert_clean_error, run_cli
from safetensors.torch import save_file

import surgery


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    a = {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "bn.num_batches_tracked": torch.tensor(5),
        "fc.bias": torch.randn(4),
    }
    torch.save({"state_dict": {"module." + k: v for k, v in a.items()}}, tmp_path / "a.pth")
    return a, tmp_path / "a.pth"


def test_the_same_weights_in_other_formats_are_identical(tmp_path, pair):
    a, path = pair
    save_file(a, tmp_path / "b.safetensors")
    report = surgery.diff(path, tmp_path / "b.safetensors")
    assert report.same and report.identical == 3 and report.compared == 3
    assert report.steps == ("A: stripped prefix 'module.' from 3 keys",)  # the wrapper on one side only
    run = run_cli("diff", path, tmp_path / "b.safetensors", "--exit-code")
    assert run.exit_code == 0 and "identical: 3 tensors" in run.stdout


def test_every_kind_of_difference(tmp_path, pair):
    a, path = pair
    b = dict(a)
    b["conv.weight"] = a["conv.weight"].clone()
    b["conv.weight"][0, 0, 0, :2] += torch.tensor([0.5, -0.25])
    b["fc.bias"] = a["fc.bias"].to(torch.float16)
    b["bn.num_batches_tracked"] = torch.tensor([5])
    b["extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in b.items()}, tmp_path / "b.safetensors")
    report = surgery.diff(path, tmp_path / "b.safetensors")
    assert not report.same and report.only_b == ("extra.weight",) and report.only_a == ()
    found = {d.name: d for d in report.differences}
    assert found["bn.num_batches_tracked"].kind == "shape"
    conv = found["conv.weight"]
    delta = (a["conv.weight"].double() - b["conv.weight"].double()).abs()
    assert conv.kind == "values" and conv.differing == 2
    assert conv.max_abs == pytest.approx(float(delta.max()), rel=1e-6)
    rel = delta / a["conv.weight"].double().abs()
    assert conv.max_rel == pytest.approx(float(rel.max()), rel=1e-6)
    fc = found["fc.bias"]
    assert fc.kind == "dtype" and fc.dtype_b == "float16"
    assert fc.max_abs == pytest.approx(
        float((a["fc.bias"].double() - b["fc.bias"].double()).abs().max()), rel=1e-6
    )
    run = run_cli("diff", path, tmp_path / "b.safetensors", "--exit-code")
    assert run.exit_code == 1
    assert "1 only in B, 1 other shape, 1 other dtype, 1 other values" in run.stdout
    doc = json.loads(run_cli("diff", path, tmp_path / "b.safetensors", "--json").stdout)
    assert doc["same"] is False and doc["only_in_b"] == ["extra.weight"] and len(doc["differences"]) == 3


def test_nan_and_signed_zero(tmp_path):
    a = {"x": torch.tensor([float("nan"), 1.0, 0.0, 2.0])}
    b = {"x": torch.tensor([float("nan"), 1.0, -0.0, float("nan")])}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    (d,) = surgery.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").differences
    assert d.nan == 1 and d.differing == 1  # NaN vs NaN equal, -0.0 == 0.0, 2.0 vs NaN counted
    save_file({"x": torch.tensor([0.0])}, tmp_path / "c.safetensors")
    save_file({"x": torch.tensor([-0.0])}, tmp_path / "d.safetensors")
    (z,) = surgery.diff(tmp_path / "c.safetensors", tmp_path / "d.safetensors").differences
    assert z.differing == 0 and "other bits" in z.describe()


def test_integers_are_compared_exactly(tmp_path):
    save_file({"i": torch.tensor([2**40, 7])}, tmp_path / "a.safetensors")
    save_file({"i": torch.tensor([2**40 + 1, 7])}, tmp_path / "b.safetensors")
    (d,) = surgery.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").differences
    assert d.max_abs == 1.0 and d.differing == 1


def test_big_tensors_are_compared_in_pieces(tmp_path):
    torch.manual_seed(0)
    a = torch.randn(9_000_001)
    b = a.clone()
    b[-1] += 1.0
    save_file({"w": a}, tmp_path / "a.safetensors")
    torch.save({"w": b}, tmp_path / "b.pt")
    (d,) = surgery.diff(tmp_path / "a.safetensors", tmp_path / "b.pt").differences
    assert d.differing == 1 and d.max_abs == pytest.approx(
        float((a[-1].double() - b[-1].double()).abs()), rel=1e-6
    )


def test_structure_only_reads_no_data(tmp_path, pair):
    a, path = pair
    save_file({k: v + 1 for k, v in a.items()}, tmp_path / "b.safetensors")
    report = surgery.diff(path, tmp_path / "b.safetensors", structure_only=True)
    assert report.same and report.bytes_read == 0
    run = run_cli("diff", path, tmp_path / "b.safetensors", "--structure-only")
    assert "values     not read (--structure-only)" in run.stdout


def test_filters_and_prefixes(tmp_path, pair):
    a, path = pair
    save_file({"net." + k: v for k, v in a.items()}, tmp_path / "b.safetensors")
    assert not surgery.diff(path, tmp_path / "b.safetensors").same
    report = surgery.diff(
        path, tmp_path / "b.safetensors", strip_prefix=["module.", "net."], exclude=["bn.*"]
    )
    assert report.same and report.compared == 2


def test_bad_input(tmp_path, pair):
    _, path = pair
    missing = tmp_path / "missing.pt"
    assert_clean_error(run_cli("diff", path, missing), missing, contains="no such", code=1)
    payload = FIXTURES / "payload_os_system.pth"
    assert_clean_error(run_cli("diff", payload, path), payload, contains="not safe", code=1)
    assert run_cli("diff", payload, path, "--structure-only").exit_code == 0  # headers only: nothing is read
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_clean_error(run_cli("diff", path, text), text, code=1)
