"""surgery accepts what torch's `weights_only` loader accepts, read as data, never imported.

The reference is the installed torch itself: its `_get_allowed_globals()` and the
classes it allowlists with `add_safe_globals` when its modules are imported. Every
difference is listed, with its reason, in `torch_pickle.DIFFERENCES_FROM_TORCH`.
Files here are written by the real `torch.save` and loaded by the real
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from surgery import open_checkpoint
from surgery.formats.pickle_vm import Known
from surgery.formats.torch_pickle import (
    DIFFERENCES_FROM_TORCH,
    EMPTY_LEGACY_TENSOR,
    KNOWN,
    StorageType,
    TensorRef,
    Unsupported,
)

# The modules that call add_safe_globals when imported, besides `import torch` itself.
_TORCH_ALLOWLIST_SCRIPT = """
import json
import torch, torch.nested, torch.distributed.tensor, torch.distributed._serialization, torch._dynamo
from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals
print(json.dumps(sorted({*_get_allowed_globals(), *_get_user_allowed_globals()})))
"""


@pytest.fixture(scope="module")
def torch_allowlist() -> set[str]:
    """What a fresh program's torch.load(weights_only=True) accepts: no test's own additions."""
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_ALLOWLIST_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


@pytest.mark.slow
def test_every_difference_from_torchs_allowlist_is_documented(torch_allowlist):
    differences = set(KNOWN) ^ torch_allowlist
    undocumented = {
        name: "surgery only" if name in KNOWN else "torch only"
        for name in differences - set(DIFFERENCES_FROM_TORCH)
    }
    stale = set(DIFFERENCES_FROM_TORCH) - differences
    assert not undocumented, f"add these to DIFFERENCES_FROM_TORCH with a reason: {undocumented}"
    assert not stale, f"no longer differences, remove from DIFFERENCES_FROM_TORCH: {stale}"
    assert all(len(reason) > 20 for reason in DIFFERENCES_FROM_TORCH.values())


@pytest.mark.slow
def test_the_allowlist_holds_torchs_new_globals(torch_allowlist):
    """The names the hand-copied list had drifted from (torch 2.14)."""
    for name in ("torch.uint4", "torch.int1", "torch.bits8", "torch.bcomplex32", "torch.FloatTensor",
                 "torch.cuda.sparse.LongTensor", "torch.storage.TypedStorage"):  # fmt: skip
        assert name in torch_allowlist
        assert name in KNOWN


def _allowed() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


def test_each_dtype_has_torchs_name_and_element_size():
    dtypes = {name: t for name, t in _allowed().items() if isinstance(t, torch.dtype)}
    assert len(dtypes) > 40
    for name, dtype in dtypes.items():
        ours = KNOWN[name]
        assert f"torch.{ours.name}" == str(dtype) == name
        assert ours.itemsize == dtype.itemsize, name
        assert ours.bits == 8 * dtype.itemsize, name


def test_each_storage_class_has_torchs_dtype():
    storages = {name: t for name, t in _allowed().items() if isinstance(t, torch.serialization.StorageType)}
    assert len(storages) > 20
    for name, storage in storages.items():
        assert isinstance(KNOWN[name], StorageType), name
        assert f"torch.{KNOWN[name].dtype.name}" == str(storage.dtype), name
    assert KNOWN["torch.storage.UntypedStorage"] == StorageType(None)


def test_each_tensor_class_builds_a_tensor_of_its_dtype():
    classes = {name: t for name, t in _allowed().items() if t in torch._tensor_classes}
    assert len(classes) > 30
    for name, cls in classes.items():
        empty = KNOWN[name].fn()
        if "sparse" in name:
            assert isinstance(empty, Unsupported), name
        else:
            assert isinstance(empty, TensorRef) and f"torch.{empty.dtype.name}" == str(cls.dtype), name
            assert empty.unusual == EMPTY_LEGACY_TENSOR


# -- real files --------------------------------------------------------------------------------


class LegacyTensor:
    """Pickles as torch before 0.4 did: `torch.FloatTensor()`, then BUILD with its view."""

    def __init__(self, cls, storage, offset, size, stride):
        self.cls, self.state = cls, (storage, offset, size, stride)

    def __reduce_ex__(self, protocol):
        return (self.cls, (), self.state)


class TensorOfStorage:
    """Pickles as `torch.DoubleTensor(storage)`: a 1-d tensor over the whole storage."""

    def __init__(self, cls, storage):
        self.cls, self.storage = cls, storage

    def __reduce_ex__(self, protocol):
        return (self.cls, (self.storage,))


BIT_DTYPES = ["bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"]
NEW_DTYPES = (
    [f"uint{n}" for n in range(1, 8)] + [f"int{n}" for n in range(1, 8)] + BIT_DTYPES + ["bcomplex32"]
)


def _tensors() -> dict[str, torch.Tensor]:
    """Tensors surgery rebuilds bit for bit, in dtypes torch.save writes."""
    torch.manual_seed(0)
    out = {
        "f8": torch.randn(3, 4).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(5).to(torch.float8_e5m2),
        "f8_e8m0": torch.rand(4).to(torch.float8_e8m0fnu),
        "c64": torch.randn(3, dtype=torch.complex64),
        "c32": torch.randn(3, dtype=torch.complex64).to(torch.complex32),
        "u16": torch.arange(6).to(torch.uint16),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    for name in [*BIT_DTYPES, "bcomplex32"]:
        dtype = getattr(torch, name)
        out[name] = torch.randint(0, 255, (8 * dtype.itemsize,), dtype=torch.uint8).view(dtype)
    return out


def _legacy_tensors() -> dict[str, object]:
    storage = torch.FloatStorage([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    return {
        "legacy": LegacyTensor(torch.FloatTensor, storage, 1, (2, 3), (3, 1)),
        "legacy_int": LegacyTensor(torch.LongTensor, torch.LongStorage([7, 8, 9]), 0, (3,), (1,)),
        "legacy_of_storage": TensorOfStorage(torch.DoubleTensor, torch.DoubleStorage([1.5, 2.5])),
    }


def _values() -> dict[str, object]:
    """Everything else torch.load(weights_only=True) accepts, as values beside the weights."""
    values = {
        "dtypes": [getattr(torch, name) for name in NEW_DTYPES],
        "uint4": torch.uint4,
        "float_tensor_class": torch.FloatTensor,
        "tensor_classes": [torch.cuda.HalfTensor, torch.sparse.FloatTensor, torch.cuda.sparse.LongTensor],
        "typed_storage_class": torch.storage.TypedStorage,
        "legacy_storage": torch.FloatStorage([1.0, 2.0]),
        "typed_storage": torch.TypedStorage([1.0, 2.0], dtype=torch.float64),
        "untyped_storage": torch.UntypedStorage(4),
        "size": torch.Size([2, 3]),
        "device": torch.device("cuda", 1),
        "complex": complex(1, 2),
        "layout": torch.sparse_coo,
        "qscheme": torch.per_channel_affine,
        "counter": Counter("aab"),
        "set": {1, 2},
        "bytearray": bytearray(b"ab"),
        "quantized": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8),
        "quantized_per_channel": torch.quantize_per_channel(
            torch.ones(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0, torch.qint8
        ),
        "sparse": torch.ones(2, 2).to_sparse(),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "jagged": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
        "meta": torch.empty(2, device="meta"),
        "exception": ValueError("boom"),
        "os_error": FileNotFoundError(2, "missing"),
        "stack": traceback.StackSummary.from_list([("train.py", 1, "step", "loss.backward()")]),
    }
    return values


@pytest.fixture(scope="module")
def accepted_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("allowlist") / "accepted.pt"
    with warnings.catch_warnings():  # TypedStorage is deprecated
        warnings.simplefilter("ignore")
        torch.save({"weights": {**_tensors(), **_legacy_tensors()}, "values": _values()}, path)
        loaded = torch.load(path, weights_only=True)
    return path, loaded


def test_torch_loads_the_file_with_weights_only(accepted_file):
    path, loaded = accepted_file
    assert loaded["values"]["uint4"] is torch.uint4
    assert torch.equal(loaded["weights"]["legacy"], torch.tensor([[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]))


def test_surgery_finds_nothing_to_report_in_what_torch_accepts(accepted_file):
    path, _ = accepted_file
    ckpt = open_checkpoint(path)
    assert ckpt.findings == []
    assert ckpt.safe
    run = run_cli("inspect", path)
    assert run.exit_code == 0, run
    assert "unsafe" not in run.stdout and "danger" not in run.stdout


def test_tensors_in_new_dtypes_and_legacy_forms_are_rebuilt_as_torch_loads_them(accepted_file):
    path, loaded = accepted_file
    ckpt = open_checkpoint(path, key="weights")
    expected = loaded["weights"]
    assert [t.name for t in ckpt.tensors] == list(expected)
    for name, tensor in expected.items():
        got = ckpt.tensor(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.stride() == tensor.stride(), (
            name
        )
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
    assert isinstance(ckpt.tensor("param"), torch.nn.Parameter)


def test_what_surgery_cannot_rebuild_is_listed_as_unsupported(accepted_file):
    path, _ = accepted_file
    values = open_checkpoint(path, key="values")
    extras = {e.name: e.summary for e in values.extras}
    assert extras["sparse"] == "sparse tensor (not rebuilt by surgery)"
    assert extras["nested"] == "nested tensor (not rebuilt by surgery)"
    assert extras["jagged"] == "NestedTensor (not rebuilt by surgery)"
    assert extras["uint4"] == "torch.uint4"
    assert extras["float_tensor_class"] == "torch.FloatTensor"
    notes = {t.name: t.note for t in values.tensors}
    assert notes == {"quantized": "quantized", "quantized_per_channel": "quantized", "meta": "meta (no data)"}


def test_a_legacy_tensor_of_a_storage_of_another_dtype_is_refused_as_torch_refuses_it(tmp_path):
    path = tmp_path / "mismatch.pt"
    torch.save({"w": LegacyTensor(torch.FloatTensor, torch.DoubleStorage([1.0]), 0, (1,), (1,))}, path)
    with pytest.raises(RuntimeError, match="Expected a Storage of type"):
        torch.load(path, weights_only=True)
    run = run_cli("inspect", path)
    assert run.exit_code == 1, run
    assert "set_ of a float32 tensor to a float64 storage" in run.stdout + run.stderr


def test_a_tensor_saved_through_its_cpu_copy_is_rebuilt(tmp_path):
    """Devices such as XLA save `_rebuild_device_tensor_from_cpu_tensor(cpu_tensor, dtype, device, grad)`."""

    class ViaCpu:
        def __init__(self, tensor):
            self.tensor = tensor

        def __reduce_ex__(self, protocol):
            rebuild = torch._utils._rebuild_device_tensor_from_cpu_tensor
            return (rebuild, (self.tensor, self.tensor.dtype, "cpu", False))

    path = tmp_path / "via_cpu.pt"
    torch.save({"w": ViaCpu(torch.arange(4.0)), "other": torch.ones(1)}, path)
    expected = torch.load(path, weights_only=True)["w"]
    ckpt = open_checkpoint(path)
    assert ckpt.findings == []
    assert torch.equal(ckpt.tensor("w"), expected)


def test_a_class_torch_accepts_only_when_the_program_allowlists_it_is_unsafe(tmp_path):
    """add_safe_globals is the loading program's choice: a file cannot carry it."""
    path = tmp_path / "namespace.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        torch.load(path, weights_only=True)
    [finding] = open_checkpoint(path).findings
    assert finding.severity == "unsafe"
    assert "argparse.Namespace" in finding.message and "add_safe_globals" in finding.message


def test_accepted_names_are_never_imported():
    """Every stand-in is surgery's own: no torch, traceback or distributed object inside."""
    for name, stand_in in KNOWN.items():
        target = stand_in.fn if isinstance(stand_in, Known) else stand_in
        assert type(target).__module__.split(".")[0] in ("surgery", "builtins"), name
        assert getattr(target, "__module__", "surgery").startswith("surgery"), name
