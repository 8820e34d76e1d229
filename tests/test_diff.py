"""`surgery diff` and `surgery.diff()`: keys only on one side, shapes, dtypes and values.

Files are written by torch.save and safetensors' save_file; every expected number
(max abs, max rel, how many elements differ) is computed here, independently, with numpy.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_clean_error, run_cli, run_subprocess
from safetensors.torch import save_file

import surgery


def diff(*args: object):
    return run_cli("diff", *args)


def diff_json(*args: object) -> dict:
    run = run_cli("diff", *args, "--json")
    assert run.exit_code == 0, run
    return json.loads(run.stdout)  # one JSON document, nothing else


def save(path, sd: dict, **kwargs):
    torch.save(sd, path, **kwargs)
    return path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, seeded_resnet18):
    """A seeded resnet18 state_dict in five layouts: (folder of the sharded one, {kind: path}, state_dict)."""
    folder = tmp_path_factory.mktemp("diff_resnet")
    paths = {
        "zip": seeded_resnet18.imagenet,
        "legacy": seeded_resnet18.legacy,
        "plain": seeded_resnet18.plain,
        "safetensors": seeded_resnet18.safetensors,
        "sharded": folder / "sharded",
    }
    surgery.convert(paths["safetensors"], paths["sharded"], shard_size="10MB")
    return folder, paths, seeded_resnet18.state


def one(report) -> surgery.commands.diff.Difference:
    assert len(report.differences) == 1, report.differences
    return report.differences[0]


# -- same -------------------------------------------------------------------
@pytest.mark.parametrize(
    "a,b", [("zip", "safetensors"), ("legacy", "sharded"), ("plain", "legacy"), ("safetensors", "sharded")]
)
def test_identical_across_formats(resnet, a, b):
    _, paths, sd = resnet
    run = diff(paths[a], paths[b], "--exit-code")
    assert run.exit_code == 0, run
    assert "identical" in run.stdout
    report = surgery.diff(paths[a], paths[b])
    assert report.same and report.compared == report.identical == len(sd)
    assert report.only_a == report.only_b == report.differences == ()
    assert report.summary() == f"identical: {len(sd)} tensors"
    assert report.bytes_read == 2 * sum(t.numel() * t.element_size() for t in sd.values())


def test_auto_strips_a_wrapper_prefix_on_one_side(resnet):
    _, paths, sd = resnet
    report = surgery.diff(paths["zip"], paths["plain"])
    assert report.same and report.compared == len(sd)
    assert any("module." in s for s in report.steps)
    doc = diff_json(paths["plain"], paths["zip"])
    assert doc["same"] is True and doc["in_both"] == len(sd)
    assert doc["steps"] and doc["steps"][0].startswith("B: ")


def test_auto_strips_orig_mod(tmp_path):
    sd = {"a.w": torch.randn(3), "b.w": torch.randn(2)}
    a = save(tmp_path / "a.pt", {"_orig_mod." + k: v for k, v in sd.items()})
    b = save(tmp_path / "b.pt", sd)
    assert surgery.diff(a, b).same


def test_explicit_strip_prefix_include_exclude(tmp_path):
    torch.manual_seed(2)
    sd = {"net.a.w": torch.randn(3), "net.b.w": torch.randn(3), "net.c.w": torch.randn(3)}
    other = {**sd, "net.b.w": sd["net.b.w"] + 1}
    a = save(tmp_path / "a.pt", sd)
    b = save(tmp_path / "b.pt", {k.replace("net.", "model.net.", 1): v for k, v in other.items()})
    report = surgery.diff(a, b, strip_prefix=["net.", "model.net."])
    assert report.compared == 3 and [d.name for d in report.differences] == ["b.w"]
    report = surgery.diff(a, b, strip_prefix=["net.", "model.net."], exclude=["b.*"])
    assert report.same and report.compared == 2
    report = surgery.diff(a, b, strip_prefix=["net.", "model.net."], include=["a.*"])
    assert report.same and report.compared == 1
    run = diff(
        a, b, "--strip-prefix", "net.", "--strip-prefix", "model.net.", "--include", "b.*", "--exit-code"
    )
    assert run.exit_code == 1 and "b.w" in run.stdout


def test_key_compares_the_ema(tmp_path):
    torch.manual_seed(4)
    model, ema = {"w": torch.randn(4)}, {"w": torch.randn(4)}
    a = save(tmp_path / "a.pth", {"state_dict": model, "state_dict_ema": ema})
    b = save(tmp_path / "b.pth", {"state_dict": ema, "state_dict_ema": ema})
    assert not surgery.diff(a, b).same  # each file's own state_dict
    assert surgery.diff(a, b, key="state_dict_ema").same


# -- keys and shapes -----------------------------------------------------------
def test_only_in_a_and_b_and_shapes(tmp_path):
    a = save(tmp_path / "a.pt", {"x": torch.zeros(2, 3), "gone": torch.ones(1), "fc.w": torch.zeros(10, 4)})
    b = save(tmp_path / "b.pt", {"x": torch.zeros(2, 3), "new": torch.ones(1), "fc.w": torch.zeros(5, 4)})
    report = surgery.diff(a, b)
    assert report.only_a == ("gone",) and report.only_b == ("new",)
    d = one(report)
    assert (d.name, d.kind, d.shape_a, d.shape_b) == ("fc.w", "shape", (10, 4), (5, 4))
    assert d.max_abs is None  # values of other shapes are not compared
    assert report.identical == 1 and report.compared == 2 and not report.same
    assert report.summary() == "differ: 1 only in A, 1 only in B, 1 other shape, 1 identical"
    run = diff(a, b)
    assert run.exit_code == 0  # a report, not a failure, without --exit-code
    assert "fc.w: shape [10, 4] vs [5, 4]" in run.stdout
    assert diff(a, b, "--exit-code").exit_code == 1
    doc = diff_json(a, b)
    assert doc["only_in_a"] == ["gone"] and doc["only_in_b"] == ["new"]
    assert doc["differences"][0]["kind"] == "shape"


# -- values --------------------------------------------------------------------
def test_value_difference_numbers(tmp_path):
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((64, 33)).astype(np.float32)
    a_np[0, :5] = 0.0  # zeros in A: left out of the relative difference
    b_np = a_np.copy()
    idx = rng.choice(a_np.size, 40, replace=False)
    b_np.flat[idx] += rng.standard_normal(40).astype(np.float32)
    b_np[0, 0] = 0.25  # a == 0, b != 0: counted, absolute only
    a = save(tmp_path / "a.pt", {"w": torch.from_numpy(a_np)})
    b = tmp_path / "b.safetensors"
    save_file({"w": torch.from_numpy(b_np)}, b)
    d = one(surgery.diff(a, b))
    delta = np.abs(a_np - b_np)
    nonzero = a_np != 0
    assert d.kind == "values"
    assert d.differing == int((a_np != b_np).sum())
    assert d.max_abs == pytest.approx(float(delta.max()), rel=1e-6)
    assert d.max_rel == pytest.approx(float((delta[nonzero] / np.abs(a_np[nonzero])).max()), rel=1e-6)
    assert d.nan == 0
    doc = diff_json(a, b)
    got = doc["differences"][0]
    assert got["differing"] == d.differing and got["max_abs"] == pytest.approx(d.max_abs)
    assert doc["identical"] == 0 and doc["same"] is False


def test_value_difference_across_chunks(tmp_path):
    """A tensor over diffing.CHUNK elements: the difference sits in the second piece."""
    from surgery.commands.diff import CHUNK

    n = CHUNK + 1000
    a_t = torch.zeros(n)
    b_t = a_t.clone()
    b_t[CHUNK + 10] = 3.0
    b_t[5] = -1.0
    a = save(tmp_path / "a.pt", {"w": a_t})
    b = tmp_path / "b.safetensors"
    save_file({"w": b_t}, b)
    d = one(surgery.diff(a, b))
    assert (d.differing, d.max_abs, d.max_rel) == (2, 3.0, None)  # A is all zeros: no relative difference


def test_dtype_difference_compares_values(tmp_path):
    torch.manual_seed(5)
    w = torch.randn(50, 20)
    a = save(tmp_path / "a.pt", {"w": w, "i": torch.arange(4)})
    b = tmp_path / "b.safetensors"
    surgery.convert(a, b, dtype="bf16")
    report = surgery.diff(a, b)
    d = one(report)
    expected = (w - w.bfloat16().float()).abs()
    assert (d.kind, d.dtype_a, d.dtype_b) == ("dtype", "float32", "bfloat16")
    assert 0 < d.max_abs < 0.05
    assert d.max_abs == pytest.approx(float(expected.max()), rel=1e-6)
    assert d.differing == int((expected > 0).sum())
    assert report.identical == 1  # the int64 buffer is untouched
    assert "dtype float32 vs bfloat16" in d.describe()
    # the same values in another dtype: a dtype difference with equal values
    c = save(tmp_path / "c.pt", {"w": w.bfloat16().double(), "i": torch.arange(4)})
    d = one(surgery.diff(b, c))
    assert d.kind == "dtype" and d.max_abs == 0 and d.differing == 0
    assert d.describe() == "w: dtype bfloat16 vs float64, values equal"


def test_nan_handling(tmp_path):
    nan = float("nan")
    a = save(
        tmp_path / "a.pt", {"same_nan": torch.tensor([nan, 1.0]), "w": torch.tensor([nan, 1.0, 2.0, 4.0])}
    )
    b = save(
        tmp_path / "b.pt", {"same_nan": torch.tensor([nan, 1.0]), "w": torch.tensor([nan, nan, 3.0, 4.0])}
    )
    report = surgery.diff(a, b)
    d = one(report)
    assert d.name == "w" and report.identical == 1  # NaN vs NaN (same bits): equal
    assert d.nan == 1  # 1.0 vs NaN
    assert d.differing == 2  # 2 -> 3, and 1.0 vs NaN
    assert d.max_abs == 1.0 and d.max_rel == 0.5  # the NaN element does not poison the numbers
    doc = diff_json(a, b)
    assert doc["differences"][0]["nan"] == 1


def test_nan_payloads_and_negative_zero_are_bit_differences(tmp_path):
    """Equal values in other bits: reported (the files differ), as 'equal values, other bits'."""
    quiet = torch.tensor([float("nan")])
    payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(payload).all() and not torch.equal(quiet.view(torch.int32), payload.view(torch.int32))
    a = save(tmp_path / "a.pt", {"z": torch.tensor([0.0, 1.0]), "n": quiet})
    b = save(tmp_path / "b.pt", {"z": torch.tensor([-0.0, 1.0]), "n": payload})
    report = surgery.diff(a, b)
    assert not report.same
    for d in report.differences:
        assert (d.kind, d.max_abs, d.differing, d.nan) == ("values", 0.0, 0, 0), d
        assert "equal values, other bits" in d.describe()
    assert sorted(d.name for d in report.differences) == ["n", "z"]


def test_int_tensors(tmp_path):
    a_t = torch.tensor([0, 5, -7, 100], dtype=torch.int64)
    b_t = torch.tensor([0, 6, -7, 90], dtype=torch.int64)
    a = save(
        tmp_path / "a.pt",
        {"i": a_t, "b": torch.tensor([True, False]), "u": torch.arange(3, dtype=torch.uint8)},
    )
    b = save(
        tmp_path / "b.pt",
        {"i": b_t, "b": torch.tensor([True, True]), "u": torch.arange(3, dtype=torch.uint8)},
    )
    report = surgery.diff(a, b)
    by = {d.name: d for d in report.differences}
    assert set(by) == {"i", "b"} and report.identical == 1
    assert (by["i"].differing, by["i"].max_abs) == (2, 10.0)
    assert by["i"].max_rel == pytest.approx(max(1 / 5, 10 / 100))
    assert (by["b"].differing, by["b"].max_abs) == (1, 1.0)


def test_big_int64_values_are_compared_exactly(tmp_path):
    a = save(tmp_path / "a.pt", {"i": torch.tensor([2**53, 3])})
    b = save(tmp_path / "b.pt", {"i": torch.tensor([2**53 + 1, 3])})
    d = one(surgery.diff(a, b))
    assert d.differing == 1 and d.max_abs == 1.0


def test_inf_does_not_hide_relative_differences(tmp_path):
    a = save(tmp_path / "a.pt", {"x": torch.tensor([float("inf"), 2.0])})
    b = save(tmp_path / "b.pt", {"x": torch.tensor([1.0, 3.0])})
    d = one(surgery.diff(a, b))
    assert d.max_abs == math.inf and d.differing == 2
    assert d.max_rel == pytest.approx(0.5)


def test_exit_code(tmp_path, resnet):
    _, paths, _ = resnet
    a = save(tmp_path / "a.pt", {"w": torch.ones(3)})
    b = save(tmp_path / "b.pt", {"w": torch.tensor([1.0, 1.0, 1.5])})
    assert diff(a, b).exit_code == 0
    run = diff(a, b, "--exit-code")
    assert run.exit_code == 1 and run.stderr == "" and "w: 1 of 3 differ" in run.stdout
    assert diff(a, a, "--exit-code").exit_code == 0
    run = run_subprocess("diff", paths["zip"], paths["safetensors"], "--exit-code", "--json")
    assert run.exit_code == 0 and run.stderr == "", run
    assert json.loads(run.stdout)["same"] is True


# -- --structure-only --------------------------------------------------------------
def test_structure_only_reads_no_data(tmp_path):
    a = save(tmp_path / "a.pt", {"w": torch.ones(3), "s": torch.zeros(2, 2), "d": torch.ones(2)})
    b = save(
        tmp_path / "b.pt", {"w": torch.zeros(3), "s": torch.zeros(4), "d": torch.ones(2, dtype=torch.float64)}
    )
    report = surgery.diff(a, b, structure_only=True)
    assert report.bytes_read == 0 and report.structure_only
    assert sorted((d.name, d.kind) for d in report.differences) == [("d", "dtype"), ("s", "shape")]
    assert all(d.max_abs is None for d in report.differences)
    assert report.summary() == "differ: 1 other shape, 1 other dtype, 1 alike (values not read)"
    doc = diff_json(a, b, "--structure-only")
    assert doc["identical"] is None and doc["bytes_read"] == 0
    same = surgery.diff(
        a,
        save(tmp_path / "c.pt", {"w": torch.full((3,), 9.0), "s": torch.ones(2, 2), "d": torch.ones(2)}),
        structure_only=True,
    )
    assert same.same and same.summary() == "same names, shapes and dtypes: 3 tensors"


def test_structure_only_reads_no_tensor_bytes_even_when_they_are_gone(tmp_path):
    """Documents behaviour: a torch zip whose storage members hold garbage still compares by
    structure (nothing is read); a safetensors file cut inside its data is refused as corrupt
    even with --structure-only (the header is checked against the file size)."""
    import zipfile

    sd = {"w": torch.ones(64), "b": torch.zeros(8)}
    a = save(tmp_path / "a.pt", sd)
    b = tmp_path / "b.pt"
    with zipfile.ZipFile(a) as src, zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename:
                data = b"\xff" * len(data)  # other values, same sizes
            dst.writestr(info, data)
    assert surgery.diff(a, b, structure_only=True).same
    assert not surgery.diff(a, b).same
    st = tmp_path / "c.safetensors"
    save_file(sd, st)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-100])
    run = diff(a, cut, "--structure-only")
    assert_clean_error(run, cut, contains="past the end", code=1)


def test_structure_only_allows_unsafe_files(tmp_path):
    payload = FIXTURES / "payload_os_system.pth"
    clean = tmp_path / "clean.safetensors"
    surgery.convert(payload, clean, trust=True)
    run = diff(payload, clean)
    assert_clean_error(run, payload, contains="refused", code=1)
    assert "--trust" in run.stderr
    run = diff(payload, clean, "--structure-only", "--exit-code")
    assert run.exit_code == 0, run
    run = diff(payload, clean, "--trust", "--exit-code")
    assert run.exit_code == 0, run
    assert "identical: 14 tensors" in run.stdout


# -- bad input ---------------------------------------------------------------------
def test_missing_file(tmp_path):
    a = save(tmp_path / "a.pt", {"w": torch.ones(1)})
    run = diff(a, tmp_path / "nope.pt")
    assert_clean_error(run, tmp_path / "nope.pt", code=1)
    run = diff(tmp_path / "nope.pt", a, "--structure-only")
    assert_clean_error(run, tmp_path / "nope.pt", code=1)


def test_not_a_checkpoint(tmp_path):
    a = save(tmp_path / "a.pt", {"w": torch.ones(1)})
    txt = tmp_path / "notes.txt"
    txt.write_text("not a checkpoint\n")
    for args in ((a, txt), (txt, a), (a, txt, "--structure-only")):
        run = diff(*args)
        assert_clean_error(run, txt, code=1)
        assert "internal error" not in run.stderr


def test_no_state_dict_and_bad_key(tmp_path):
    a = save(tmp_path / "a.pt", {"w": torch.ones(1)})
    empty = save(tmp_path / "empty.pt", {"epoch": 3})
    run = diff(a, empty)
    assert_clean_error(run, empty, contains="no state_dict to compare", code=1)
    run = diff(a, a, "--key", "nope")
    assert_clean_error(run, a, contains="no entry 'nope'", code=2)


def test_inputs_untouched(tmp_path, resnet):
    _, paths, _ = resnet
    a = tmp_path / "a.pth.tar"
    shutil.copyfile(paths["zip"], a)
    before = a.read_bytes()
    assert diff(a, paths["sharded"], "--json").exit_code == 0
    assert a.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth.tar"]
