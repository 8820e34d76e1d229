"""Casts that lose values (overflow to inf, finite made NaN, non-zero flushed to zero) are
counted per tensor, refused unless `--allow-lossy-cast` (nothing written, input untouched), and
`diff` says so afterwards instead of "values none differ".

The counter works on the bits before and after a cast; here it is checked against torch's own
cast on edge and random values of every pair of float64, float32, float16 and bfloat16.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from tests.conftest import assert_clean_error, run_cli

FLOATS = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
EDGES = [0.0, -0.0, 1.0, -2.5, 1e-8, -1e-8, 2.98e-8, 6e-8, 1e-40, -1e-45, 1e-300, 5e-324, 65504.0, 65520.0,
         -70000.0, 3.39e38, 3.4e38, -3.4028234e38, 1e39, -1e300, 1.7976931348623157e308,
         float("inf"), float("-inf"), float("nan")]  # fmt: skip


def values(dtype: torch.dtype) -> torch.Tensor:
    """Edge values as `dtype` holds them, and random ones from 1e-60 to 1e60 of both signs."""
    gen = torch.Generator().manual_seed(7)
    scale = 10 ** (torch.rand(4000, generator=gen, dtype=torch.float64) * 120 - 60)
    mixed = torch.cat(
        [torch.tensor(EDGES, dtype=torch.float64), scale * torch.randn(4000, generator=gen).double()]
    )
    return mixed.to(dtype)


def torch_losses(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    """(overflow, NaN, flushed) by torch's own reading of the values before and after."""
    finite = torch.isfinite(x)
    return (
        int((finite & torch.isinf(y)).sum()),
        int((finite & torch.isnan(y)).sum()),
        int((finite & (x != 0) & (y == 0)).sum()),
    )


def raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


@pytest.mark.parametrize(("source", "target"), list(itertools.permutations(FLOATS, 2)))
def test_counts_agree_with_torch_cast_for_every_pair(source, target):
    from surgery.casts import count_losses, may_lose

    x = values(FLOATS[source])
    y = x.to(FLOATS[target])
    lost = count_losses(raw(x), raw(y), source, target)
    assert (lost.overflow, lost.nan, lost.flushed) == torch_losses(x.double(), y.double())
    assert (lost.source, lost.target) == (source, target)
    if not may_lose(source, target):
        assert not lost, "a cast judged lossless lost values"


def test_narrowing_casts_do_lose_on_these_values():
    from surgery.casts import count_losses, may_lose

    for source, target in (("float64", "float32"), ("float32", "float16"), ("float32", "bfloat16"),
                           ("bfloat16", "float16"), ("float64", "bfloat16")):  # fmt: skip
        x = values(FLOATS[source])
        lost = count_losses(raw(x), raw(x.to(FLOATS[target])), source, target)
        assert may_lose(source, target) and lost.overflow and lost.flushed, (source, target, lost)


def test_a_numpy_made_cast_is_judged_as_torch_made_one():
    from surgery.casts import count_losses

    x = values(torch.float32).numpy()
    with np.errstate(over="ignore"):
        by_numpy = x.astype(np.float16)
    by_torch = torch.from_numpy(x).to(torch.float16)
    assert count_losses(x.tobytes(), by_numpy.tobytes(), "float32", "float16") == count_losses(
        x.tobytes(), raw(by_torch), "float32", "float16"
    )


def test_the_issues_values_and_bfloat16_rounding_up_to_inf():
    from surgery.casts import count_losses

    x = torch.tensor([-1e9, 1e-8, 1.0])
    assert count_losses(raw(x), raw(x.half()), "float32", "float16").describe() == (
        "1 overflow to inf, 1 flushed to zero"
    )
    top = torch.tensor([3.38e38, 3.4e38])  # bfloat16's largest is 3.3895e38: 3.4e38 rounds up to inf
    lost = count_losses(raw(top), raw(top.bfloat16()), "float32", "bfloat16")
    assert (lost.overflow, lost.nan, lost.flushed) == (1, 0, 0)


def test_pieces_of_other_lengths_or_dtypes_are_refused():
    from surgery.casts import count_losses

    with pytest.raises(ValueError, match="elements"):
        count_losses(bytes(8), bytes(2), "float32", "float16")
    with pytest.raises(ValueError, match="not a floating cast"):
        count_losses(bytes(8), bytes(8), "int64", "float64")


# -- convert --------------------------------------------------------------------
def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def repro(tmp_path):
    """The issue's tensor (-1e9 and 1e-8 do not survive fp16), a clean one and an int buffer."""
    src = tmp_path / "a.pth"
    torch.save(
        {"w": torch.tensor([-1e9, 1e-8, 1.0]), "b": torch.tensor([0.5, -2.0]), "n": torch.arange(3)}, src
    )
    return src


@pytest.mark.parametrize("out_name", ["b.safetensors", "b.pt", "shards", "dcp"])
def test_convert_refuses_a_lossy_cast_and_writes_nothing(repro, out_name):
    folder = repro.parent / "out"
    folder.mkdir()
    out = folder / out_name
    extra = {"shards": ["--shard-size", "1MB"], "dcp": ["--format", "dcp"]}.get(out_name, [])
    before = digest(repro)
    run = run_cli("convert", repro, "-o", out, "--dtype", "fp16", *extra)
    line = assert_clean_error(run, repro, contains="loses values", code=1)
    assert "w: 1 overflow to inf, 1 flushed to zero" in line
    assert "--allow-lossy-cast" in run.stderr
    assert "lossy cast  float32 -> float16: 1 tensor" in run.stdout
    assert "w: 1 overflow to inf, 1 flushed to zero" in run.stdout
    assert "refused" in run.stdout and "nothing written" in run.stdout
    assert os.listdir(folder) == []  # no output, no temporary file left behind
    assert digest(repro) == before

    run = run_cli("convert", repro, "-o", out, "--dtype", "fp16", *extra, "--allow-lossy-cast")
    assert run.exit_code == 0, run
    assert "2 cast, 1 of them lossy" in run.stdout
    assert "w: 1 overflow to inf, 1 flushed to zero" in run.stdout
    assert digest(repro) == before
    if out_name.endswith(".safetensors"):
        written = load_file(out)
        assert written["w"].tolist() == [float("-inf"), 0.0, 1.0]
        assert written["b"].dtype == torch.float16 and written["n"].dtype == torch.int64


def test_convert_json_counts_per_tensor(repro, tmp_path):
    run = run_cli("convert", repro, "-o", tmp_path / "b.safetensors", "--dtype", "fp16", "--json")
    assert run.exit_code == 1
    doc = json.loads(run.stdout)
    assert doc["written"] is False
    assert doc["lossy_cast"] == {"w": {"cast": "float32 -> float16", "overflow": 1, "nan": 0, "flushed": 1}}


def test_convert_through_torch_save_counts_too(tmp_path):
    """A uint16 tensor has no storage class: the torch file is written by torch.save from whole
    tensors, cast by another path than the pieces."""
    src = tmp_path / "u.safetensors"
    save_file(
        {
            "w": torch.tensor([1e-9, 7e4, 2.0]),
            "u": torch.tensor([1, 2, 3], dtype=torch.int32).to(torch.uint16),
        },
        src,
    )
    with pytest.raises(surgery.LossyCast) as refused:
        surgery.convert(src, tmp_path / "u.pt", dtype="fp16")
    assert refused.value.losses["w"].describe() == "1 overflow to inf, 1 flushed to zero"
    assert not (tmp_path / "u.pt").exists()


def test_float64_overflows_float32_and_bfloat16(tmp_path):
    src = tmp_path / "d.pth"
    torch.save({"d": torch.tensor([1e300, -1e300, 1e-300, 1.0], dtype=torch.float64)}, src)
    for dtype in ("fp32", "bf16"):
        with pytest.raises(surgery.LossyCast) as refused:
            surgery.convert(src, tmp_path / f"{dtype}.safetensors", dtype=dtype)
        lost = refused.value.report.lossy["d"]
        assert (lost.overflow, lost.nan, lost.flushed) == (2, 0, 1), dtype
        assert not (tmp_path / f"{dtype}.safetensors").exists()
    report = surgery.convert(src, tmp_path / "ok.safetensors", dtype="bf16", allow_lossy_cast=True)
    assert report.written and report.lossy["d"].overflow == 2


def test_a_lossless_cast_passes_silently(tmp_path):
    src = tmp_path / "fine.pth"
    torch.save({"w": torch.tensor([0.5, -2.0, 0.0, 1e-3, -0.0]), "h": torch.tensor([1.0, 6e-8]).half()}, src)
    for dtype in ("bf16", "fp16", "fp32"):
        run = run_cli("convert", src, "-o", tmp_path / f"{dtype}.safetensors", "--dtype", dtype)
        assert run.exit_code == 0, run
        assert "lossy" not in run.stdout and not run.stderr


def test_the_request_and_the_recipe_carry_the_flag(tmp_path, repro):
    recipe = tmp_path / "convert.toml"
    recipe.write_text(
        f'source = "{repro}"\nout = "{tmp_path / "r.safetensors"}"\ndtype = "fp16"\nallow_lossy_cast = true\n'
    )
    assert surgery.ConvertRequest.from_file(recipe).allow_lossy_cast
    run = run_cli("convert", "--recipe", recipe)
    assert run.exit_code == 0, run
    assert (tmp_path / "r.safetensors").exists()


# -- port -----------------------------------------------------------------------
def test_port_into_a_half_template_refuses_a_lossy_cast(repro, tmp_path):
    template = tmp_path / "template.pth"
    torch.save(
        {"w": torch.zeros(3).half(), "b": torch.zeros(2).half(), "n": torch.zeros(3, dtype=torch.int64)},
        template,
    )
    out = tmp_path / "ported.safetensors"
    before = digest(repro)
    run = run_cli("port", repro, "--to", template, "-o", out)
    assert_clean_error(run, repro, contains="loses values", code=1)
    assert "w: 1 overflow to inf, 1 flushed to zero" in run.stdout
    assert "not written (a cast loses values)" in run.stdout
    assert not out.exists() and digest(repro) == before
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "template.pth"]

    run = run_cli("port", repro, "--to", template, "-o", out, "--allow-lossy-cast", "--json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert doc["written"] and doc["lossy_cast"]["w"]["overflow"] == 1
    assert load_file(out)["w"].tolist() == [float("-inf"), 0.0, 1.0]


def test_port_into_a_live_half_module_leaves_it_untouched(tmp_path):
    src = tmp_path / "lin.pth"
    torch.save({"weight": torch.tensor([[1e5, 1.0]]), "bias": torch.tensor([0.25])}, src)
    model = nn.Linear(2, 1).half()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgery.LossyCast, match="weight: 1 overflow to inf"):
        surgery.port(src, into=model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    report = surgery.port(src, into=model, allow_lossy_cast=True)
    assert report.lossy["weight"].overflow == 1 and model.weight[0, 0].item() == float("inf")
    clean = surgery.port(src, into=nn.Linear(2, 1).double())  # widening: nothing to count
    assert clean.lossy == {}


# -- diff -----------------------------------------------------------------------
def test_diff_after_a_lossy_cast_says_what_differs(repro, tmp_path):
    out = tmp_path / "b.safetensors"
    assert run_cli("convert", repro, "-o", out, "--dtype", "fp16", "--allow-lossy-cast").exit_code == 0
    run = run_cli("diff", repro, out)
    assert run.exit_code == 0, run
    assert "none differ" not in run.stdout
    assert (
        "values     w: dtype float32 vs float16, 2 of 3 differ (1 inf on one side), max abs inf" in run.stdout
    )
    doc = json.loads(run_cli("diff", repro, out, "--json").stdout)
    (w,) = [d for d in doc["differences"] if d["name"] == "w"]
    assert (w["differing"], w["inf"], w["nan"], w["nan_both"]) == (2, 1, 0, 0)


def test_diff_counts_inf_and_nan_in_both_apart(tmp_path):
    nan, inf = float("nan"), float("inf")
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"x": torch.tensor([1.0, 2.0, nan, inf]), "h": torch.tensor([nan, 1.0])}, a)
    torch.save({"x": torch.tensor([inf, 2.0, nan, inf]), "h": torch.tensor([nan, 1.0]).half()}, b)
    report = surgery.diff(a, b)
    by_name = {d.name: d for d in report.differences}
    assert (
        by_name["x"].describe()
        == "x: 1 of 4 differ (1 inf on one side), max abs inf, max rel inf, 1 NaN in both"
    )
    assert by_name["h"].describe() == "h: dtype float32 vs float16, values equal, 1 NaN in both"
    run = run_cli("diff", a, b)
    assert "none differ" not in run.stdout
    assert "h: dtype float32 vs float16, values equal, 1 NaN in both" in run.stdout


def test_diff_of_a_rounding_cast_does_not_say_none_differ(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.safetensors"
    torch.save({"w": torch.tensor([1.0, 1.001, 2.0]), "same": torch.tensor([0.5, 1.0])}, a)
    assert run_cli("convert", a, "-o", b, "--dtype", "bf16").exit_code == 0
    run = run_cli("diff", a, b)
    assert "none differ" not in run.stdout
    assert "values     1 tensor of another dtype differs, max abs 0.001 in w" in run.stdout
