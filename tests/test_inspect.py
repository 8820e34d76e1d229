"""`surgery inspect` on every fixture: what it finds, how it says it, and its JSON contract."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import FIXTURES, run_cli, run_subprocess

from surgery import open_checkpoint
from surgery.commands.inspect import InspectReport
from surgery.render import rows
from surgery.render.reports import page_of

ANSI = re.compile(r"\x1b\[")

# file, format, container, tensors, prefix, exit code
CASES = [
    ("tiny_state_dict.pth", "torch-zip", [], 14, "", 0),
    ("imagenet_example.pth.tar", "torch-zip", ["state_dict"], 14, "module.", 0),
    ("lightning.ckpt", "torch-zip", ["state_dict"], 14, "model.", 0),
    ("ema.pth", "torch-zip", ["model"], 14, "", 0),
    ("compiled.pt", "torch-zip", [], 14, "_orig_mod.", 0),
    ("legacy.pth", "torch-legacy", [], 14, "", 0),
    ("tiny.safetensors", "safetensors", [], 14, "", 0),
    ("dtypes.pth", "torch-zip", [], 10, "", 0),
    ("dtypes.safetensors", "safetensors", [], 9, "", 0),
    ("tied.pth", "torch-zip", [], 4, "", 0),
    ("cuda_saved.pth", "torch-zip", [], 14, "", 0),
    ("scripted.pt", "torchscript", [], 14, "", 0),
    ("full_model.pth", "torch-zip", [], 14, "", 1),
    ("numpy_extras.pth", "torch-zip", ["state_dict"], 14, "", 1),
    ("payload_os_system.pth", "torch-zip", ["weights"], 14, "", 1),
    ("sharded_safetensors", "sharded", [], 14, "", 0),
    ("sharded_bin", "sharded", [], 14, "", 0),
    ("sharded_bin/pytorch_model.bin.index.json", "sharded", [], 14, "", 0),
]


@pytest.mark.parametrize("name, fmt, container, count, prefix, code", CASES)
def test_every_fixture_inspects_with_its_format_container_and_tensors(
    name, fmt, container, count, prefix, code
):
    run = run_cli("inspect", FIXTURES / name, "--json")
    assert run.exit_code == code, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["format"], doc["container"], doc["num_tensors"], doc["prefix"]) == (
        fmt,
        container,
        count,
        prefix,
    )
    assert doc["safe"] is (code == 0)


def test_json_document_follows_the_documented_contract():
    doc = json.loads(run_cli("inspect", FIXTURES / "imagenet_example.pth.tar", "--json").stdout)
    for field in (
        "format",
        "container",
        "tensors",
        "num_tensors",
        "num_params",
        "bytes",
        "extras",
        "findings",
    ):
        assert field in doc
    first = doc["tensors"][0]
    assert first == {
        "name": "module.conv1.weight",
        "shape": [8, 3, 3, 3],
        "dtype": "float32",
        "numel": 216,
        "bytes": 864,
        "device": "cpu",
        "storage": "0",
    }
    assert doc["num_params"] == sum(t["numel"] for t in doc["tensors"]) == 1636
    assert doc["bytes"] == sum(t["bytes"] for t in doc["tensors"])
    assert doc["extras"]["epoch"] == {"type": "int", "summary": "90", "value": 90}
    assert doc["extras"]["arch"]["value"] == "tiny_net"
    assert doc["extras"]["best_acc1"]["value"] == pytest.approx(76.13)
    assert doc["extras"]["optimizer"]["summary"] == "dict (2 keys; 8 tensors)"
    assert doc["wrappers"] == [{"prefix": "module.", "added_by": "DataParallel / DistributedDataParallel"}]


def test_tensors_are_listed_in_file_order():
    import torch

    doc = json.loads(run_cli("inspect", FIXTURES / "tiny_state_dict.pth", "--json").stdout)
    assert [t["name"] for t in doc["tensors"]] == list(
        torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True)
    )


def test_plain_text_names_the_container_extras_prefix_and_totals():
    run = run_cli("inspect", FIXTURES / "imagenet_example.pth.tar")
    assert run.exit_code == 0
    out = run.stdout
    assert "state_dict  state_dict" in out
    assert "epoch: 90" in out and "arch: 'tiny_net'" in out and "best_acc1: tensor(76.13, float32)" in out
    assert "optimizer: dict (2 keys; 8 tensors)" in out
    assert "module.  (added by DataParallel / DistributedDataParallel)" in out
    assert "1,636 (1.6K)" in out
    assert "ok: nothing but tensors and plain containers" in out
    assert not ANSI.search(out), "pipes get plain text, no colour codes"


def test_tree_groups_by_module_with_counts_and_shapes():
    out = run_cli("inspect", FIXTURES / "tiny_state_dict.pth").stdout
    lines = out.splitlines()
    layer1 = next(i for i, line in enumerate(lines) if line.strip().startswith("layer1"))
    assert lines[layer1].split() == ["layer1", "1.2K", "6", "tensors"]
    assert lines[layer1 + 1].split() == ["0", "1.2K", "1", "tensor"]
    assert lines[layer1 + 2].split() == ["weight", "[16,", "8,", "3,", "3]", "float32"]
    assert "num_batches_tracked" in out


def test_depth_folds_deeper_modules():
    out = run_cli("inspect", FIXTURES / "tiny_state_dict.pth", "--depth", "1").stdout
    assert "layer1  1.2K  6 tensors" in out
    assert "weight" not in out.split("layer1")[1]
    assert (
        "conv1"
        not in run_cli("inspect", FIXTURES / "tiny_state_dict.pth", "--depth", "0").stdout.split("safety")[1]
    )


def test_filter_narrows_to_matching_tensors_and_modules():
    doc = json.loads(
        run_cli(
            "inspect", FIXTURES / "tiny_state_dict.pth", "--filter", "layer1", "--filter", "fc.b*", "--json"
        ).stdout
    )
    assert [t["name"] for t in doc["tensors"]] == [
        "layer1.0.weight",
        "layer1.1.weight",
        "layer1.1.bias",
        "layer1.1.running_mean",
        "layer1.1.running_var",
        "layer1.1.num_batches_tracked",
        "fc.bias",
    ]
    assert doc["num_tensors"] == 7 and doc["filter"] == ["layer1", "fc.b*"]
    text = run_cli("inspect", FIXTURES / "tiny_state_dict.pth", "-f", "fc.*").stdout
    assert "fc.* : 2 of 14 tensors shown" in text.replace(":", " :", 1) or "2 of 14 tensors shown" in text


def test_key_picks_another_container_such_as_the_ema_weights():
    default = json.loads(run_cli("inspect", FIXTURES / "ema.pth", "--json").stdout)
    assert default["containers"] == [
        {"path": ["model"], "num_tensors": 14},
        {"path": ["model_ema"], "num_tensors": 14},
    ]
    ema = json.loads(run_cli("inspect", FIXTURES / "ema.pth", "--key", "model_ema", "--json").stdout)
    assert ema["container"] == ["model_ema"] and "model" in ema["extras"]
    ckpt, ema_ckpt = (
        open_checkpoint(FIXTURES / "ema.pth"),
        open_checkpoint(FIXTURES / "ema.pth", key="model_ema"),
    )
    assert not ckpt.tensor("fc.weight").equal(ema_ckpt.tensor("fc.weight"))


def test_unknown_key_is_a_usage_error_that_lists_the_state_dicts():
    run = run_cli("inspect", FIXTURES / "ema.pth", "--key", "nope")
    assert run.exit_code == 2
    assert run.stderr.splitlines()[0] == f"error: {FIXTURES / 'ema.pth'}: no entry 'nope' in the checkpoint"
    assert "model (14 tensors), model_ema (14 tensors)" in run.stderr


def test_checkpoint_saved_on_a_gpu_inspects_and_loads_on_a_cpu_machine():
    doc = json.loads(run_cli("inspect", FIXTURES / "cuda_saved.pth", "--json").stdout)
    assert doc["devices"] == {"cuda:0": 14}
    weights = open_checkpoint(FIXTURES / "cuda_saved.pth").state_dict()
    assert all(t.device.type == "cpu" for t in weights.values())


def test_tied_weights_are_reported_as_sharing_storage():
    ckpt = open_checkpoint(FIXTURES / "tied.pth")
    assert ckpt.shared == [["embed.weight", "lm_head.weight"]]
    assert ckpt.nbytes == (32 * 8 + 8 * 8 + 8) * 4  # the tied matrix counted once
    sd = ckpt.state_dict()
    assert (
        sd["embed.weight"].untyped_storage().data_ptr() == sd["lm_head.weight"].untyped_storage().data_ptr()
    )
    assert "embed.weight = lm_head.weight" in run_cli("inspect", FIXTURES / "tied.pth").stdout


def test_dangerous_payload_still_shows_the_tree_and_exits_non_zero():
    run = run_cli("inspect", FIXTURES / "payload_os_system.pth")
    assert run.exit_code == 1
    assert (
        "danger: global os.system (GLOBAL), called as os.system('echo surgery-fixture-payload')" in run.stdout
    )
    assert "layer1" in run.stdout  # the tree is still there
    assert run.stderr.startswith(
        f"error: {FIXTURES / 'payload_os_system.pth'}: not safe to load: danger: global os.system"
    )
    assert "surgery-fixture-payload" not in run.stderr.split("called as")[0]


def test_pickled_whole_module_lists_its_tensors_and_is_flagged_unsafe():
    ckpt = open_checkpoint(FIXTURES / "full_model.pth")
    assert [t.name for t in ckpt.tensors][:2] == ["conv1.weight", "bn1.weight"]
    assert {f.severity for f in ckpt.findings} == {"unsafe"}
    assert any("torch.nn.modules.conv.Conv2d" in f.message for f in ckpt.findings)


def test_numpy_scalars_beside_the_weights_are_unsafe_not_dangerous():
    ckpt = open_checkpoint(FIXTURES / "numpy_extras.pth")
    assert {f.severity for f in ckpt.findings} == {"unsafe"}
    assert ckpt.extras[0].name == "best_acc"


def test_torchscript_archive_is_recognised_and_its_tensors_listed():
    import torch

    ckpt = open_checkpoint(FIXTURES / "scripted.pt")
    assert ckpt.format == "torchscript" and ckpt.safe
    import zipfile

    code = [
        n for n in zipfile.ZipFile(FIXTURES / "scripted.pt").namelist() if "/code/" in n and n.endswith(".py")
    ]
    assert [f.message for f in ckpt.findings] == [
        f"{len(code)} TorchScript code files: torch.jit.load compiles and runs them, surgery never does"
    ]
    scripted = torch.jit.load(FIXTURES / "scripted.pt")
    assert [t.name for t in ckpt.tensors] == list(scripted.state_dict())
    for name, tensor in scripted.state_dict().items():
        assert torch.equal(ckpt.tensor(name), tensor)
    assert "torch.jit.load" in run_cli("inspect", FIXTURES / "scripted.pt").stdout


def test_safetensors_metadata_is_shown():
    out = run_cli("inspect", FIXTURES / "tiny.safetensors").stdout
    assert "format: pt" in out and "source: fixtures/make_fixtures.py" in out


def test_sharded_folder_reads_every_shard_through_its_index():
    ckpt = open_checkpoint(FIXTURES / "sharded_safetensors")
    assert ckpt.metadata["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ckpt.num_tensors == 14 and ckpt.findings == []
    assert [f.name for f in ckpt.files] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    single = open_checkpoint(FIXTURES / "sharded_bin")
    assert sorted(t.name for t in single.tensors) == sorted(t.name for t in ckpt.tensors)


def test_verify_checks_storage_crcs():
    run = run_cli("inspect", FIXTURES / "tiny_state_dict.pth", "--verify")
    assert run.exit_code == 0 and "every storage checked" in run.stdout


def test_rich_output_on_a_terminal_draws_a_coloured_tree():
    from rich.console import Console

    ckpt = open_checkpoint(FIXTURES / "imagenet_example.pth.tar")
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="truecolor", width=100)
    rows.rich(page_of(InspectReport(ckpt)), console)
    out = buffer.getvalue()
    assert ANSI.search(out)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "└──" in plain or "├──" in plain
    assert "module" in plain and "[8, 3, 3, 3]" in plain and "epoch: 90" in plain


def test_rich_depth_folds_like_plain_text():
    from rich.console import Console

    ckpt = open_checkpoint(FIXTURES / "tiny_state_dict.pth")
    buffer = io.StringIO()
    rows.rich(page_of(InspectReport(ckpt, depth=1)), Console(file=buffer, width=100))
    assert "layer1" in buffer.getvalue() and "[16, 8, 3, 3]" not in buffer.getvalue()


def test_runs_as_a_subprocess_and_as_python_dash_m():
    run = run_subprocess("inspect", FIXTURES / "legacy.pth", "--json")
    assert run.exit_code == 0 and json.loads(run.stdout)["format"] == "torch-legacy"
    assert run.stderr == ""
    # the console script of the environment running the tests, not whichever is first on PATH
    scripts = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    exe = next((str(d / "surgery") for d in scripts if (d / "surgery").exists()), None)
    assert exe, f"the console script is installed in {scripts}"
    proc = subprocess.run(
        [exe, "inspect", str(FIXTURES / "tiny.safetensors")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "safetensors" in proc.stdout


def test_inspect_never_imports_torch():
    code = (
        "import sys; from surgery.cli import app; from typer.testing import CliRunner;"
        f"r = CliRunner().invoke(app, ['inspect', {str(FIXTURES / 'imagenet_example.pth.tar')!r}, '--json']);"
        f"CliRunner().invoke(app, ['inspect', {str(FIXTURES / 'legacy.pth')!r}]);"
        f"CliRunner().invoke(app, ['inspect', {str(FIXTURES / 'sharded_safetensors')!r}]);"
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("surgery ")
    assert "inspect" in run_cli("--help").stdout
