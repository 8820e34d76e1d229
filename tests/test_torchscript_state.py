"""TorchScript archives list the tensors torch's `state_dict()` has, other tensor attributes apart.

A scripted module pickles every attribute in one dict; which are parameters and buffers only
its code/ says. These tests save real scripted modules with torch.jit and compare against
`torch.jit.load(f).state_dict()` (our own files, so loading them is fine here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from torch import nn

from surgery.formats.checkpoint import open_checkpoint


def jit_keys(path: Path) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, still what these files are
        return list(torch.jit.load(path).state_dict())


def scripted(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


class Stateful(nn.Module):
    """The shape of silero-vad: weights, and a recurrent state kept as plain tensor attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.decoder = nn.Linear(8, 1)
        self._state = torch.zeros(2, 1, 8)
        self._context = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._context = x
        return self.decoder(self.encoder(x) + self._state[0])


@torch.jit.script
class Helper:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("running", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.register_buffer("absent", None)
        self.cache = torch.zeros(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.running + self.scratch + self.cache[:3]


class Nested(nn.Module):
    """Submodules in every container torch scripts, and tensors in every kind of attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.inner = Inner()
        self.seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), Inner())
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.BatchNorm1d(3)])
        self.heads = nn.ModuleDict({"a": nn.Linear(3, 3, bias=False)})
        self.extra = nn.ParameterList([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(1))])
        self.helper = Helper(torch.ones(2))
        self.history: list[torch.Tensor] = [torch.ones(1), torch.ones(2)]
        self.lookup: dict[str, torch.Tensor] = {"k": torch.ones(4)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq(self.inner(x * self.scale))
        for block in self.blocks:
            x = block(x)
        x = self.heads["a"](x) + self.extra[0] + self.extra[1]
        return x + self.helper.t.sum() + self.history[0] + self.lookup["k"].sum()


@pytest.fixture(scope="module")
def stateful(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return scripted(Stateful(), tmp_path_factory.mktemp("ts") / "vad.jit")


@pytest.fixture(scope="module")
def nested(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return scripted(Nested(), tmp_path_factory.mktemp("ts") / "nested.pt")


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory) -> Path:
    """A scripted torchvision resnet18 that also keeps a state in attributes, as silero-vad does."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model._state = torch.zeros(2, 1, 128)
    model._context = torch.zeros(0)
    return scripted(model, tmp_path_factory.mktemp("ts") / "resnet18.pt")


def test_attributes_that_are_not_state_are_shown_apart(stateful):
    run = run_cli("inspect", stateful, "--json")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    names = [t["name"] for t in doc["tensors"]]
    assert names == jit_keys(stateful) == ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    assert doc["num_tensors"] == 4 and doc["num_params"] == 4 * 8 + 8 + 8 + 1
    assert [(a["name"], a["shape"]) for a in doc["attributes"]] == [("_state", [2, 1, 8]), ("_context", [0])]
    text = run_cli("inspect", stateful).stdout
    assert "attributes  2 tensors outside state_dict()" in text
    assert "_state: tensor float32 [2, 1, 8]" in text
    tree = text.split("\n\n", 1)[1]
    assert "_state" not in tree and "encoder" in tree


def test_filter_selects_attributes_too(stateful):
    doc = json.loads(run_cli("inspect", stateful, "--json", "--filter", "_s*").stdout)
    assert doc["tensors"] == [] and [a["name"] for a in doc["attributes"]] == ["_state"]


def test_nested_modules_list_exactly_the_loaded_state_dict(nested):
    ckpt = open_checkpoint(nested)
    keys = jit_keys(nested)
    assert [t.name for t in ckpt.tensors] == keys
    # TorchScript keeps no persistence flag: torch.jit.load lists `scratch` as a buffer.
    assert "inner.scratch" in keys and "blocks.1.num_batches_tracked" in keys and "heads.a.bias" not in keys
    assert [a.name for a in ckpt.attributes] == [
        "helper.t",
        "history.0",
        "history.1",
        "lookup.k",
        "inner.cache",
        "seq.2.cache",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(nested).state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(ckpt.tensor(name), tensor), name
    assert [f.message for f in ckpt.findings if "TorchScript code/" in f.message] == []


def test_traced_module_lists_its_state_dict(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Stateful(), torch.randn(1, 4), check_trace=False).save(str(path))
    ckpt = open_checkpoint(path)
    assert [t.name for t in ckpt.tensors] == jit_keys(path)
    assert ckpt.attributes == ()  # tracing turns plain tensors into constants (constants.pkl)


def test_scripted_resnet18_lists_the_keys_torch_loads(resnet18):
    ckpt = open_checkpoint(resnet18)
    assert [t.name for t in ckpt.tensors] == jit_keys(resnet18)
    assert len(ckpt.tensors) == 122 and [a.name for a in ckpt.attributes] == ["_state", "_context"]


def test_port_from_torchscript_writes_exactly_the_state_dict(resnet18, tmp_path):
    out = tmp_path / "ported.safetensors"
    run = run_cli("port", resnet18, "--to", "torchvision:resnet18", "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["unexpected"] == [] and report["missing"] == []
    written = open_checkpoint(out)
    assert sorted(t.name for t in written.tensors) == sorted(jit_keys(resnet18))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch.jit.load(resnet18).state_dict()["layer4.1.conv2.weight"]
    assert torch.equal(written.tensor("layer4.1.conv2.weight"), weight)


def test_convert_from_torchscript_writes_exactly_the_state_dict(resnet18, stateful, tmp_path):
    for source in (resnet18, stateful):
        out = tmp_path / f"{source.stem}.safetensors"
        run = run_cli("convert", source, "-o", out)
        assert run.exit_code == 0, run.stderr
        assert sorted(t.name for t in open_checkpoint(out).tensors) == sorted(jit_keys(source))


def rewritten(source: Path, target: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of a zip archive with some members replaced (or, for None, left out)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            suffix = info.filename.split("/", 1)[1]
            if suffix in changes:
                if changes[suffix] is not None:
                    zout.writestr(info, changes[suffix])
                continue
            zout.writestr(info, zin.read(info))
    return target


def code_of(source: Path, cls: str) -> tuple[str, str]:
    """The member (below the archive folder) whose code declares `cls`, and its text."""
    with zipfile.ZipFile(source) as z:
        for name in z.namelist():
            if name.endswith(".py") and f"class {cls}(" in (text := z.read(name).decode()):
                return name.split("/", 1)[1], text
    raise AssertionError(f"no code declares {cls}")


@pytest.mark.parametrize(
    "damage",
    [
        "syntax error in a class header",
        "declaration that is a call",
        "declarations deeply nested",
        "not UTF-8",
        "code file missing",
        "class missing from its file",
    ],
)
def test_code_that_cannot_be_read_falls_back_to_every_attribute_with_a_notice(stateful, tmp_path, damage):
    top, source = code_of(stateful, "Stateful")
    changed: bytes | None = {
        "syntax error in a class header": lambda: source.replace(
            "class Stateful(Module):", "class Stateful(Module:"
        ),
        "declaration that is a call": lambda: source.replace("__parameters__ = []", "__parameters__ = run()"),
        "declarations deeply nested": lambda: source.replace(
            "__parameters__ = []", "__parameters__ = " + "[" * 100_000 + "]" * 100_000
        ),
        "not UTF-8": lambda: source.encode() + b"\n# \xff\xfe",
        "code file missing": lambda: None,
        "class missing from its file": lambda: source.replace("class Stateful(", "class Other("),
    }[damage]()
    assert changed != source
    broken = rewritten(
        stateful, tmp_path / "broken.jit", {top: changed.encode() if isinstance(changed, str) else changed}
    )
    run = run_cli("inspect", broken, "--json")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert sorted(t["name"] for t in doc["tensors"]) == sorted([*jit_keys(stateful), "_state", "_context"])
    assert doc["attributes"] == []
    notes = [f["message"] for f in doc["findings"] if "TorchScript code/" in f["message"]]
    assert len(notes) == 1 and "every tensor attribute is listed as state" in notes[0], doc["findings"]


def test_class_headers_are_parsed_never_run():
    from surgery.formats.torchscript import UnreadableCode, script_classes

    classes = script_classes(
        "class A(Module):\n"
        '  __parameters__ = ["weight", "bias", ]\n'
        '  __buffers__ = ["running_mean", ]\n'
        "  weight : Tensor\n"
        "  def forward(self: __torch__.A) -> NoneType:\n"
        '    __parameters__ = ["not", "this"]\n'
        "    return None\n"
        "class B:\n"
        "  t : Tensor\n"
        "def helper() -> None:\n"
        "  return None\n"
        "class C(Module):\n"
        "  def forward(self: __torch__.C) -> NoneType:\n"
        "    return None\n"
        "class D(Module):\n"
        '  __parameters__ = ["a",\n'
        '      "b", ]\n'
        "  eps : Final[float] = not valid python (\n"
        '  __buffers__ = ["c", ]\n'
    )
    assert {n: (c.module, c.parameters, c.buffers) for n, c in classes.items()} == {
        "A": (True, ("weight", "bias"), ("running_mean",)),
        "B": (False, (), ()),
        "C": (True, (), ()),
        "D": (True, ("a", "b"), ("c",)),  # declarations continued on a line; other lines unread
    }
    with pytest.raises(UnreadableCode):
        script_classes('class A(Module):\n  __buffers__ = __import__("os").system("true")\n')


def test_inspect_of_a_torchscript_file_does_not_import_torch(stateful):
    code = (
        "import sys\n"
        "from surgery.formats.checkpoint import open_checkpoint\n"
        f"ckpt = open_checkpoint({str(stateful)!r})\n"
        "print(len(ckpt.tensors), len(ckpt.attributes), 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.stdout.split() == ["4", "2", "False"], proc.stderr


class Anchored(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("grid", torch.ones(3), persistent=False)
        self.anchors = torch.zeros(4)


def test_pickled_module_leaves_non_persistent_buffers_and_attributes_out_as_torch_does(tmp_path):
    path = tmp_path / "whole.pth"
    model = nn.Sequential(Anchored(), nn.ReLU())
    torch.save(model, path)
    ckpt = open_checkpoint(path)
    assert [t.name for t in ckpt.tensors] == list(model.state_dict()) == ["0.lin.weight", "0.lin.bias"]
    assert [a.name for a in ckpt.attributes] == ["0.anchors", "0.grid"]
