"""`surgery port` and `surgery.port()`, end to end, on the real cases the issue names:

the PyTorch ImageNet example's checkpoint into a resnet18 with a new head, a model whose
keys were all renamed, a backbone into a detector (and back), strict refusals, and every
flag of the command. Each test builds real models (seeded, never downloaded), runs the
command, then loads what was written with torch's or safetensors' own readers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, run_cli, run_subprocess

import surgery

RESNET_SUMMARY = (
    "loaded 120/122 tensors (99.99% of parameters); mismatched 2: fc.{bias,weight}; missing 0; unexpected 0"
)


# -- helpers ------------------------------------------------------------------
def port(*args) -> object:
    return run_cli("port", *args)


def port_json(*args) -> tuple[object, dict]:
    run = run_cli("port", *args, "--json")
    assert run.stdout.startswith("{"), run  # the report (a refused strict port prints it too)
    return run, json.loads(run.stdout)


def rows(stdout: str) -> dict[str, list[str]]:
    """The plain report as {label: [values]}; continuation lines belong to the label above."""
    out: dict[str, list[str]] = {}
    label = None
    for line in stdout.splitlines():
        assert line.startswith("  "), line
        body = line[2:]
        if body[0] != " ":
            label, _, value = body.partition(" ")
            out[label] = [value.strip()]
        else:
            assert label is not None
            out[label].append(body.strip())
    return out


def summary_line(stdout: str) -> str:
    first = stdout.splitlines()[0]
    assert first.startswith("  summary     "), first
    return first.removeprefix("  summary     ")


def temp_files(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".")]


def load_any(path: Path) -> dict:
    """What a user does with the output: safetensors' or torch's own safe loader, no map_location."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def features(model, x):
    """A resnet's backbone: everything up to avgpool, in eval mode."""
    import torch
    from torch import nn

    body = nn.Sequential(*list(model.children())[:-1]).eval()
    with torch.no_grad():
        return body(x)


def make_fixtures_module():
    spec = importlib.util.spec_from_file_location("_port_make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded_state(factory, seed: int) -> dict:
    import torch

    torch.manual_seed(seed)
    return factory().state_dict()


# -- module-wide sources (each real model built once) -------------------------
@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The PyTorch ImageNet example's checkpoint of a seeded resnet18, after one SGD momentum step:
    (folder, checkpoint path, plain state_dict path, the source model in eval mode)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("imagenet")
    ck = folder / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "resnet18",
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
            "best_acc1": torch.tensor(12.5),
            "optimizer": optimizer.state_dict(),
        },
        ck,
    )
    plain = folder / "resnet18.pth"
    torch.save(model.state_dict(), plain)
    return folder, ck, plain, model.eval()


@pytest.fixture(scope="module")
def x():
    import torch

    torch.manual_seed(1234)
    return torch.randn(2, 3, 64, 64)


TARGETS_SOURCE = f'''
"""Factories for `surgery port --to porttargets:NAME` (written by tests/test_port.py)."""
import importlib.util
from torch import nn

_spec = importlib.util.spec_from_file_location("_porttargets_fixtures", {str(FIXTURES / "make_fixtures.py")!r})
_mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mf)


def tiny_net(num_classes=10):
    return _mf.tiny_net(num_classes)


def tiny_lm():
    return _mf.TinyLM()


class Wrapped(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = _mf.tiny_net(num_classes)


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])


def linear():
    return nn.Sequential(nn.Linear(8, 4))


def conv1x1():
    return nn.Sequential(nn.Conv2d(8, 4, 1))


def raises():
    raise RuntimeError("factory exploded")
'''

DETECTOR_SOURCE = '''
"""A detector-like model: torchvision's IntermediateLayerGetter over resnet18 as backbone.body."""
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = IntermediateLayerGetter(torchvision.models.resnet18(weights=None), {"layer4": "0"})
        self.cls_head = nn.Conv2d(512, 5, 1)


def build():
    return Detector()
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """A folder with the factory modules `porttargets` and `detmodel`, imported from the cwd."""
    folder = tmp_path_factory.mktemp("code")
    (folder / "porttargets.py").write_text(TARGETS_SOURCE)
    (folder / "detmodel.py").write_text(DETECTOR_SOURCE)
    yield folder
    for name in ("porttargets", "detmodel"):
        sys.modules.pop(name, None)


@pytest.fixture
def in_code_dir(code_dir, monkeypatch):
    """cwd = the factory folder (as a user runs `surgery port ... --to mymodule:build`)."""
    monkeypatch.chdir(code_dir)
    monkeypatch.syspath_prepend(str(code_dir))  # for the tests' own imports of the same factories
    return code_dir


@pytest.fixture(scope="module")
def mf():
    return make_fixtures_module()


# == 1. the PyTorch ImageNet example into a 2-class resnet18 ==================
@pytest.mark.parametrize(
    "to, flags, out_name",
    [
        ("torchvision:resnet18?num_classes=2", ["--strict", "false"], "out.safetensors"),
        ("torchvision:resnet18?num_classes=2", ["--no-strict"], "out.pt"),
        ("torchvision:resnet18", ["--arg", "num_classes=2", "--strict", "false"], "out.pt"),
        ("torchvision:resnet18", ["--no-strict", "--arg", "num_classes=2"], "out.safetensors"),
    ],
    ids=["query-strict-false-safetensors", "query-no-strict-pt", "arg-strict-false-pt", "arg-no-strict-st"],
)
def test_imagenet_example_into_a_two_class_resnet18(imagenet, x, tmp_path, to, flags, out_name):
    import torch
    import torchvision

    _, ck, _, source = imagenet
    out = tmp_path / out_name
    run = port(ck, "--to", to, *flags, "-o", out)
    assert run.exit_code == 0, run
    assert run.stderr == ""
    assert summary_line(run.stdout) == RESNET_SUMMARY
    report = rows(run.stdout)
    assert report["source"] == [f"{ck}: state_dict (torch-zip)"]
    assert report["mismatched"] == [
        "fc.weight: source [1000, 512], target [2, 512]",
        "fc.bias: source [1000], target [2]",
    ]
    assert report["missing"] == ["none"] and report["unexpected"] == ["none"]
    assert report["steps"][0].startswith("stripped prefix 'module.'")
    assert report["output"] == [f"{out}: written"]
    assert sorted(os.listdir(tmp_path)) == [out_name]

    state = load_any(out)
    assert all(t.device.type == "cpu" for t in state.values())
    fresh = torchvision.models.resnet18(weights=None, num_classes=2)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(features(fresh, x), features(source, x))
    for name, tensor in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(state[name], tensor), name
    assert state["fc.weight"].shape == (2, 512) and state["fc.bias"].shape == (2,)


@pytest.mark.slow
def test_imagenet_example_exactly_as_the_readme_types_it(imagenet, x, tmp_path):
    """`python -m surgery port ...` as its own process, with the README's words, prints the README's report."""
    import torch
    import torchvision

    _, ck, _, source = imagenet
    readme = (ROOT / "README.md").read_text()
    (block,) = [
        b
        for b in re.findall(r"```console\n(.*?)```", readme, re.S)
        if b.startswith("$ surgery port checkpoint") and "--num-classes 2" in b.splitlines()[0]
    ]
    command, *expected = block.splitlines()
    args = shlex.split(command.removeprefix("$ surgery "))
    assert args[:2] == ["port", "checkpoint.pth.tar"] and "--verify" in args and "--strict" not in args
    (tmp_path / "checkpoint.pth.tar").symlink_to(ck)
    run = run_subprocess(*args, cwd=tmp_path)
    assert run.exit_code == 0, run.stderr
    assert run.stdout == "\n".join(expected) + "\n"
    assert run.stderr == ""
    fresh = torchvision.models.resnet18(weights=None, num_classes=2)
    fresh.load_state_dict(load_any(tmp_path / "resnet18-head2.safetensors"), strict=True)
    assert torch.equal(features(fresh, x), features(source, x))


def test_imagenet_example_through_the_library_in_place(imagenet, x):
    import torch
    import torchvision

    _, ck, _, source = imagenet
    torch.manual_seed(5)
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    head = model.fc.weight.detach().clone()
    report = surgery.port(ck, into=model)
    assert isinstance(report, surgery.PortReport)
    assert report.summary() == RESNET_SUMMARY
    assert [(m.target, m.source_shape, m.target_shape) for m in report.plan.mismatched] == [
        ("fc.weight", (1000, 512), (2, 512)),
        ("fc.bias", (1000,), (2,)),
    ]
    assert len(report.plan.matched) == 120 and not report.written
    assert torch.equal(features(model, x), features(source, x))
    assert torch.equal(model.fc.weight, head)  # the new head keeps its own initialisation


def test_library_strict_port_raises_and_loads_nothing(imagenet):
    import torch
    import torchvision

    _, ck, _, _ = imagenet
    torch.manual_seed(6)
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgery.PortFailed) as info:
        surgery.port(ck, into=model, strict=True)
    assert isinstance(info.value, surgery.SurgeryError)
    assert info.value.report.summary() == RESNET_SUMMARY
    assert "strict port refused" in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_library_strict_port_that_fits_loads_everything(imagenet, x):
    import torch
    import torchvision

    _, ck, _, source = imagenet
    model = torchvision.models.resnet18(weights=None)
    report = surgery.port(ck, into=model, strict=True, match="exact")
    assert report.summary() == "loaded 122/122 tensors (100.0% of parameters); missing 0; unexpected 0"
    assert report.plan.complete and report.coverage == 1.0
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))


# == 2. every key renamed, same structure ======================================
@pytest.fixture(scope="module")
def renamed(imagenet):
    """The resnet18 with every key renamed by a bijection: `enc.<i>.<leaf>`."""
    import torch

    folder, _, _, source = imagenet
    state = source.state_dict()
    names = {k: f"enc.{i}.{k.rsplit('.', 1)[1]}" for i, k in enumerate(state)}
    path = folder / "renamed.pth"
    torch.save({names[k]: v for k, v in state.items()}, path)
    return path, names


@pytest.mark.parametrize("mode, out_name", [("order", "out.safetensors"), ("auto", "out.pt")])
def test_all_keys_renamed_pairs_by_order(imagenet, renamed, x, tmp_path, mode, out_name):
    import torch
    import torchvision

    source = imagenet[3]
    path, names = renamed
    out = tmp_path / out_name
    run = port(path, "--to", "torchvision:resnet18", "--match", mode, "-o", out, "--verify")
    assert run.exit_code == 0, run
    assert (
        summary_line(run.stdout) == "loaded 122/122 tensors (100.0% of parameters); missing 0; unexpected 0"
    )
    report = rows(run.stdout)
    assert report["steps"] == [f"--match {mode}: 122 by position"]
    assert report["paired"][0] == "enc.0.weight -> conv1.weight (order)"
    assert report["output"] == [f"{out}: written; re-read, 122 tensors bit-identical"]
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(load_any(out), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), source(x))


def test_all_keys_renamed_pairs_every_key_to_its_original_name_in_auto(imagenet, tmp_path):
    """Reversed names (`weight.conv1`): the JSON pairs each key with the name it came from."""
    import torch

    state = imagenet[3].state_dict()
    path = tmp_path / "reversed.pth"
    torch.save({".".join(reversed(k.split("."))): v for k, v in state.items()}, path)
    run, doc = port_json(path, "--to", "torchvision:resnet18", "--match", "auto", "--dry-run")
    assert run.exit_code == 0, run
    assert len(doc["matched"]) == 122
    for m in doc["matched"]:
        assert m["target"] == ".".join(reversed(m["source"].split("."))), m
        assert m["how"] == "order"
    assert doc["missing"] == doc["unexpected"] == doc["mismatched"] == []


def test_all_keys_renamed_exact_match_fails_strictly(renamed, tmp_path):
    path, names = renamed
    out = tmp_path / "out.safetensors"
    run, doc = port_json(path, "--to", "torchvision:resnet18", "--match", "exact", "-o", out)
    assert run.exit_code == 1
    assert doc["matched"] == [] and doc["mismatched"] == []
    assert len(doc["missing"]) == 122 and sorted(doc["missing"]) == sorted(names)
    assert doc["unexpected"] == list(names.values())
    assert doc["written"] is False and doc["steps"] == ["--match exact: no pairs"]
    assert os.listdir(tmp_path) == []


# == 3. suffix: a backbone into a detector, and back ==========================
@pytest.fixture(scope="module")
def detector_ckpt(tmp_path_factory, code_dir):
    """A seeded detector's checkpoint (backbone.body.* + cls_head.*), and the model."""
    import torch

    sys.path.insert(0, str(code_dir))
    try:
        import detmodel
    finally:
        sys.path.remove(str(code_dir))
    torch.manual_seed(3)
    det = detmodel.build().eval()
    path = tmp_path_factory.mktemp("det") / "detector.pth"
    torch.save(det.state_dict(), path)
    return path, det


def _backbone_out(det, x):
    import torch

    with torch.no_grad():
        return det.backbone.body(x)["0"]


def _resnet_layer4_out(model, x):
    import torch
    from torch import nn

    with torch.no_grad():
        return nn.Sequential(*list(model.children())[:-2]).eval()(x)


def test_suffix_backbone_checkpoint_into_a_detector(imagenet, in_code_dir, x, tmp_path):
    import detmodel
    import torch

    _, _, plain, source = imagenet
    out = tmp_path / "det.safetensors"
    run, doc = port_json(plain, "--to", "detmodel:build", "--match", "suffix", "--strict", "false", "-o", out)
    assert run.exit_code == 0, run
    target_keys = list(detmodel.build().state_dict())
    body = [k for k in target_keys if k.startswith("backbone.body.")]
    assert len(body) == 120
    assert [m["target"] for m in doc["matched"]] == body
    assert all(m["source"] == m["target"].removeprefix("backbone.body.") for m in doc["matched"])
    assert {m["how"] for m in doc["matched"]} == {"suffix"}
    assert doc["missing"] == ["cls_head.weight", "cls_head.bias"]
    assert doc["unexpected"] == ["fc.weight", "fc.bias"]
    assert doc["mismatched"] == []
    assert doc["summary"].startswith("loaded 120/122 tensors")
    det = detmodel.build().eval()
    det.load_state_dict(load_any(out), strict=True)
    assert torch.equal(_backbone_out(det, x), _resnet_layer4_out(source, x))


def test_suffix_a_dataparallel_backbone_checkpoint_into_a_detector(imagenet, in_code_dir):
    """The ImageNet example's `module.` keys: the wrapper prefix goes, then the suffixes pair."""
    _, ck, _, _ = imagenet
    run, doc = port_json(ck, "--to", "detmodel:build", "--match", "suffix", "--strict", "false", "--dry-run")
    assert run.exit_code == 0, run
    assert len(doc["matched"]) == 120, doc["summary"]
    assert all(m["target"] == "backbone.body." + m["source"].removeprefix("module.") for m in doc["matched"])
    assert doc["missing"] == ["cls_head.weight", "cls_head.bias"]
    assert doc["unexpected"] == ["module.fc.weight", "module.fc.bias"]


def test_suffix_a_detector_backbone_extracted_into_a_classifier(detector_ckpt, x, tmp_path):
    """The README's other direction: a detector's backbone into a resnet18 classifier."""
    import torch
    import torchvision

    path, det = detector_ckpt
    out = tmp_path / "cls.safetensors"
    run, doc = port_json(
        path, "--to", "torchvision:resnet18", "--match", "suffix", "--strict", "false", "-o", out
    )
    assert run.exit_code == 0, run.stderr
    assert len(doc["matched"]) == 120, doc["summary"]
    assert all(m["source"] == "backbone.body." + m["target"] for m in doc["matched"])
    assert doc["missing"] == ["fc.weight", "fc.bias"]
    assert doc["unexpected"] == ["cls_head.weight", "cls_head.bias"]
    classifier = torchvision.models.resnet18(weights=None)
    classifier.load_state_dict(load_any(out), strict=True)
    assert torch.equal(_resnet_layer4_out(classifier, x), _backbone_out(det, x))


# == 4. a strict port that must fail ===========================================
def test_strict_port_refuses_prints_the_report_and_writes_nothing(imagenet, tmp_path):
    _, ck, _, _ = imagenet
    out = tmp_path / "out.safetensors"
    before = sha256(ck)
    run = port(ck, "--to", "torchvision:resnet18?num_classes=2", "-o", out)
    assert run.exit_code == 1
    assert summary_line(run.stdout) == RESNET_SUMMARY
    report = rows(run.stdout)
    assert report["output"] == [f"{out}: not written (strict port refused)"]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {ck}: strict port refused: {RESNET_SUMMARY}"]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[0] == errors[0]  # the error comes first on stderr; a hint may follow
    assert os.listdir(tmp_path) == [] and temp_files(tmp_path) == []
    assert sha256(ck) == before

    # the JSON shows the same lists
    run_j, doc = port_json(ck, "--to", "torchvision:resnet18?num_classes=2", "-o", out)
    assert run_j.exit_code == 1
    assert [line for line in run_j.stderr.splitlines() if line.startswith("error: ")] == errors
    assert doc["summary"] == RESNET_SUMMARY
    assert doc["mismatched"] == [
        {
            "source": "module.fc.weight",
            "target": "fc.weight",
            "source_shape": [1000, 512],
            "target_shape": [2, 512],
        },
        {"source": "module.fc.bias", "target": "fc.bias", "source_shape": [1000], "target_shape": [2]},
    ]
    assert [
        f"{m['target']}: source {m['source_shape']}, target {m['target_shape']}" for m in doc["mismatched"]
    ] == (report["mismatched"])
    assert doc["missing"] == [] and doc["unexpected"] == []
    assert len(doc["matched"]) == 120
    assert doc["written"] is False and doc["strict"] is True and doc["output"] == str(out)
    assert doc["verified"] is None and doc["notes"] == ["strict port refused"]
    assert os.listdir(tmp_path) == []


def test_strict_port_with_missing_and_unexpected_lists_them(in_code_dir, tmp_path):
    """A source whose keys are partly foreign: the report and the JSON list both sides."""
    import torch

    state = dict(torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True))
    state["aux.weight"] = torch.zeros(3)
    del state["fc.bias"]
    src = tmp_path / "partial.pth"
    torch.save(state, src)
    out = tmp_path / "out" / "o.pt"
    out.parent.mkdir()
    run = port(src, "--to", "porttargets:tiny_net", "-o", out)
    assert run.exit_code == 1
    assert summary_line(run.stdout) == (
        "loaded 13/14 tensors (99.4% of parameters); missing 1: fc.bias; unexpected 1: aux.weight"
    )
    report = rows(run.stdout)
    assert report["missing"] == ["fc.bias"] and report["unexpected"] == ["aux.weight"]
    assert report["mismatched"] == ["none"]
    assert os.listdir(out.parent) == []


# == 5. the other flags =========================================================
def test_dry_run_reports_and_writes_nothing(in_code_dir, tmp_path):
    src = FIXTURES / "imagenet_example.pth.tar"
    out = tmp_path / "never.safetensors"
    run = port(src, "--to", "porttargets:tiny_net?num_classes=2", "--strict", "false", "--dry-run", "-o", out)
    assert run.exit_code == 0, run
    assert summary_line(run.stdout) == (
        "loaded 12/14 tensors (97.7% of parameters); mismatched 2: fc.{bias,weight}; missing 0; unexpected 0"
    )
    assert rows(run.stdout)["output"] == [f"{out}: not written (--dry-run)"]
    run_j, doc = port_json(src, "--to", "porttargets:tiny_net?num_classes=2", "--no-strict", "--dry-run")
    assert run_j.exit_code == 0
    assert doc["written"] is False and doc["output"] is None and doc["notes"] == ["--dry-run"]
    assert os.listdir(tmp_path) == []


def test_plan_out_then_plan_round_trip_with_edits(in_code_dir, tmp_path):
    import torch

    src = FIXTURES / "imagenet_example.pth.tar"
    source = torch.load(src, weights_only=True)["state_dict"]
    to = "porttargets:tiny_net?num_classes=2"
    plan_path = tmp_path / "plan.json"
    run = port(src, "--to", to, "--strict", "false", "--dry-run", "--plan-out", plan_path)
    assert run.exit_code == 0, run
    plan = json.loads(plan_path.read_text())
    assert plan["mapping"] == {k: k.removeprefix("module.") for k in source}
    assert plan["unused_source_keys"] == [] and plan["unfilled_target_keys"] == []

    # the plan as written reproduces the matching
    _, as_matched = port_json(src, "--to", to, "--strict", "false", "--dry-run")
    _, as_planned = port_json(src, "--to", to, "--strict", "false", "--dry-run", "--plan", plan_path)
    assert [(m["source"], m["target"]) for m in as_planned["matched"]] == [
        (m["source"], m["target"]) for m in as_matched["matched"]
    ]
    assert {m["how"] for m in as_planned["matched"]} == {"plan"}
    assert as_planned["mismatched"] == as_matched["mismatched"]

    # edited: drop the head, swap two statistics of one BatchNorm
    mapping = plan["mapping"]
    del mapping["module.fc.weight"], mapping["module.fc.bias"]
    mapping["module.layer1.1.running_mean"] = "layer1.1.running_var"
    mapping["module.layer1.1.running_var"] = "layer1.1.running_mean"
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "out.safetensors"
    run, doc = port_json(src, "--to", to, "--strict", "false", "--plan", plan_path, "-o", out)
    assert run.exit_code == 0, run
    assert doc["steps"] == ["applied a plan of 12 pairs"]
    assert doc["missing"] == ["fc.weight", "fc.bias"]
    assert doc["unexpected"] == ["module.fc.weight", "module.fc.bias"]
    assert doc["mismatched"] == []
    assert doc["options"]["plan"] is True
    state = load_any(out)
    assert torch.equal(state["layer1.1.running_var"], source["module.layer1.1.running_mean"])
    assert torch.equal(state["layer1.1.running_mean"], source["module.layer1.1.running_var"])
    assert torch.equal(state["conv1.weight"], source["module.conv1.weight"])
    assert state["fc.weight"].shape == (2, 16)


def test_rename_with_regex_groups(in_code_dir, tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(7)
    lin0, lin1 = nn.Module(), nn.Module()
    lin0.model = nn.Sequential(nn.ReLU(), nn.Linear(4, 3))
    lin1.model = nn.Sequential(nn.ReLU(), nn.Linear(4, 3))
    old = nn.Module()
    old.lin0, old.lin1 = lin0, lin1
    src = tmp_path / "lins.pth"
    torch.save(old.state_dict(), src)
    out = tmp_path / "heads.pt"

    run = port(src, "--to", "porttargets:Heads", "-o", out, "--dry-run")
    assert run.exit_code == 1  # nothing pairs without the rule
    run, doc = port_json(
        src, "--to", "porttargets:Heads", "--rename", r"lin(\d)\.model\.1\.=heads.\1.", "-o", out
    )
    assert run.exit_code == 0, run
    assert doc["steps"] == [r"renamed 4 keys by lin(\d)\.model\.1\.=heads.\1.", "--match exact: 4 by name"]
    assert [(m["source"], m["target"]) for m in doc["matched"]] == [
        ("lin0.model.1.weight", "heads.0.weight"),
        ("lin0.model.1.bias", "heads.0.bias"),
        ("lin1.model.1.weight", "heads.1.weight"),
        ("lin1.model.1.bias", "heads.1.bias"),
    ]
    assert doc["options"]["rename"] == [r"lin(\d)\.model\.1\.=heads.\1."]
    state = load_any(out)
    assert torch.equal(state["heads.1.weight"], lin1.model[1].weight)
    assert torch.equal(state["heads.0.bias"], lin0.model[1].bias)


def test_renames_apply_in_order(in_code_dir, tmp_path):
    import torch

    state = torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True)
    src = tmp_path / "src.pth"
    torch.save({"a." + k: v for k, v in state.items()}, src)
    run, doc = port_json(
        src, "--to", "porttargets:tiny_net", "--rename", r"^a\.=b.", "--rename", r"^b\.=", "--dry-run"
    )
    assert run.exit_code == 0, run
    assert len(doc["matched"]) == 14 and doc["steps"][:2] == [
        r"renamed 14 keys by ^a\.=b.",
        r"renamed 14 keys by ^b\.=",
    ]


def test_strip_prefix_and_add_prefix(in_code_dir, tmp_path):
    import torch

    state = torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True)
    src = tmp_path / "encoder.pth"
    torch.save({"encoder." + k: v for k, v in state.items()}, src)
    out = tmp_path / "stripped.safetensors"
    run, doc = port_json(src, "--to", "porttargets:tiny_net", "--strip-prefix", "encoder.", "-o", out)
    assert run.exit_code == 0, run
    assert doc["steps"] == ["stripped prefix 'encoder.' from 14 keys", "--match exact: 14 by name"]
    assert all(torch.equal(load_any(out)[k], v) for k, v in state.items())

    # DataParallel keys into a model that holds the net as `net`: strip one prefix, add another
    ddp = FIXTURES / "imagenet_example.pth.tar"
    out = tmp_path / "wrapped.pt"
    run, doc = port_json(
        ddp, "--to", "porttargets:Wrapped", "--strip-prefix", "module.", "--add-prefix", "net.", "-o", out
    )
    assert run.exit_code == 0, run
    assert doc["steps"] == [
        "stripped prefix 'module.' from 14 keys",
        "added prefix 'net.' to 14 keys",
        "--match exact: 14 by name",
    ]
    source = torch.load(ddp, weights_only=True)["state_dict"]
    written = load_any(out)
    assert all(torch.equal(written["net." + k.removeprefix("module.")], v) for k, v in source.items())


def test_auto_strip_is_recorded_and_an_explicit_prefix_turns_it_off(in_code_dir):
    ddp = FIXTURES / "imagenet_example.pth.tar"
    run, doc = port_json(ddp, "--to", "porttargets:tiny_net", "--dry-run")
    assert run.exit_code == 0 and len(doc["matched"]) == 14
    assert doc["steps"][0] == (
        "stripped prefix 'module.' (DataParallel / DistributedDataParallel): "
        "14 of 14 keys fit the target instead of 0"
    )
    run, doc = port_json(ddp, "--to", "porttargets:Wrapped", "--add-prefix", "net.", "--dry-run")
    assert run.exit_code == 1  # net.module.*: the automatic stripping is off
    assert doc["matched"] == [] and doc["unexpected"][0] == "module.conv1.weight"


def test_wrapper_prefixes_of_compiled_and_lightning_checkpoints_are_stripped(in_code_dir):
    for name, prefix in (("compiled.pt", "_orig_mod."), ("lightning.ckpt", "model.")):
        run, doc = port_json(FIXTURES / name, "--to", "porttargets:tiny_net", "--dry-run")
        assert run.exit_code == 0, run
        assert len(doc["matched"]) == 14
        assert doc["steps"][0].startswith(f"stripped prefix {prefix!r}")


def test_nested_wrapper_prefixes_are_all_stripped(in_code_dir, tmp_path):
    """DistributedDataParallel around a torch.compile'd model saves `module._orig_mod.` keys."""
    import torch

    state = torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True)
    src = tmp_path / "ddp_compiled.pth"
    torch.save({"module._orig_mod." + k: v for k, v in state.items()}, src)
    out = tmp_path / "o.safetensors"
    run, doc = port_json(src, "--to", "porttargets:tiny_net", "-o", out)
    assert run.exit_code == 0, doc["summary"]
    assert doc["steps"][0].startswith(
        "stripped prefix 'module._orig_mod.' (DataParallel / DistributedDataParallel, torch.compile)"
    )
    assert all(torch.equal(load_any(out)[k], v) for k, v in state.items())


def test_include_globs_keep_only_what_they_name(in_code_dir):
    src = FIXTURES / "tiny_state_dict.pth"
    run, doc = port_json(
        src,
        "--to",
        "porttargets:tiny_net",
        "--include",
        "conv1",
        "--include",
        "layer1*",
        "--no-strict",
        "--dry-run",
    )
    assert run.exit_code == 0, run
    loaded = [m["target"] for m in doc["matched"]]
    assert loaded == ["conv1.weight"] + [k for k in loaded if k.startswith("layer1.")]
    assert len(loaded) == 7
    assert set(doc["missing"]) == {
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    }
    assert "left out 7 keys by --include/--exclude" in doc["steps"]


def test_exclude_turns_a_mismatched_head_into_a_missing_one(in_code_dir, tmp_path):
    import torch

    src = FIXTURES / "imagenet_example.pth.tar"
    out = tmp_path / "o.safetensors"
    run, doc = port_json(
        src, "--to", "porttargets:tiny_net?num_classes=3", "--exclude", "fc", "--no-strict", "-o", out
    )
    assert run.exit_code == 0, run
    assert doc["mismatched"] == [] and doc["missing"] == ["fc.weight", "fc.bias"]
    assert len(doc["matched"]) == 12
    source = torch.load(src, weights_only=True)["state_dict"]
    written = load_any(out)
    assert torch.equal(written["layer1.0.weight"], source["module.layer1.0.weight"])
    assert written["fc.weight"].shape == (3, 16)


def test_excluded_source_keys_are_not_unexpected_so_a_strict_port_can_drop_them(in_code_dir, tmp_path):
    """A checkpoint with an extra auxiliary head into the plain model: `--exclude aux` says those
    keys are deliberately left out, so the strict port succeeds (as `load_state_dict` on the
    filtered state_dict would)."""
    import torch

    state = dict(torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True))
    state["aux.weight"] = torch.ones(2, 16)
    state["aux.bias"] = torch.ones(2)
    src = tmp_path / "with_aux.pth"
    torch.save(state, src)
    out = tmp_path / "o.safetensors"
    run, doc = port_json(src, "--to", "porttargets:tiny_net", "--exclude", "aux", "-o", out)
    assert doc["unexpected"] == [], doc["summary"]
    assert run.exit_code == 0, run.stderr
    assert doc["written"] is True and len(doc["matched"]) == 14


def test_reshape_linear_into_1x1_conv_and_back(in_code_dir, tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(8)
    lin = nn.Sequential(nn.Linear(8, 4))
    src = tmp_path / "lin.pth"
    torch.save(lin.state_dict(), src)

    # without --reshape: mismatched, never loaded
    run, doc = port_json(src, "--to", "porttargets:conv1x1", "--dry-run")
    assert run.exit_code == 1
    assert doc["mismatched"] == [
        {"source": "0.weight", "target": "0.weight", "source_shape": [4, 8], "target_shape": [4, 8, 1, 1]}
    ]
    out = tmp_path / "no_reshape.safetensors"
    run = port(src, "--to", "porttargets:conv1x1", "--no-strict", "--min-coverage", "0", "-o", out)
    assert run.exit_code == 0 and rows(run.stdout)["mismatched"] == [
        "0.weight: source [4, 8], target [4, 8, 1, 1]"
    ]
    written = load_any(out)
    assert written["0.weight"].shape == (4, 8, 1, 1)
    assert not torch.equal(written["0.weight"].reshape(4, 8), lin[0].weight)  # the target's own init
    assert torch.equal(written["0.bias"], lin[0].bias)

    # with --reshape: loaded, reported
    out = tmp_path / "conv.safetensors"
    run = port(src, "--to", "porttargets:conv1x1", "--reshape", "-o", out, "--verify")
    assert run.exit_code == 0, run
    assert rows(run.stdout)["reshaped"] == ["0.weight: [4, 8] -> [4, 8, 1, 1]"]
    conv = nn.Sequential(nn.Conv2d(8, 4, 1))
    conv.load_state_dict(load_any(out), strict=True)
    assert torch.equal(conv[0].weight.reshape(4, 8), lin[0].weight)
    _, doc = port_json(src, "--to", "porttargets:conv1x1", "--reshape", "--dry-run")
    assert doc["matched"][0] == {
        "source": "0.weight",
        "target": "0.weight",
        "shape": [4, 8, 1, 1],
        "how": "exact",
        "reshaped_from": [4, 8],
    }

    # and back: the conv's weights into a Linear
    back = tmp_path / "back.pt"
    run = port(out, "--to", "porttargets:linear", "--reshape", "-o", back)
    assert run.exit_code == 0, run
    assert torch.equal(load_any(back)["0.weight"], lin[0].weight)


def test_fp16_source_into_fp32_target_is_cast_and_reported(in_code_dir, tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(9)
    half = {k: v.half() for k, v in nn.Sequential(nn.Linear(8, 4)).state_dict().items()}
    src = tmp_path / "half.safetensors"
    from safetensors.torch import save_file

    save_file(half, src)
    out = tmp_path / "full.safetensors"
    run = port(src, "--to", "porttargets:linear", "-o", out, "--verify")
    assert run.exit_code == 0, run
    report = rows(run.stdout)
    assert report["cast"] == ["float16 -> float32: 2 tensors"]
    assert report["output"] == [f"{out}: written; re-read, 2 tensors bit-identical"]
    written = load_any(out)
    for name, tensor in half.items():
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], tensor.float())
    _, doc = port_json(src, "--to", "porttargets:linear", "--dry-run")
    assert [m["cast"] for m in doc["matched"]] == [["float16", "float32"]] * 2


def test_verify_reports_the_tensors_it_re_read(in_code_dir, tmp_path):
    src = FIXTURES / "imagenet_example.pth.tar"
    for name in ("v.safetensors", "v.pt"):
        out = tmp_path / name
        run = port(src, "--to", "porttargets:tiny_net", "-o", out, "--verify")
        assert run.exit_code == 0, run
        assert rows(run.stdout)["output"] == [f"{out}: written; re-read, 14 tensors bit-identical"]
    run, doc = port_json(src, "--to", "porttargets:tiny_net", "-o", tmp_path / "j.pt", "--verify")
    assert doc["verified"] == 14 and doc["written"] is True
    run, doc = port_json(src, "--to", "porttargets:tiny_net", "-o", tmp_path / "k.pt")
    assert doc["verified"] is None


def test_force_is_needed_to_overwrite(in_code_dir, tmp_path):
    import torch

    ema = FIXTURES / "ema.pth"
    out = tmp_path / "o.safetensors"
    assert port(ema, "--key", "model", "--to", "porttargets:tiny_net", "-o", out).exit_code == 0
    first = out.read_bytes()
    run = port(ema, "--key", "model_ema", "--to", "porttargets:tiny_net", "-o", out)
    assert run.exit_code == 2
    assert [line for line in run.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {out}: the output exists"
    ]
    assert out.read_bytes() == first
    run = port(ema, "--key", "model_ema", "--to", "porttargets:tiny_net", "-o", out, "--force")
    assert run.exit_code == 0, run
    expected = torch.load(ema, weights_only=True)["model_ema"]
    assert all(torch.equal(load_any(out)[k], v) for k, v in expected.items())
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


def test_key_ports_the_ema_weights(in_code_dir, tmp_path):
    import torch

    ema = FIXTURES / "ema.pth"
    saved = torch.load(ema, weights_only=True)
    for i, to in enumerate(("porttargets:tiny_net", str(FIXTURES / "tiny_state_dict.pth"))):
        out = tmp_path / f"ema-{i}.pt"
        run = port(ema, "--key", "model_ema", "--to", to, "-o", out)
        assert run.exit_code == 0, run
        assert rows(run.stdout)["source"] == [f"{ema}: model_ema (torch-zip)"]
        written = load_any(out)
        assert set(written) == set(saved["model_ema"])
        assert all(torch.equal(written[k], v) for k, v in saved["model_ema"].items())
        assert not torch.equal(written["fc.weight"], saved["model"]["fc.weight"])
        provenance = json.loads(zipfile.ZipFile(out).read(f"{_archive(out)}/.data/surgery.json"))
        assert provenance["surgery.container"] == "model_ema"
        assert json.loads(provenance["surgery.rules"])["key"] == "model_ema"


def _archive(path: Path) -> str:
    return zipfile.ZipFile(path).namelist()[0].split("/")[0]


def test_template_checkpoint_target(tmp_path):
    import torch
    from safetensors import safe_open

    src = FIXTURES / "imagenet_example.pth.tar"
    template = FIXTURES / "tiny.safetensors"
    out = tmp_path / "o.safetensors"
    run = port(src, "--to", template, "-o", out, "--verify")
    assert run.exit_code == 0, run
    assert summary_line(run.stdout) == "loaded 14/14 tensors (100.0% of parameters); missing 0; unexpected 0"
    assert rows(run.stdout)["target"] == [str(template)]
    with safe_open(template, "pt") as f:
        template_keys = list(f.keys())
    with safe_open(out, "pt") as f:
        assert list(f.keys()) == template_keys
    source = torch.load(src, weights_only=True)["state_dict"]
    written = load_any(out)
    assert all(torch.equal(written[k.removeprefix("module.")], v) for k, v in source.items())


def test_template_target_keeps_its_own_tensors_where_nothing_loads(mf, tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(21)
    head2 = mf.tiny_net(num_classes=2).state_dict()
    template = tmp_path / "two_class.safetensors"
    save_file(head2, template)
    digest = sha256(template)
    src = FIXTURES / "imagenet_example.pth.tar"
    out = tmp_path / "o.pt"
    run = port(src, "--to", template, "--no-strict", "-o", out)
    assert run.exit_code == 0, run
    assert summary_line(run.stdout) == (
        "loaded 12/14 tensors (97.7% of parameters); mismatched 2: fc.{bias,weight}; missing 0; unexpected 0"
    )
    source = torch.load(src, weights_only=True)["state_dict"]
    written = load_any(out)
    assert torch.equal(written["fc.weight"], head2["fc.weight"])
    assert torch.equal(written["bn1.running_var"], source["module.bn1.running_var"])
    assert sha256(template) == digest  # read, never written
    assert sorted(os.listdir(tmp_path)) == ["o.pt", "two_class.safetensors"]


def test_timm_target(tmp_path):
    import timm
    import torch

    torch.manual_seed(11)
    source = timm.create_model("resnet18", pretrained=False).eval()
    src = tmp_path / "timm_resnet18.pth"
    torch.save(source.state_dict(), src)
    out = tmp_path / "o.safetensors"
    run = port(src, "--to", "timm:resnet18?num_classes=3", "--strict", "false", "-o", out)
    assert run.exit_code == 0, run
    assert summary_line(run.stdout) == (
        "loaded 120/122 tensors (99.99% of parameters); mismatched 2: fc.{bias,weight}; missing 0; unexpected 0"
    )
    assert rows(run.stdout)["mismatched"][0] == "fc.weight: source [1000, 512], target [3, 512]"
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    fresh.load_state_dict(load_any(out), strict=True)
    torch.manual_seed(12)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x), source.forward_features(x))


def test_tied_weights_filled_through_either_name(in_code_dir, mf, tmp_path):
    import torch

    torch.manual_seed(13)
    lm = mf.TinyLM()
    state = lm.state_dict()
    for dropped, via in (("lm_head.weight", "embed.weight"), ("embed.weight", "lm_head.weight")):
        src = tmp_path / f"without-{dropped}.pth"
        torch.save({k: v.clone() for k, v in state.items() if k != dropped}, src)
        for ext in ("safetensors", "pt"):
            out = tmp_path / f"{dropped}.{ext}"
            run, doc = port_json(src, "--to", "porttargets:tiny_lm", "-o", out, "--verify")
            assert run.exit_code == 0, run.stderr
            assert doc["missing"] == [] and doc["unexpected"] == [] and doc["mismatched"] == []
            assert doc["tied"] == [{"target": dropped, "loaded_through": via}]
            assert doc["summary"] == "loaded 4/4 tensors (100.0% of parameters); missing 0; unexpected 0"
            assert doc["verified"] == 4
            fresh = mf.TinyLM()
            fresh.load_state_dict(load_any(out), strict=True)
            assert torch.equal(fresh.embed.weight, lm.embed.weight)
            assert fresh.lm_head.weight is fresh.embed.weight
            assert torch.equal(fresh.block.weight, lm.block.weight)
    run = port(tmp_path / "without-lm_head.weight.pth", "--to", "porttargets:tiny_lm", "--dry-run")
    assert rows(run.stdout)["tied"] == ["lm_head.weight (shares storage with embed.weight)"]
    # the fixture saved with both names sharing one storage
    run, doc = port_json(FIXTURES / "tied.pth", "--to", "porttargets:tiny_lm", "--dry-run")
    assert run.exit_code == 0 and len(doc["matched"]) == 4 and doc["tied"] == []


def test_untied_source_into_a_tied_target_never_reports_a_value_it_did_not_write(in_code_dir, mf, tmp_path):
    """A checkpoint whose `embed.weight` and `lm_head.weight` differ, into a target that ties
    them: one storage cannot hold both. Whatever surgery decides, a key it reports as loaded
    from a source key must hold that source tensor in the output, or the strict port must be
    refused (as a conflict) instead of exiting 0 with one of the two silently overwritten."""
    import torch

    torch.manual_seed(14)
    state = {k: v.clone() for k, v in mf.TinyLM().state_dict().items()}
    state["lm_head.weight"] = torch.randn(32, 8)
    src = tmp_path / "untied.pth"
    torch.save(state, src)
    out = tmp_path / "o.safetensors"
    run, doc = port_json(src, "--to", "porttargets:tiny_lm", "-o", out)
    if run.exit_code == 0:
        written = load_any(out)
        for m in doc["matched"]:
            assert torch.equal(written[m["target"]], state[m["source"]]), (
                f"reported {m['source']} -> {m['target']} as loaded, but the output holds another tensor"
            )
    else:
        assert not out.exists()


def test_sharded_source_provenance_names_every_file(tmp_path):
    from safetensors import safe_open

    src = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded_safetensors", src)
    out = tmp_path / "o.safetensors"
    run = port(src, "--to", FIXTURES / "tiny_state_dict.pth", "-o", out)
    assert run.exit_code == 0, run
    with safe_open(out, "pt") as f:
        files = json.loads(f.metadata()["surgery.source_files"])
    assert len(files) == 3
    for entry in files:
        path = Path(entry["path"])
        assert path.resolve().parent == src.resolve()
        assert entry["sha256"] == sha256(path)
    assert {Path(e["path"]).name for e in files} == {p.name for p in src.iterdir()}


def test_a_checkpoint_saved_on_cuda_ports_on_this_machine(in_code_dir, tmp_path):
    import torch

    src = FIXTURES / "cuda_saved.pth"
    out = tmp_path / "cpu.pt"
    run = port(src, "--to", "porttargets:tiny_net", "-o", out, "--verify")
    assert run.exit_code == 0, run
    written = torch.load(out, weights_only=True)  # no map_location
    assert {t.device.type for t in written.values()} == {"cpu"}
    expected = torch.load(src, weights_only=True, map_location="cpu")
    assert all(torch.equal(written[k], v) for k, v in expected.items())
    if not torch.cuda.is_available():  # what the output spares its users
        with pytest.raises(RuntimeError):
            torch.load(src, weights_only=True)
    inspected = json.loads(run_cli("inspect", out, "--json").stdout)
    assert inspected["devices"] == {"cpu": 14}


def test_provenance_in_safetensors_metadata(imagenet, tmp_path):
    from safetensors import safe_open

    _, ck, _, _ = imagenet
    out = tmp_path / "o.safetensors"
    run, doc = port_json(ck, "--to", "torchvision:resnet18?num_classes=2", "--no-strict", "-o", out)
    assert run.exit_code == 0
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    files = json.loads(meta["surgery.source_files"])
    assert files == [{"path": str(ck), "sha256": hashlib.sha256(ck.read_bytes()).hexdigest()}]
    assert meta["surgery.version"] == surgery.__version__
    assert meta["surgery.target"] == "torchvision:resnet18?num_classes=2"
    assert json.loads(meta["surgery.target_kwargs"]) == {"num_classes": 2}
    assert meta["surgery.container"] == "state_dict"
    assert meta["surgery.summary"] == doc["summary"] == RESNET_SUMMARY
    rules = json.loads(meta["surgery.rules"])
    assert rules == doc["options"]
    assert rules["match"] == "exact" and rules["rename"] == [] and rules["plan"] is False


def test_provenance_in_a_torch_output_is_shown_by_inspect(in_code_dir, tmp_path):
    import torch

    src = FIXTURES / "imagenet_example.pth.tar"
    out = tmp_path / "o.pt"
    run = port(src, "--to", "porttargets:tiny_net", "-o", out, "--rename", "^module\\.=")
    assert run.exit_code == 0, run
    member = f"{_archive(out)}/.data/surgery.json"
    meta = json.loads(zipfile.ZipFile(out).read(member))
    assert json.loads(meta["surgery.source_files"])[0]["sha256"] == sha256(src)
    assert json.loads(meta["surgery.rules"])["rename"] == ["^module\\.="]
    assert meta["surgery.target"] == "porttargets:tiny_net"
    assert set(torch.load(out, weights_only=True)) == set(
        torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True)
    )
    shown = run_cli("inspect", out)
    assert shown.exit_code == 0, shown
    for name in (
        "surgery.version",
        "surgery.source_files",
        "surgery.target",
        "surgery.rules",
        "surgery.summary",
    ):
        assert re.search(rf"^\s+(metadata\s+)?{re.escape(name)}: ", shown.stdout, re.M), name
    assert f"surgery.version: {surgery.__version__}" in shown.stdout
    doc = json.loads(run_cli("inspect", out, "--json").stdout)
    assert doc["metadata"]["metadata"] == meta


def test_a_pickled_module_is_refused_without_trust_and_ported_with_it(in_code_dir, tmp_path):
    import torch

    src = FIXTURES / "full_model.pth"
    out = tmp_path / "o.safetensors"
    run = port(src, "--to", "porttargets:tiny_net", "-o", out)
    assert run.exit_code == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {src}: refused: the source is not safe to load")
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert os.listdir(tmp_path) == []

    run = port(src, "--to", "porttargets:tiny_net", "-o", out, "--trust")
    assert run.exit_code == 0, run
    assert summary_line(run.stdout) == "loaded 14/14 tensors (100.0% of parameters); missing 0; unexpected 0"
    # torch's own unpickler on our own fixture, to know what the weights are
    expected = torch.load(src, weights_only=False).state_dict()
    written = load_any(out)
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def _payload_checkpoint(path: Path, state: dict, command: bytes) -> None:
    """A real torch.save archive whose data.pkl also calls os.system(command), as the fixture."""
    import io

    import torch

    def unicode(text: bytes) -> bytes:
        return b"X" + len(text).to_bytes(4, "little") + text

    buf = io.BytesIO()
    torch.save(state, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    prefix = src.namelist()[0].split("/")[0]
    data_pkl = src.read(f"{prefix}/data.pkl")
    payload = unicode(b"hook") + b"cos\nsystem\n" + unicode(command) + b"\x85R"
    body = b"\x80\x02}" + unicode(b"weights") + data_pkl[2:-1] + b"s" + payload + b"s."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info, body if info.filename.endswith("data.pkl") else src.read(info.filename))


@pytest.mark.slow
def test_a_payload_is_never_run_even_with_trust(in_code_dir, tmp_path, monkeypatch):
    import subprocess

    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError(f"surgery ran something: {args}")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    src = FIXTURES / "payload_os_system.pth"
    out = tmp_path / "o.safetensors"
    run = port(src, "--to", "porttargets:tiny_net", "-o", out)
    assert run.exit_code == 1 and "danger" in run.stderr and not out.exists()
    run = port(src, "--to", "porttargets:tiny_net", "-o", out, "--trust")
    assert run.exit_code == 0, run
    assert rows(run.stdout)["source"] == [f"{src}: weights (torch-zip)"]
    fresh = make_fixtures_module().tiny_net()
    fresh.load_state_dict(load_any(out), strict=True)
    monkeypatch.undo()

    # the same in its own process, with a payload that would leave a mark
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pth"
    _payload_checkpoint(
        hostile, torch.load(FIXTURES / "tiny_state_dict.pth", weights_only=True), f"touch {marker}".encode()
    )
    out2 = tmp_path / "o2.pt"
    refused = port(hostile, "--to", FIXTURES / "tiny_state_dict.pth", "-o", out2)
    assert refused.exit_code == 1 and "os.system" in refused.stderr and not out2.exists()
    run = run_subprocess("port", hostile, "--to", FIXTURES / "tiny_state_dict.pth", "-o", out2, "--trust")
    assert run.exit_code == 0, run.stderr
    assert not marker.exists()
    assert out2.exists() and len(torch.load(out2, weights_only=True)) == 14
    torch.load(hostile, weights_only=False)  # the test's own check that the payload is live: pickle runs it
    assert marker.exists()
    run = run_subprocess(
        "port",
        FIXTURES / "payload_os_system.pth",
        "--to",
        FIXTURES / "tiny_state_dict.pth",
        "-o",
        tmp_path / "o3.pt",
        "--trust",
    )
    assert run.exit_code == 0, run.stderr
    assert "surgery-fixture-payload" not in run.stdout.splitlines()


# == the JSON document =========================================================
def test_json_document_contract(in_code_dir, tmp_path):
    src = FIXTURES / "imagenet_example.pth.tar"
    out = tmp_path / "o.safetensors"
    run = run_cli(
        "port",
        src,
        "--to",
        "porttargets:tiny_net?num_classes=2",
        "--no-strict",
        "-o",
        out,
        "--verify",
        "--json",
    )
    assert run.exit_code == 0, run
    doc = json.loads(run.stdout)  # one document, nothing else on stdout
    assert run.stderr == ""
    expected_fields = {
        "surgery_json": int,
        "source": str,
        "source_format": str,
        "container": list,
        "target": str,
        "summary": str,
        "steps": list,
        "matched": list,
        "missing": list,
        "unexpected": list,
        "mismatched": list,
        "tied": list,
        "coverage": float,
        "strict": bool,
        "options": dict,
        "output": str,
        "written": bool,
        "verified": int,
        "notes": list,
    }
    for name, kind in expected_fields.items():
        assert isinstance(doc[name], kind), (name, doc[name])
    assert doc["surgery_json"] == 1
    assert doc["source"] == str(src) and doc["source_format"] == "torch-zip"
    assert doc["container"] == ["state_dict"]
    assert doc["target"] == "porttargets:tiny_net?num_classes=2"
    assert doc["summary"] == (
        "loaded 12/14 tensors (97.7% of parameters); mismatched 2: fc.{bias,weight}; missing 0; unexpected 0"
    )
    assert all(isinstance(s, str) for s in doc["steps"])
    for m in doc["matched"]:
        assert set(m) == {"source", "target", "shape", "how"}
        assert isinstance(m["source"], str) and isinstance(m["target"], str) and m["how"] == "exact"
        assert all(isinstance(d, int) for d in m["shape"])
    for m in doc["mismatched"]:
        assert set(m) == {"source", "target", "source_shape", "target_shape"}
    assert [m["target"] for m in doc["mismatched"]] == ["fc.weight", "fc.bias"]
    assert 0.97 < doc["coverage"] < 0.98 and doc["coverage"] == round(doc["coverage"], 6)
    assert doc["strict"] is False
    assert set(doc["options"]) >= {
        "key",
        "match",
        "strip_prefix",
        "add_prefix",
        "rename",
        "include",
        "exclude",
        "reshape",
        "plan",
    }
    assert doc["output"] == str(out) and doc["written"] is True and doc["verified"] == 14
    assert all(isinstance(n, str) for n in doc["notes"])
    # the same document from the library's report
    report = surgery.port(src, into=make_fixtures_module().tiny_net(2))
    library = report.to_json()
    for name in ("summary", "matched", "missing", "unexpected", "mismatched", "tied", "coverage"):
        assert library[name] == doc[name], name
