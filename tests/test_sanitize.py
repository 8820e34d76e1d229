"""`surgery sanitize`: checkpoints `torch.load(weights_only=True)` refuses, rewritten so it accepts
them, tensors bit for bit, without running anything.

Sources are real `torch.save` files (zip and legacy), a PyTorch 0.3 tar, numpy pickles; the
proof is torch itself: `weights_only=True` refuses the source and loads the output.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_clean_error, run_cli, run_subprocess
from doc_pages import CONSOLE, PYTHON, unsafe_training_checkpoint
from test_scan import torch03_tar

import surgery
from surgery.formats.tensors import same_bytes


class MyConfig:
    """A config class of the training script: weights_only cannot import it."""

    def __init__(self):
        self.lr = 0.1
        self.out_dir = pathlib.PosixPath("/runs/resnet")
        self.mode = Mode.TRAIN


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Canary:
    """Loading this creates a file: sanitize must never do it."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def model_state() -> OrderedDict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2))
    return model.state_dict()


def refuses_weights_only(path: pathlib.Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return True
    return False


@pytest.fixture
def training_checkpoint(tmp_path):
    """What training scripts save: the weights beside objects weights_only refuses."""
    state = model_state()
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "state_dict": state,
            "args": argparse.Namespace(lr=0.1, arch="tiny"),
            "best": np.float64(0.9),
            "cfg": MyConfig(),
        },
        path,
    )
    return path, state


def test_weights_only_refuses_the_source_and_loads_the_output(training_checkpoint, tmp_path):
    source, state = training_checkpoint
    before = source.read_bytes()
    assert refuses_weights_only(source)
    report = surgery.sanitize(source, tmp_path / "clean.pth")
    loaded = torch.load(tmp_path / "clean.pth", weights_only=True)
    assert loaded["args"] == {"lr": 0.1, "arch": "tiny"}
    assert loaded["best"] == 0.9 and type(loaded["best"]) is float
    assert loaded["cfg"] == {"lr": 0.1, "out_dir": "/runs/resnet", "mode": "train"}
    assert type(loaded["state_dict"]) is OrderedDict
    assert list(loaded["state_dict"]) == list(state)
    for name, tensor in state.items():
        assert same_bytes(loaded["state_dict"][name], tensor), name
    assert loaded["state_dict"]._metadata == state._metadata  # BatchNorm's version, as torch saved it
    assert source.read_bytes() == before
    assert [str(c) for c in report.changes] == [
        "args: argparse.Namespace -> dict of its 2 attributes (lr, arch)",
        "best: numpy.float64 -> float 0.9",
        "cfg: test_sanitize.MyConfig -> dict of its 3 attributes (lr, out_dir, mode)",
        "cfg.out_dir: pathlib.PosixPath -> str '/runs/resnet'",
        "cfg.mode: test_sanitize.Mode -> its argument 'train'",
    ]
    assert report.dropped == [] and report.tensors == len(state) and report.written


def test_the_output_scans_safe_and_loads_into_the_model(training_checkpoint, tmp_path):
    source, state = training_checkpoint
    surgery.sanitize(source, tmp_path / "clean.pth")
    assert surgery.scan([tmp_path / "clean.pth"]).results[0].verdict == "safe"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2))
    model.load_state_dict(torch.load(tmp_path / "clean.pth", weights_only=True)["state_dict"])


def test_a_payload_is_dropped_reported_and_never_run(tmp_path):
    marker = tmp_path / "CANARY"
    state = model_state()
    source = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "hook": Canary(marker), "epoch": 3}, source)
    torch.load(source, weights_only=False)  # the canary is real
    assert marker.exists()
    marker.unlink()
    report = surgery.sanitize(source, tmp_path / "clean.pth")
    assert not marker.exists()
    (dropped,) = report.dropped
    assert dropped.where == "hook" and dropped.what.startswith("posix.system('touch ")
    assert dropped.became.startswith("dropped: reaches `posix`")
    loaded = torch.load(tmp_path / "clean.pth", weights_only=True)
    assert set(loaded) == {"state_dict", "epoch"}
    assert not marker.exists()


def test_tensors_keep_their_storages_views_and_flags(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    tied = torch.randn(5, 3)
    values = {
        "matrix": base.view(4, 6),
        "transposed": base.view(4, 6).t(),  # strided
        "window": base[5:11],  # an offset into the same storage
        "embed": tied,
        "head": tied,  # tied weights: one tensor, two names
        "param": torch.nn.Parameter(torch.ones(3)),
        "frozen": torch.nn.Parameter(torch.zeros(2), requires_grad=False),
        "conj": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj(),
        "fp8": torch.tensor([0.5, 1.0]).to(torch.float8_e4m3fn),  # no storage class: _rebuild_tensor_v3
        "u16": torch.tensor([1, 65535]).to(torch.uint16),
        "bf16": torch.randn(4).to(torch.bfloat16),
        "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    for legacy in (False, True):
        source = tmp_path / f"views-{legacy}.pth"
        torch.save(
            {**values, "ns": argparse.Namespace(k=1)}, source, _use_new_zipfile_serialization=not legacy
        )
        report = surgery.sanitize(source, tmp_path / f"clean-{legacy}.pth")
        out = torch.load(tmp_path / f"clean-{legacy}.pth", weights_only=True)
        for name, want in values.items():
            got = out[name]
            assert type(got) is type(want) and got.requires_grad == want.requires_grad, name
            assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset(), name
            assert got.is_conj() == want.is_conj(), name
            assert same_bytes(got.resolve_conj(), want.resolve_conj()), name
        assert out["head"] is out["embed"]
        shared = {out[n].untyped_storage().data_ptr() for n in ("matrix", "transposed", "window")}
        assert len(shared) == 1
        assert report.storages == 10  # the views share one, the tied weights another


def test_a_whole_pickled_module_becomes_its_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save({"model": model, "epoch": 5}, tmp_path / "full.pth")
    report = surgery.sanitize(tmp_path / "full.pth", tmp_path / "clean.pth")
    loaded = torch.load(tmp_path / "clean.pth", weights_only=True)
    assert [str(c) for c in report.changes] == [
        "model: torch.nn.modules.container.Sequential -> its state_dict (4 tensors)"
    ]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    fresh.load_state_dict(loaded["model"])
    for name, tensor in model.state_dict().items():
        assert same_bytes(fresh.state_dict()[name], tensor)


def test_numpy_values_become_tensors_and_python_numbers(tmp_path):
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    source = tmp_path / "numpy.pth"
    torch.save(
        {
            "w": torch.ones(2),
            "array": array,
            "fortran": np.asfortranarray(np.eye(3)),
            "steps": np.int32(7),
            "flag": np.bool_(True),
        },
        source,
    )
    report = surgery.sanitize(source, tmp_path / "clean.pth")
    loaded = torch.load(tmp_path / "clean.pth", weights_only=True)
    assert torch.equal(loaded["array"], torch.from_numpy(array.astype("<f4")))
    assert loaded["fortran"].stride() == torch.from_numpy(np.asfortranarray(np.eye(3))).stride()
    assert (loaded["steps"], loaded["flag"]) == (7, True)
    assert "array: numpy.ndarray [2, 3] float32 -> tensor" in [str(c) for c in report.changes]


def test_a_detectron2_pkl_becomes_a_torch_file(tmp_path):
    model = {
        "backbone.conv1.weight": np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    }
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    surgery.sanitize(tmp_path / "model_final.pkl", tmp_path / "model_final.pth")
    loaded = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert loaded["__author__"] == "Detectron2 Model Zoo"
    assert torch.equal(
        loaded["model"]["backbone.conv1.weight"], torch.from_numpy(model["backbone.conv1.weight"])
    )


def test_a_pytorch_0_3_tar_becomes_a_file_torch_loads_with_weights_only(tmp_path):
    state = OrderedDict([("w", torch.arange(6.0).view(2, 3)), ("b", torch.ones(2, dtype=torch.float64))])
    source = torch03_tar(tmp_path / "old.pth", {"state_dict": state, "epoch": 30}, state)
    with pytest.raises(RuntimeError, match="legacy .tar format"):
        torch.load(source, weights_only=True)
    report = surgery.sanitize(source, tmp_path / "new.pth")
    assert report.source_format == "torch-tar" and report.changes == ()
    loaded = torch.load(tmp_path / "new.pth", weights_only=True)
    assert loaded["epoch"] == 30
    for name, tensor in state.items():
        assert same_bytes(loaded["state_dict"][name], tensor)


def test_containers_stay_as_they_were(tmp_path):
    shared = {"lr": 0.1}
    loop: list = [1]
    loop.append(loop)
    data = {
        "groups": [shared, shared],
        "loop": loop,
        "nested": {
            "a": (1, (2.5, "x"), None),
            "b": {1, 2},
            "c": b"\x00\xff",
            "d": bytearray(b"ab"),
            "e": 2**70,
        },
        "text": "caf\u00e9 \ud800",  # a lone surrogate, as torch.save writes it
        "dtype": torch.float16,
        "ns": argparse.Namespace(),
    }
    torch.save(data, tmp_path / "src.pth")
    surgery.sanitize(tmp_path / "src.pth", tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out["groups"][0] is out["groups"][1]
    assert out["loop"][1] is out["loop"]
    assert out["nested"] == data["nested"] and out["text"] == data["text"] and out["dtype"] is torch.float16
    assert out["ns"] == {}


# -- the command -----------------------------------------------------------------------------------


def test_the_command_reports_each_change(training_checkpoint, tmp_path):
    source, _ = training_checkpoint
    for i, run in enumerate(
        (
            run_cli("sanitize", source, "-o", tmp_path / "a.pth"),
            run_subprocess("sanitize", source, "-o", tmp_path / "b.pth"),
        )
    ):
        assert run.exit_code == 0, run
        lines = run.stdout.splitlines()
        assert lines[0].startswith("  summary  wrote 9 tensors (")
        assert lines[0].endswith("; 5 objects made plain, 0 dropped")
        assert f"  output   {tmp_path / 'ab'[i]}.pth: torch.load(weights_only=True) reads it" in lines
        assert "  plain    args: argparse.Namespace -> dict of its 2 attributes (lr, arch)" in lines
        assert run.stderr == ""


def test_dry_run_and_json_write_nothing(training_checkpoint, tmp_path):
    source, _ = training_checkpoint
    run = run_cli("sanitize", source, "-o", tmp_path / "clean.pth", "--dry-run", "--json")
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)
    assert doc["surgery_json"] == 1 and doc["written"] is False and doc["tensors"] == 9
    assert doc["changes"][0] == {
        "where": "args",
        "what": "argparse.Namespace",
        "became": "dict of its 2 attributes (lr, arch)",
        "dropped": False,
    }
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_an_existing_output_needs_force_and_the_input_is_never_the_output(training_checkpoint, tmp_path):
    source, _ = training_checkpoint
    (tmp_path / "clean.pth").write_bytes(b"keep me")
    run = run_cli("sanitize", source, "-o", tmp_path / "clean.pth")
    assert_clean_error(run, tmp_path / "clean.pth", contains="the output exists", code=2)
    assert (tmp_path / "clean.pth").read_bytes() == b"keep me"
    assert run_cli("sanitize", source, "-o", tmp_path / "clean.pth", "--force").exit_code == 0
    assert not refuses_weights_only(tmp_path / "clean.pth")
    before = source.read_bytes()
    run = run_cli("sanitize", source, "-o", source, "--force")
    assert_clean_error(run, source, contains="an input of this run", code=2)
    assert source.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "clean.pth"]  # no temporary file left


@pytest.mark.parametrize(
    "name, says",
    [
        ("tiny.safetensors", "a safetensors checkpoint holds no pickled objects"),
        ("dcp_sharded", "a dcp checkpoint holds no pickled objects"),
        ("scripted.pt", "a torchscript checkpoint holds no pickled objects"),
    ],
)
def test_formats_without_pickled_objects_are_refused_cleanly(tmp_path, name, says):
    run = run_cli("sanitize", FIXTURES / name, "-o", tmp_path / "out.pth")
    assert_clean_error(run, FIXTURES / name, contains=says, code=2)
    assert not (tmp_path / "out.pth").exists()


def test_bad_sources_are_one_clean_error(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "whole.pth")
    raw = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    for path, says in (
        (tmp_path / "cut.pth", "damaged or truncated"),
        (tmp_path / "nowhere.pth", "no such file"),
    ):
        for run in (
            run_cli("sanitize", path, "-o", tmp_path / "out.pth"),
            run_subprocess("sanitize", path, "-o", tmp_path / "out.pth"),
        ):
            assert_clean_error(run, path, contains=says, code=1)
    run = run_cli("sanitize", tmp_path / "whole.pth", "-o", tmp_path / "out.safetensors")
    assert_clean_error(run, tmp_path / "out.safetensors", contains="sanitize writes a torch file", code=2)
    assert sorted(os.listdir(tmp_path)) == ["cut.pth", "whole.pth"]


def test_a_source_with_a_missing_storage_is_refused_as_corrupt(tmp_path):
    import zipfile

    torch.save({"w": torch.ones(4), "ns": argparse.Namespace(a=1)}, tmp_path / "src.pth")
    with zipfile.ZipFile(tmp_path / "src.pth") as zf, zipfile.ZipFile(tmp_path / "broken.pth", "w") as out:
        for info in zf.infolist():
            if "/data/" not in info.filename:
                out.writestr(info, zf.read(info))
    run = run_cli("sanitize", tmp_path / "broken.pth", "-o", tmp_path / "out.pth")
    assert_clean_error(run, tmp_path / "broken.pth", contains="the source is corrupt", code=1)
    assert not (tmp_path / "out.pth").exists()


def test_deflated_storages_are_inflated_bit_for_bit(tmp_path):
    import zipfile

    values = {"w": torch.randn(1000), "steps": torch.arange(10), "ns": argparse.Namespace(a=1)}
    torch.save(values, tmp_path / "stored.pth")
    with (
        zipfile.ZipFile(tmp_path / "stored.pth") as zf,
        zipfile.ZipFile(tmp_path / "deflated.pth", "w") as out,
    ):
        for info in zf.infolist():  # torch reads deflated storages too (it cannot mmap them)
            deflated = "/data/" in info.filename
            out.writestr(
                info.filename, zf.read(info), zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
            )
    surgery.sanitize(tmp_path / "deflated.pth", tmp_path / "clean.pth")
    loaded = torch.load(tmp_path / "clean.pth", weights_only=True)
    assert same_bytes(loaded["w"], values["w"]) and same_bytes(loaded["steps"], values["steps"])
    assert loaded["ns"] == {"a": 1}


# -- the examples of README.md and docs/ --------------------------------------------------------------------

TIMES = re.compile(r"in \d+\.\d+ s")


def run_console_block(block: str, cwd: pathlib.Path) -> None:
    """Each `$ surgery ...` line run as a user would; its output as shown, timings aside."""
    lines = block.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")] + [len(lines)]
    previous = None
    for start, end in zip(starts, starts[1:], strict=False):
        command = lines[start].removeprefix("$ ")
        expected = "\n".join(lines[start + 1 : end]) + "\n"
        if command == "echo $?":
            assert previous is not None and expected == f"{previous.exit_code}\n"
            continue
        previous = run_subprocess(*shlex.split(command.removeprefix("surgery ")), cwd=cwd)
        assert TIMES.sub("in <t> s", previous.stdout + previous.stderr) == TIMES.sub("in <t> s", expected)


def test_readme_scan_example_prints_what_it_shows(tmp_path):
    (block,) = [b for b in CONSOLE if b.startswith("$ surgery scan fixtures\n")]
    # The fixtures as committed: other tests import make_fixtures, leaving a __pycache__ beside it.
    shutil.copytree(FIXTURES, tmp_path / "fixtures", ignore=shutil.ignore_patterns("__pycache__"))
    run_console_block(block, tmp_path)


def test_readme_sanitize_example_prints_what_it_shows(tmp_path, monkeypatch):
    unsafe_training_checkpoint(tmp_path)
    assert refuses_weights_only(tmp_path / "checkpoint.pth")
    (block,) = [b for b in CONSOLE if b.startswith("$ surgery sanitize checkpoint.pth")]
    run_console_block(block, tmp_path)
    assert not refuses_weights_only(tmp_path / "checkpoint-clean.pth")
    (code,) = [b for b in PYTHON if "surgery.sanitize(" in b]
    (tmp_path / "checkpoint-clean.pth").unlink()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"].changes[0].became == "float 76.13"
    assert namespace["verdicts"].failed  # checkpoints/ does not exist: an error line, not an exception
