"""torch.distributed.checkpoint folders: listed and read from their bytes, nothing unpickled.

Every folder here is written by the real `dcp.save`; the reference for what a
folder holds is torch's own `dcp_to_torch_save` followed by
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import FIXTURES, assert_clean_error, run_cli
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from surgery import SurgeryError, UnsupportedTensor, open_checkpoint
from surgery.formats import pickle_vm
from surgery.formats.torch_pickle import KNOWN, Constant

SHARDED = FIXTURES / "dcp_sharded"


def save_dcp(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():  # "no process group: assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)
    return folder


def torch_reference(folder: Path, tmp: Path) -> dict:
    """What torch itself makes of the folder."""
    out = tmp / f"{folder.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=True)


def assert_identical(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def resnet_dcp(tmp_path_factory, seeded_resnet18) -> tuple[Path, dict]:
    state = seeded_resnet18.state
    folder = tmp_path_factory.mktemp("dcp") / "resnet"
    save_dcp({"model": state, "epoch": 3, "step": torch.tensor(7)}, folder)
    return folder, state


class RunsCommand:
    """Unpickling this runs a shell command: what a hostile checkpoint hides."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def prove_pickle_load_runs(path: Path, marker: Path) -> None:
    """Plain pickle.load of these bytes creates the marker: the test proves something."""
    assert not marker.exists()
    script = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=120)
    assert marker.exists(), "plain pickle.load did not run the payload"
    marker.unlink()


def read_metadata(folder: Path):
    """torch's own view of .metadata: the test wrote it, so loading it is safe here."""
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)


def write_metadata(folder: Path, metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


@pytest.fixture
def small_dcp(tmp_path) -> Path:
    state = {"model": {"conv.weight": torch.randn(2, 3), "conv.bias": torch.randn(2)}, "epoch": 3}
    return save_dcp(state, tmp_path / "small")


# -- listing and reading ------------------------------------------------------------------------


def test_inspect_finds_the_model_beside_epoch_and_step(resnet_dcp):
    folder, state = resnet_dcp
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "dcp"
    assert ckpt.container == ("model",)
    assert [t.name for t in ckpt.tensors] == list(state)  # buffers included
    assert ckpt.num_tensors == len(state) == 122
    assert ckpt.safe and not ckpt.findings
    extras = {e.name: e for e in ckpt.extras}
    assert extras["epoch"].value == 3
    assert extras["step"].value == 7
    assert ckpt.files == [folder / ".metadata", folder / "__0_0.distcp"]
    assert ckpt.description == "torch.distributed.checkpoint folder: 123 tensors in 1 .distcp file"

    run = run_cli("inspect", folder)
    assert run.exit_code == 0, run
    assert "torch.distributed.checkpoint folder" in run.stdout
    assert "epoch: 3" in run.stdout
    assert "layer4" in run.stdout


def test_inspect_json_says_dcp(resnet_dcp):
    folder, state = resnet_dcp
    run = run_cli("inspect", "--json", folder)
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert doc["format"] == "dcp"
    assert doc["container"] == ["model"]
    assert doc["num_tensors"] == len(state)
    assert doc["extras"]["epoch"]["value"] == 3
    assert doc["safe"] is True
    assert doc["metadata"]["distcp_files"] == ["__0_0.distcp"]


def test_state_dict_is_bit_identical_to_torchs_own_conversion(resnet_dcp, tmp_path):
    folder, state = resnet_dcp
    expected = torch_reference(folder, tmp_path)
    assert expected["epoch"] == 3
    got = open_checkpoint(folder).state_dict()
    assert_identical(got, expected["model"])
    assert_identical(got, state)


def test_tensor_bytes_lie_in_the_distcp_file_as_they_are(resnet_dcp):
    folder, state = resnet_dcp
    ckpt = open_checkpoint(folder)
    file, offset, length = ckpt.byte_range("fc.weight")
    assert Path(file) == folder / "__0_0.distcp"
    with open(file, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    assert raw == state["fc.weight"].numpy().tobytes()


def test_the_metadata_file_itself_opens_the_folder(resnet_dcp):
    folder, state = resnet_dcp
    ckpt = open_checkpoint(folder / ".metadata")
    assert ckpt.format == "dcp"
    assert [t.name for t in ckpt.tensors] == list(state)
    run = run_cli("inspect", folder / ".metadata")
    assert run.exit_code == 0, run


def test_dtypes_and_nested_values_come_back_as_saved(tmp_path):
    state = {
        "weights": {
            "bf16": torch.randn(4, 3).to(torch.bfloat16),
            "ids": torch.arange(-5, 5, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "half": torch.randn(2, 2).half(),
            "scalar": torch.tensor(2.5),
        },
        "name": "run-7",
        "history": [torch.ones(2), 5],
    }
    folder = save_dcp(state, tmp_path / "mixed")
    ckpt = open_checkpoint(folder)
    assert ckpt.container == ("weights",)
    assert_identical(ckpt.state_dict(), torch_reference(folder, tmp_path)["weights"])
    extras = {e.name: e for e in ckpt.extras}
    assert extras["name"].value == "run-7"
    assert extras["history"].type == "list"


def test_layout_global_is_named_once():
    data = pickle.dumps(torch.strided, protocol=2)
    assert pickle_vm.run(data, known=KNOWN).value == Constant("torch.strided")


# -- tensors saved in chunks by several ranks ----------------------------------------------------


def test_tensors_saved_by_two_ranks_are_listed_and_assembled(tmp_path):
    ckpt = open_checkpoint(SHARDED)
    assert ckpt.format == "dcp" and ckpt.safe
    assert ckpt.container == ("model",)
    assert {t.name: t.storage for t in ckpt.tensors} == {
        "weight": "2 chunks",
        "proj": "2 chunks",
        "embed": "2 chunks",
        "bias": "__1_0.distcp@5992",
    }
    assert ckpt.description.endswith("in 2 .distcp files")
    assert_identical(ckpt.state_dict(), torch_reference(SHARDED, tmp_path)["model"])


def test_a_chunk_missing_from_storage_data_leaves_the_tensor_listed_but_unread(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for path in SHARDED.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    metadata = read_metadata(folder)
    metadata.storage_data = {
        k: v for k, v in metadata.storage_data.items() if not (k.fqn == "model.weight" and k.index == 1)
    }
    write_metadata(folder, metadata)

    ckpt = open_checkpoint(folder)
    assert "weight" in [t.name for t in ckpt.tensors]
    assert any("'model.weight'" in f.message and f.severity == "corrupt" for f in ckpt.findings)
    with pytest.raises(UnsupportedTensor) as caught:
        ckpt.tensor("weight")
    assert "dcp_to_torch_save" in caught.value.hint
    assert torch.equal(ckpt.tensor("bias"), torch.tensor([0.5, -1.0, 2.0, 4.0]))


@pytest.mark.slow
def test_a_real_two_process_gloo_save_reads_like_the_fixture(tmp_path):
    """The fixture is what two gloo ranks saving DTensors write today."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.path.insert(0, str(FIXTURES))  # the spawned ranks import make_fixtures too
    try:
        from make_fixtures import dcp_sharded_state, write_dcp_fixture

        write_dcp_fixture(tmp_path, port)
    finally:
        sys.path.remove(str(FIXTURES))
    ckpt = open_checkpoint(tmp_path / "dcp_sharded")
    assert [t.storage for t in ckpt.tensors][:3] == ["2 chunks"] * 3
    assert_identical(ckpt.state_dict(), dcp_sharded_state())


# -- hostile and damaged folders ----------------------------------------------------------------


@pytest.mark.slow
def test_payload_in_metadata_is_a_danger_and_never_runs(small_dcp, tmp_path):
    marker = tmp_path / "MARKER"
    metadata = read_metadata(small_dcp)
    metadata.version = RunsCommand(f"touch {marker}")
    write_metadata(small_dcp, metadata)
    prove_pickle_load_runs(small_dcp / ".metadata", marker)

    ckpt = open_checkpoint(small_dcp)
    assert not marker.exists()
    assert ckpt.safe is False
    assert any(f.severity == "danger" and "system(" in f.message for f in ckpt.findings)
    assert [t.name for t in ckpt.tensors] == ["conv.weight", "conv.bias"]
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, code=1)
    assert "danger:" in run.stdout
    assert not marker.exists()


def test_metadata_that_is_only_a_payload_is_refused_with_the_danger(small_dcp, tmp_path):
    marker = tmp_path / "MARKER"
    write_metadata(small_dcp, RunsCommand(f"touch {marker}"))
    prove_pickle_load_runs(small_dcp / ".metadata", marker)

    with pytest.raises(SurgeryError) as caught:
        open_checkpoint(small_dcp)
    assert any(f.severity == "danger" for f in caught.value.findings)
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, contains=".metadata is not the metadata", code=1)
    assert "danger:" in run.stderr
    assert not marker.exists()


def test_payload_in_a_bytes_item_is_a_danger_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    folder = save_dcp({"model": {"w": torch.ones(3)}, "hook": RunsCommand(f"touch {marker}")}, tmp_path / "f")
    assert not marker.exists()
    # DCP loads a bytes item with torch.load(weights_only=False): that runs it.
    info = next(v for k, v in read_metadata(folder).storage_data.items() if k.fqn == "hook")
    raw = (folder / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    torch.load(io.BytesIO(raw), weights_only=False)
    assert marker.exists()
    marker.unlink()

    ckpt = open_checkpoint(folder)
    assert not marker.exists()
    assert ckpt.safe is False
    assert any(
        f.severity == "danger" and "system(" in f.message and "(hook)" in f.where for f in ckpt.findings
    )
    assert torch.equal(ckpt.tensor("w"), torch.ones(3))
    run = run_cli("inspect", folder)
    assert_clean_error(run, folder, code=1)
    assert not marker.exists()


def test_a_missing_distcp_file_is_named(small_dcp):
    (small_dcp / "__0_0.distcp").unlink()
    with pytest.raises(SurgeryError):
        open_checkpoint(small_dcp)
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, contains=".metadata names '__0_0.distcp', which is missing", code=1)


def test_a_truncated_distcp_file_is_a_clean_error(small_dcp):
    distcp = small_dcp / "__0_0.distcp"
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    ckpt = open_checkpoint(small_dcp)
    assert not ckpt.safe
    assert any("truncated" in f.message for f in ckpt.findings)
    with pytest.raises(SurgeryError):
        ckpt.state_dict()
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, contains="truncated", code=1)


@pytest.mark.parametrize("bad", ["../outside.distcp", "/etc/passwd", "sub/../../x.distcp"])
def test_a_relative_path_leaving_the_folder_is_refused(small_dcp, bad):
    metadata = read_metadata(small_dcp)
    for info in metadata.storage_data.values():
        info.relative_path = bad
    write_metadata(small_dcp, metadata)
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, contains="outside the folder", code=1)


def test_metadata_disagreeing_with_the_stored_tensor_is_corrupt(small_dcp):
    metadata = read_metadata(small_dcp)
    metadata.state_dict_metadata["model.conv.bias"].properties.dtype = torch.float64
    write_metadata(small_dcp, metadata)
    ckpt = open_checkpoint(small_dcp)
    problems = [f for f in ckpt.findings if f.severity == "corrupt"]
    assert any("'model.conv.bias'" in f.message and "float64" in f.message for f in problems), problems
    with pytest.raises(SurgeryError):
        ckpt.tensor("conv.bias")
    assert ckpt.tensor("conv.weight").shape == (2, 3)
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, contains="model.conv.bias", code=1)


def test_a_folder_with_only_distcp_files_says_what_is_missing(small_dcp):
    (small_dcp / ".metadata").unlink()
    run = run_cli("inspect", small_dcp)
    assert_clean_error(run, small_dcp, code=1)
