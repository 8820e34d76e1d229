"""The Python API: open_checkpoint, lazy tensors, loading into real torchvision models."""

from __future__ import annotations

import hashlib

import pytest
from conftest import FIXTURES

import surgery
from surgery import open_checkpoint


@pytest.fixture(scope="module")
def resnet18_file(seeded_resnet18):
    """The ImageNet example's checkpoint of the seeded resnet18, and that model."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(seeded_resnet18.state)
    return seeded_resnet18.imagenet, model


def test_resnet18_checkpoint_summary_matches_the_model(resnet18_file):
    path, model = resnet18_file
    ckpt = open_checkpoint(path)
    assert ckpt.container == ("state_dict",) and ckpt.prefix == "module."
    assert ckpt.num_tensors == len(model.state_dict()) == 122
    assert ckpt.num_params == sum(t.numel() for t in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    assert ckpt.dtypes == {"float32": 102, "int64": 20}


def test_state_dict_loads_strictly_into_the_architecture(resnet18_file):
    import torch
    import torchvision

    path, model = resnet18_file
    weights = open_checkpoint(path).state_dict()
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_one_tensor_by_name_reads_only_that_tensor(resnet18_file):
    import torch

    path, model = resnet18_file
    ckpt = open_checkpoint(path)
    assert torch.equal(ckpt.tensor("module.fc.weight"), model.fc.weight)
    with pytest.raises(KeyError):
        ckpt.tensor("fc.weight")


def test_writing_to_a_loaded_tensor_never_changes_the_file(tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes((FIXTURES / "tiny.safetensors").read_bytes())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = open_checkpoint(path).state_dict()
    weights["fc.weight"].zero_()
    del weights
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_opening_reports_metadata_without_importing_torch_into_the_result():
    ckpt = surgery.open_checkpoint(FIXTURES / "imagenet_example.pth.tar")
    assert repr(ckpt).endswith("torch-zip: 14 tensors, 0 findings>")
    info = ckpt.tensors[0]
    assert (info.name, info.shape, info.dtype, info.numel, info.nbytes) == (
        "module.conv1.weight",
        (8, 3, 3, 3),
        "float32",
        216,
        864,
    )
    assert [e.name for e in ckpt.extras] == ["epoch", "arch", "best_acc1", "optimizer", "scheduler"]
    assert ckpt.safe


def test_parameters_saved_as_parameters_come_back_as_parameters(tmp_path):
    import torch

    path = tmp_path / "params.pt"
    torch.save(
        {
            "w": torch.nn.Parameter(torch.ones(3)),
            "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        },
        path,
    )
    sd = open_checkpoint(path).state_dict()
    assert isinstance(sd["w"], torch.nn.Parameter) and sd["w"].requires_grad
    assert isinstance(sd["frozen"], torch.nn.Parameter) and not sd["frozen"].requires_grad


def test_quantized_tensors_are_listed_but_not_rebuilt(tmp_path):
    import torch

    path = tmp_path / "q.pt"
    torch.save(
        {"q": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8), "f": torch.ones(2)}, path
    )
    ckpt = open_checkpoint(path)
    assert [(t.name, t.dtype, t.note) for t in ckpt.tensors] == [
        ("q", "qint8", "quantized"),
        ("f", "float32", None),
    ]
    with pytest.raises(surgery.UnsupportedTensor, match="quantized"):
        ckpt.tensor("q")
    assert torch.equal(ckpt.tensor("f"), torch.ones(2))


def test_big_endian_files_are_byte_swapped_like_torch_does(tmp_path):
    """A torch zip written on a big-endian machine: `byteorder` says big, storages are swapped."""
    import io
    import zipfile

    import torch

    original = {"w": torch.randn(3, 4), "i": torch.arange(5), "h": torch.randn(6).half()}
    buf = io.BytesIO()
    torch.save(original, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    refs = {"0": 4, "1": 8, "2": 2}  # storage key -> element size, in save order
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            key = info.filename.rsplit("/", 1)[-1]
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                k = refs[key]
                data = b"".join(data[i : i + k][::-1] for i in range(0, len(data), k))
            out.writestr(info.filename, data)
    expected = torch.load(path, weights_only=True)
    ours = open_checkpoint(path).state_dict()
    for name, tensor in original.items():
        assert torch.equal(expected[name], tensor)
        assert torch.equal(ours[name], tensor)


@pytest.mark.parametrize("read", ["pieces", "rows"])
def test_a_file_cut_short_after_opening_is_corrupt_when_its_bytes_are_read(tmp_path, read):
    """Opened whole, then truncated (a copy still being written, a disk gone full): the piece or
    rows read past the new end say so, not zeros or a short tensor."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.arange(4096.0).reshape(64, 64)}, str(path))
    ckpt = open_checkpoint(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(surgery.SurgeryError, match="'w': the file ends inside its data"):
        list(ckpt.pieces("w", 1024)) if read == "pieces" else ckpt.rows("w", 60, 64)
    assert torch.equal(ckpt.rows("w", 0, 2), torch.arange(128.0).reshape(2, 64))  # what is there still reads
