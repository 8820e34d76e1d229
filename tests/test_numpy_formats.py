"""NumPy in checkpoints: `.npy`/`.npz` files and detectron2-style `.pkl` state_dicts of numpy arrays.

Files are written by numpy and pickle themselves. Tensors surgery reads from their bytes must
equal what `np.load` or `pickle.load` + `torch.from_numpy` give (computed here, in the test
only); object arrays, whose data is a pickle, are judged by the pickle machine and never run.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess

import surgery
from surgery import open_checkpoint

RNG = np.random.default_rng(0)
ARRAYS = {
    "float32": RNG.standard_normal((3, 4)).astype(np.float32),
    "float64_fortran": np.asfortranarray(RNG.standard_normal((2, 5))),
    "float16": RNG.standard_normal(7).astype(np.float16),
    "int64_big_endian": np.arange(6, dtype=">i8").reshape(2, 3),
    "int8": np.arange(-3, 3, dtype=np.int8),
    "uint8": np.arange(5, dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "complex64": (RNG.standard_normal(3) + 1j * RNG.standard_normal(3)).astype(np.complex64),
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def as_torch(array: np.ndarray) -> torch.Tensor:
    """What a user gets from numpy: torch.from_numpy (which needs native byte order)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array)


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    if got.numel() > 1:
        assert got.stride() == want.stride()


class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# -- .npy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARRAYS)
def test_a_numeric_npy_is_one_tensor_equal_to_np_load(tmp_path, name):
    path = tmp_path / f"{name}.npy"
    np.save(path, ARRAYS[name])
    ckpt = open_checkpoint(path)
    assert ckpt.format == "npy" and ckpt.safe and ckpt.findings == []
    (info,) = ckpt.tensors
    assert (info.name, list(info.shape)) == ("tensor", list(ARRAYS[name].shape))
    assert_same_tensor(ckpt.tensor("tensor"), as_torch(np.load(path)))


def test_npy_inspects_as_a_tensor(tmp_path):
    np.save(tmp_path / "w.npy", ARRAYS["float32"])
    run = run_cli("inspect", tmp_path / "w.npy")
    assert run.exit_code == 0, run
    assert "  format      a NumPy .npy array" in run.stdout
    assert "  tensor  [3, 4]  float32" in run.stdout


def test_an_npy_of_strings_holds_no_tensor_and_is_safe(tmp_path):
    np.save(tmp_path / "s.npy", np.array(["ab", "c"]))
    ckpt = open_checkpoint(tmp_path / "s.npy")
    assert ckpt.tensors == () and ckpt.safe


def test_an_object_npy_is_read_through_the_pickle_machine(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([1, "x", {"k": 2.5}], dtype=object), allow_pickle=True)
    ckpt = open_checkpoint(path)
    assert ckpt.safe
    (notice,) = ckpt.findings
    assert notice.severity == "notice" and "np.load(allow_pickle=True) would run" in notice.message


def test_an_object_npy_whose_pickle_runs_code_is_danger_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([RunsCommand(f"touch {marker}")], dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)  # numpy runs it: the test proves something
    assert marker.exists()
    marker.unlink()
    ckpt = open_checkpoint(path)
    assert not ckpt.safe
    assert any(f.severity == "danger" and "system" in f.message for f in ckpt.findings)
    for run in (run_cli("scan", path), run_subprocess("scan", path)):
        assert run.exit_code == 1
        assert run.stdout.startswith(f"  danger   {path}  npy: global posix.system")
    assert not marker.exists()


def test_a_truncated_npy_is_corrupt(tmp_path):
    np.save(tmp_path / "w.npy", ARRAYS["float32"])
    raw = (tmp_path / "w.npy").read_bytes()
    (tmp_path / "w.npy").write_bytes(raw[:-8])
    ckpt = open_checkpoint(tmp_path / "w.npy")
    assert any(
        f.severity == "corrupt" and "declares 48 bytes, the file holds 40" in f.message for f in ckpt.findings
    )
    with pytest.raises(surgery.SurgeryError):
        ckpt.tensor("tensor")


@pytest.mark.parametrize(
    "header",
    [
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, -1), }",
        b"{'descr': '<f4', 'fortran_order': False}",
        b"__import__('os').system('touch MARKER')",
        b"(" * 5000 + b")" * 5000,
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (2**40, 2**40), }",
    ],
    ids=["negative_size", "no_shape", "code_is_never_evaluated", "deep_nesting", "numel_beyond_int64"],
)
def test_a_bad_npy_header_is_one_clean_error(tmp_path, monkeypatch, header):
    monkeypatch.chdir(tmp_path)
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    path = tmp_path / "bad.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16))
    for run in (run_cli("inspect", path), run_subprocess("inspect", path)):
        assert_clean_error(run, path, code=1)
    assert not (tmp_path / "MARKER").exists()


# -- .npz -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_npz_members_are_tensors_equal_to_np_load(tmp_path, save):
    path = tmp_path / "arrays.npz"
    save(path, **ARRAYS)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "npz" and ckpt.safe
    assert [t.name for t in ckpt.tensors] == list(ARRAYS)
    loaded = np.load(path)
    state = ckpt.state_dict()
    for name in ARRAYS:
        assert_same_tensor(state[name], as_torch(loaded[name]))


def test_an_npz_object_member_with_a_payload_is_danger(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "arrays.npz"
    np.savez_compressed(
        path, w=ARRAYS["float32"], hook=np.array([RunsCommand(f"touch {marker}")], dtype=object)
    )
    ckpt = open_checkpoint(path)
    assert any(
        f.severity == "danger" and f.where.startswith(f"{path}: hook.npy byte ") for f in ckpt.findings
    ), ckpt.findings
    assert [t.name for t in ckpt.tensors] == ["w"]
    assert not marker.exists()


def test_a_zip_of_other_files_is_still_not_a_checkpoint(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("a.npy.txt", "hello")
    run = run_cli("inspect", tmp_path / "docs.zip")
    assert_clean_error(run, tmp_path / "docs.zip", contains="not a torch checkpoint", code=1)


# -- detectron2-style .pkl: pickled dicts of numpy arrays ----------------------------------------------

D2_MODEL = OrderedDict(
    [
        ("backbone.conv1.weight", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        ("backbone.conv1.norm.running_mean", RNG.standard_normal(4).astype(np.float32)),
        ("roi_heads.box_predictor.bbox_pred.bias", RNG.standard_normal(8)),
        (
            "roi_heads.box_predictor.cls_score.weight",
            np.asfortranarray(RNG.standard_normal((3, 5)).astype(np.float32)),
        ),
        ("zeros", np.zeros(16, dtype=np.float32)),
    ]
)


def detectron2_pkl(path: Path, protocol: int, **beside) -> Path:
    """What detectron2's conversion scripts write: {'model': {name: ndarray}, '__author__': ...}."""
    with open(path, "wb") as f:
        pickle.dump(
            {"model": D2_MODEL, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True, **beside},
            f,
            protocol=protocol,
        )
    return path


def _py2_str(raw: bytes) -> bytes:
    return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw


def python2_blobs_pkl(path: Path, blobs: dict[str, np.ndarray]) -> Path:
    """A Caffe2 Detectron `.pkl` as Python 2 wrote it: protocol 2, str (BINSTRING) data."""
    out = bytearray(b"\x80\x02}(" + _py2_str(b"blobs") + b"}(")
    for name, array in blobs.items():
        order = "F" if array.flags.f_contiguous and array.ndim > 1 else "C"
        data = array.tobytes(order=order)
        out += _py2_str(name.encode())
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
        out += b"(K\x01(" + b"".join(b"J" + struct.pack("<i", n) for n in array.shape) + b"t"
        out += b"cnumpy\ndtype\n" + _py2_str(array.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
        out += (
            b"(K\x03"
            + _py2_str(array.dtype.str[:1].encode())
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        )
        out += (b"\x88" if order == "F" else b"\x89") + _py2_str(data) + b"tb"
    path.write_bytes(bytes(out + b"uu."))
    return path


def reference(path: Path) -> dict[str, torch.Tensor]:
    """What detectron2 does with the file (pickle.load, latin1 for Python 2 files), then from_numpy."""
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    model = obj.get("model", obj.get("blobs"))
    return {name: as_torch(array) for name, array in model.items()}


@pytest.mark.parametrize("protocol", range(6))
def test_a_detectron2_pkl_is_a_state_dict_equal_to_pickle_load(tmp_path, protocol):
    path = detectron2_pkl(tmp_path / "model_final.pkl", protocol)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "pickle" and ckpt.container == ("model",)
    assert [t.name for t in ckpt.tensors] == list(D2_MODEL)
    assert ckpt.safe, ckpt.findings
    assert {e.name: e.summary for e in ckpt.extras} == {
        "__author__": "'Detectron2 Model Zoo'",
        "matching_heuristics": "True",
    }
    state = ckpt.state_dict()
    for name, want in reference(path).items():
        assert_same_tensor(state[name], want)


def test_a_python2_detectron_pkl_reads_its_str_data_as_bytes(tmp_path):
    blobs = {
        "conv1_w": D2_MODEL["backbone.conv1.weight"],
        "fc_b": D2_MODEL["roi_heads.box_predictor.bbox_pred.bias"],
    }
    blobs["big_endian"] = np.arange(300, dtype=">f4")  # > 255 bytes: BINSTRING
    blobs["fortran"] = D2_MODEL["roi_heads.box_predictor.cls_score.weight"]
    path = python2_blobs_pkl(tmp_path / "R-50.pkl", blobs)
    ckpt = open_checkpoint(path)
    assert ckpt.container == ("blobs",) and ckpt.safe
    state = ckpt.state_dict()
    for name, want in reference(path).items():
        assert_same_tensor(state[name], want)
    assert all(ckpt.byte_range(name) for name in ("conv1_w", "fc_b"))  # read straight from the file


def test_a_detectron2_pkl_ports_into_a_model(tmp_path):
    path = detectron2_pkl(tmp_path / "model_final.pkl", 2)
    model = torch.nn.Module()
    model.conv1 = torch.nn.Conv2d(3, 4, 3, bias=False)
    report = surgery.port(path, into=model, strict=False, match="suffix")
    assert [(m.source, m.target) for m in report.plan.matched] == [("backbone.conv1.weight", "conv1.weight")]
    assert torch.equal(model.conv1.weight.detach(), torch.from_numpy(D2_MODEL["backbone.conv1.weight"]))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_detectron2_pkl_converts_to_safetensors(tmp_path, protocol):
    from safetensors.torch import load_file

    path = detectron2_pkl(tmp_path / "model_final.pkl", protocol)
    run = run_cli("convert", path, "-o", tmp_path / "out.safetensors", "--verify")
    assert run.exit_code == 0, run
    out = load_file(tmp_path / "out.safetensors")
    for name, want in reference(path).items():
        assert torch.equal(out[name], want.contiguous())


def test_a_payload_beside_numpy_arrays_is_danger(tmp_path):
    marker = tmp_path / "MARKER"
    path = detectron2_pkl(tmp_path / "model_final.pkl", 4, hook=RunsCommand(f"touch {marker}"))
    ckpt = open_checkpoint(path)
    assert [f.severity for f in ckpt.findings] == ["danger", "notice"]
    assert [t.name for t in ckpt.tensors] == list(D2_MODEL)
    assert not marker.exists()


def test_numpy_classes_other_than_arrays_stay_findings(tmp_path):
    path = tmp_path / "masked.pkl"
    with open(path, "wb") as f:
        pickle.dump({"m": np.ma.masked_array([1.0, 2.0], mask=[0, 1])}, f, protocol=2)
    ckpt = open_checkpoint(path)
    assert any(f.severity == "unsafe" and "MaskedArray" in f.message for f in ckpt.findings), ckpt.findings


def test_numpy_scalars_in_a_plain_pickle_are_their_values(tmp_path):
    path = tmp_path / "metrics.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {
                "model": {"w": np.ones(2, np.float32), "b": np.zeros(2, np.float32)},
                "acc": np.float64(0.913),
                "step": np.int32(7),
                "ok": np.bool_(True),
            },
            f,
            protocol=2,
        )
    ckpt = open_checkpoint(path)
    assert ckpt.safe
    assert {e.name: e.value for e in ckpt.extras} == {"acc": 0.913, "step": 7, "ok": True}


def test_numpy_in_a_torch_file_is_still_unsafe():
    """torch.load(weights_only=True) refuses numpy: the torch readers do not model it."""
    from conftest import FIXTURES

    ckpt = open_checkpoint(FIXTURES / "numpy_extras.pth")
    assert {f.severity for f in ckpt.findings} == {"unsafe"}


def test_an_array_whose_data_does_not_fit_its_shape_is_corrupt(tmp_path):
    raw = pickle.dumps({"w": np.arange(4, dtype=np.float32)}, protocol=4)
    raw = raw.replace(struct.pack("<B", 4) + b"\x85", struct.pack("<B", 5) + b"\x85", 1)  # shape (5,)
    path = tmp_path / "bad.pkl"
    path.write_bytes(raw)
    ckpt = open_checkpoint(path)
    assert any(f.severity == "corrupt" and "holds 16 bytes" in f.message for f in ckpt.findings), (
        ckpt.findings
    )
    with pytest.raises(surgery.UnsupportedTensor):
        ckpt.tensor("w")
    doc = json.loads(run_cli("inspect", "--json", path).stdout)
    assert doc["safe"] is False
