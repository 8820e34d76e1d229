"""Conjugate and negative tensors (`torch.save(x.conj())`, `x.conj().imag`): read, converted
and compared as torch shows them.

torch saves such a tensor's bytes unresolved and records the bit in the pickle
(`{'conj': True}`, `{'neg': True}`); `torch.load` gives back a view with the bit set.
Every file here is written by `torch.save` and every value checked against
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

import surgery


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=torch.complex64)
    return {
        "conj": z.conj(),  # shares its storage with `z`: same bytes, other values
        "z": z,
        "neg": torch.randn(5, dtype=torch.complex128).conj().imag,  # float64 with the neg bit
        "conj_t": torch.randn(4, 2, dtype=torch.complex64).conj().t(),  # strided and conjugate
        "plain": torch.arange(6, dtype=torch.float32),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bits") / "bits.pt"
    torch.save(_state(), path)
    return path


@pytest.fixture(scope="module")
def expected(source) -> dict[str, torch.Tensor]:
    return torch.load(source, weights_only=True)


def test_torch_keeps_the_bits_this_file_is_about(expected):
    assert expected["conj"].is_conj() and expected["neg"].is_neg() and expected["conj_t"].is_conj()


def test_tensors_read_as_torch_load_gives_them(source, expected):
    ckpt = surgery.open_checkpoint(source)
    for name, want in expected.items():
        got = ckpt.tensor(name)
        assert torch.equal(got, want), name
        assert (got.is_conj(), got.is_neg()) == (want.is_conj(), want.is_neg()), name
        assert got.stride() == want.stride(), name


def test_conjugate_view_of_a_tensor_is_not_its_alias(source):
    """`z` and `z.conj()` share one storage and one view; only the bit tells them apart."""
    assert surgery.open_checkpoint(source).aliases == {}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_convert_writes_the_values_torch_loads(source, expected, tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    result = surgery.convert(source, out, verify=True)
    assert result.verified == len(expected)
    assert result.raw == 2  # only `z` and `plain` lie as plain bytes; the bits are resolved for the rest
    loaded = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert set(loaded) == set(expected)
    for name, want in expected.items():
        assert torch.equal(loaded[name], want.resolve_conj().resolve_neg()), name
        assert loaded[name].dtype == want.dtype, name


def test_convert_through_the_cli(source, expected, tmp_path):
    out = tmp_path / "cli.safetensors"
    run = run_cli("convert", source, "-o", out, "--verify")
    assert run.exit_code == 0, run.stderr
    assert torch.equal(load_file(out)["conj"], expected["conj"])


def test_cast_of_a_conjugate_tensor(source, expected, tmp_path):
    out = tmp_path / "fp16.pt"
    surgery.convert(source, out, dtype="fp16", verify=True)
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["neg"], expected["neg"].to(torch.float16))


def test_diff_of_a_file_and_its_conversion_is_identical(source, tmp_path):
    out = tmp_path / "same.safetensors"
    surgery.convert(source, out)
    changes = surgery.diff(source, out)
    assert changes.same, changes.summary()
    run = run_cli("diff", source, out, "--exit-code")
    assert run.exit_code == 0, run.stderr


def test_diff_measures_the_values_not_the_bytes(tmp_path, expected):
    """The same bytes with and without the conjugate bit are different values."""
    z = expected["z"]
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": z.conj(), "n": expected["neg"]}, a)
    torch.save({"w": z.clone(), "n": expected["neg"].clone()}, b)  # `n`: same values, resolved
    changes = surgery.diff(a, b)
    (difference,) = changes.differences
    assert difference.name == "w" and difference.differing == (z.imag != 0).sum()
    assert difference.max_abs == pytest.approx(float((z.conj() - z).abs().max()), rel=1e-6)
    assert changes.identical == 1


def test_negative_scalar_beside_the_state_dict_shows_its_value(tmp_path):
    path = tmp_path / "scalar.pt"
    best = torch.tensor(1.5 + 2.5j).conj().imag  # -2.5, stored as 2.5 with the neg bit
    torch.save({"state_dict": {"w": torch.ones(2)}, "best": best}, path)
    assert float(torch.load(path, weights_only=True)["best"]) == -2.5
    extras = {e.name: e for e in surgery.open_checkpoint(path).extras}
    assert extras["best"].value == -2.5
