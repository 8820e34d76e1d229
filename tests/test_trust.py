"""Names read from a file are data: nothing a file names is imported or called without trust.

Every place that builds something from a name read from a file (a fine-tune recipe in a
checkpoint's metadata, a recipe file, the edits and init of a recipe, builder keywords)
gets a canary payload here: a command that would create a file. The canary must never
appear, whatever surgery is asked to do, unless the caller passes trust.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.errors import UsageError
from surgery.models.edit import EditError
from surgery.models.targets import build_target
from surgery.trust import Untrusted, imports_code, library_of

CANARY = "CANARY"
# What the 280-byte file of the report held: subprocess.run("touch CANARY", shell=True).
RUN_TARGET = "subprocess:run?args='touch CANARY'&shell=True"


def recipe(target: str, **more) -> str:
    doc = {"surgery_recipe": 1, "target": target, "edits": [], "init": None, "finetune": {}, "mapping": {}}
    return json.dumps(doc | more)


def tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in nn.Linear(3, 2).state_dict().items()}


def safetensors_with_recipe(path: Path, text: str) -> Path:
    save_file(tiny_weights(), str(path), metadata={"surgery.recipe": text})
    return path


def torch_zip_with_recipe(path: Path, text: str) -> Path:
    """A torch.save file with surgery's provenance member holding the recipe."""
    buf = io.BytesIO()
    torch.save(tiny_weights(), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    archive = src.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for info in src.infolist():
            zf.writestr(info, src.read(info))
        zf.writestr(f"{archive}/.data/surgery.json", json.dumps({"surgery.recipe": text}))
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Work in an empty folder, so a canary written to the working folder would be seen."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def no_canary(folder: Path) -> None:
    assert not (folder / CANARY).exists(), "the payload ran"


# == the pure rules =====================================================================
@pytest.mark.parametrize(
    "spec, library, code",
    [
        ("torchvision:resnet18", "torchvision", False),
        ("timm:vit_tiny_patch16_224?num_classes=2", "timm", False),
        ("subprocess:run?args='touch x'&shell=True", None, True),
        ("os:system", None, True),
        ("mypkg.models:build_net?width=4", None, True),
        ("torchvision:", None, False),  # no name: nothing to import, refused later as unknown
        ("plain_name", None, False),
    ],
)
def test_library_targets_and_targets_that_import_code(spec, library, code):
    assert library_of(spec) == library
    assert imports_code(spec) is code


def test_a_template_checkpoint_is_read_not_run(tmp_path):
    template = tmp_path / "a:b.safetensors"  # a colon in a file name is still a file
    save_file(tiny_weights(), str(template))
    assert not imports_code(str(template))


# == load_ready: the recipe inside a checkpoint ==========================================
@pytest.mark.parametrize("writer", [safetensors_with_recipe, torch_zip_with_recipe])
def test_load_ready_refuses_a_recipe_target_that_imports_code(writer, in_tmp):
    path = writer(in_tmp / "ready.bin", recipe(RUN_TARGET))
    with pytest.raises(Untrusted) as caught:
        surgery.load_ready(path)
    assert "subprocess:run" in caught.value.message and "trust" in (caught.value.hint or "")
    no_canary(in_tmp)


@pytest.mark.parametrize("writer", [safetensors_with_recipe, torch_zip_with_recipe])
def test_inspect_reports_a_recipe_target_that_imports_code_as_danger(writer, in_tmp):
    path = writer(in_tmp / "ready.bin", recipe(RUN_TARGET))
    run = run_cli("inspect", path)
    assert run.exit_code == 1
    assert "danger" in run.stdout and "subprocess:run" in run.stdout
    assert run.stderr.startswith(f"error: {path}: not safe to load: danger")
    doc = json.loads(run_cli("inspect", path, "--json").stdout)
    assert any(f["severity"] == "danger" and "recipe" in f["message"] for f in doc["findings"])
    assert surgery.open_checkpoint(path).safe is False
    no_canary(in_tmp)


def test_the_280_byte_file_of_the_report(in_tmp):
    """The file as reported: a safetensors whose recipe runs `touch` through subprocess."""
    path = in_tmp / "evil.safetensors"
    save_file(
        {"w": torch.zeros(1)},
        str(path),
        metadata={"surgery.recipe": json.dumps({"target": RUN_TARGET})},
    )
    assert path.stat().st_size < 400
    with pytest.raises(Untrusted):
        surgery.load_ready(path)
    run = run_subprocess("inspect", path, cwd=in_tmp)
    assert run.exit_code == 1 and "danger" in run.stdout
    no_canary(in_tmp)


def test_a_library_recipe_target_is_not_a_finding(in_tmp):
    path = safetensors_with_recipe(in_tmp / "ok.safetensors", recipe("torchvision:resnet18"))
    assert surgery.open_checkpoint(path).findings == []


def test_a_malformed_recipe_is_a_notice_not_a_crash(in_tmp):
    path = safetensors_with_recipe(in_tmp / "odd.safetensors", "[1, 2")
    findings = surgery.open_checkpoint(path).findings
    assert [f.severity for f in findings] == ["notice"]


FACTORY = """
from torch import nn

def build(num_classes=2):
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, num_classes))
"""


@pytest.fixture
def factory_module(in_tmp, monkeypatch) -> str:
    """A factory of the user's own, importable from the working folder."""
    (in_tmp / "mymodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(in_tmp))
    yield "mymodels:build"
    sys.modules.pop("mymodels", None)


def test_load_ready_builds_the_users_factory_only_with_trust(factory_module, in_tmp):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    src = in_tmp / "src.pt"
    torch.save(model.state_dict(), src)
    out = in_tmp / "ready.safetensors"
    run = run_cli("port", src, "--to", factory_module, "--num-classes", "5", "-o", out, "--strict", "false")
    assert run.exit_code == 0, run.stderr
    with pytest.raises(Untrusted):
        surgery.load_ready(out)
    ready = surgery.load_ready(out, trust=True)
    assert ready.model[2].out_features == 5
    assert torch.equal(ready.model[0].weight, model[0].weight)


# == edits and init named by a recipe =====================================================
@pytest.mark.parametrize(
    "spec",
    [
        "__import__('os').system('touch CANARY')",
        "Linear(open('CANARY', 'w'), 2)",
        "Sequential(Linear(3, 2), __import__('pathlib').Path('CANARY').touch())",
        "os.system('touch CANARY')",
    ],
)
def test_load_ready_never_evaluates_an_edit_spec(spec, in_tmp):
    edits = [{"op": "replace", "path": "fc", "spec": spec}]
    path = safetensors_with_recipe(in_tmp / "r.safetensors", recipe("torchvision:resnet18", edits=edits))
    with pytest.raises(EditError):
        surgery.load_ready(path)
    no_canary(in_tmp)


def test_a_recipe_file_edit_spec_is_never_evaluated(in_tmp):
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    toml = in_tmp / "r.toml"
    toml.write_text(
        textwrap.dedent(
            f"""
            source = "{src}"
            to = "torchvision:resnet18"
            strict = false
            edits = [{{ op = "replace", path = "fc", spec = "__import__('os').system('touch CANARY')" }}]
            """
        )
    )
    run = run_cli("port", "--recipe", toml, "--dry-run")
    assert_clean_error(run, "__import__('os').system('touch CANARY')", code=2)
    no_canary(in_tmp)


def test_a_recipe_init_scheme_is_a_name_from_a_list(in_tmp):
    path = safetensors_with_recipe(
        in_tmp / "r.safetensors",
        recipe("torchvision:resnet18", init="__import__('os').system('touch CANARY')", edits=[]),
    )
    with pytest.raises(surgery.SurgeryError):  # the weights do not fit: init is never looked up
        surgery.load_ready(path)
    no_canary(in_tmp)


# == port --recipe: the target named by a TOML file =======================================
@pytest.fixture
def recipe_file(in_tmp) -> tuple[Path, Path]:
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    toml = in_tmp / "recipe.toml"
    toml.write_text(f'source = "{src}"\nto = "{RUN_TARGET}"\nstrict = false\n')
    return src, toml


def test_port_refuses_a_recipe_file_target_that_imports_code(recipe_file, in_tmp):
    _, toml = recipe_file
    for run in (
        run_cli("port", "--recipe", toml, "--dry-run"),
        run_subprocess("port", "--recipe", toml, "--dry-run", cwd=in_tmp),
    ):
        line = assert_clean_error(run, toml, contains="would import and call code", code=1)
        assert "subprocess:run" in line
        assert "--trust" in run.stderr
    no_canary(in_tmp)


def test_a_target_given_on_the_command_line_wins_and_needs_no_trust(recipe_file, in_tmp, factory_module):
    _, toml = recipe_file
    run = run_cli(
        "port", "--recipe", toml, "--to", factory_module, "--min-coverage", "0", "--dry-run", "--json"
    )
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["target"] == factory_module
    no_canary(in_tmp)


def test_a_recipe_file_naming_the_users_factory_runs_with_trust(in_tmp, factory_module):
    src = in_tmp / "src.pt"
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), src)
    toml = in_tmp / "recipe.toml"
    toml.write_text(f'source = "{src}"\nto = "{factory_module}"\n')
    assert_clean_error(run_cli("port", "--recipe", toml, "--dry-run"), toml, code=1)
    run = run_cli("port", "--recipe", toml, "--dry-run", "--trust", "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["coverage"] == 1.0


def test_a_recipe_file_with_a_library_target_needs_no_trust(in_tmp):
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    toml = in_tmp / "recipe.toml"
    toml.write_text(f'source = "{src}"\nto = "torchvision:resnet18"\nstrict = false\nmin_coverage = 0\n')
    run = run_cli("port", "--recipe", toml, "--dry-run")
    assert run.exit_code == 0, run.stderr


# == builder keywords that load or download files ========================================
@pytest.mark.parametrize(
    "spec, name",
    [
        ("torchvision:resnet18?weights='IMAGENET1K_V1'", "weights"),
        ("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn?weights_backbone='DEFAULT'", "weights_backbone"),
        ("timm:resnet18?pretrained=True", "pretrained"),
        ("timm:resnet18?checkpoint_path='CANARY.pth'", "checkpoint_path"),
        ("timm:resnet18?pretrained_cfg_overlay={'file': 'CANARY.pth'}", "pretrained_cfg_overlay"),
    ],
)
def test_builder_keywords_that_load_weights_are_refused(spec, name, in_tmp):
    torch.save({"x": torch.zeros(1)}, in_tmp / "CANARY.pth")
    with pytest.raises(UsageError) as caught:
        build_target(spec)
    assert f"`{name}`" in caught.value.message


def test_a_detection_builder_builds_offline_without_its_default_backbone_weights():
    """fasterrcnn's builder defaults to ImageNet backbone weights: surgery turns them off."""
    target = build_target("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn?num_classes=3")
    assert target.module is not None and any(e.name.startswith("backbone.") for e in target.entries)


def test_a_recipe_file_cannot_trust_itself(in_tmp):
    """`trust` (like `force` and `dry_run`) is the caller's alone: a file naming it is refused."""
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    toml = in_tmp / "recipe.toml"
    toml.write_text(f'source = "{src}"\nto = "{RUN_TARGET}"\ntrust = true\n')
    assert_clean_error(
        run_cli("port", "--recipe", toml, "--dry-run"), toml, contains="unknown field trust", code=2
    )
    with pytest.raises(UsageError):
        surgery.PortRequest.from_file(toml, dry_run=True)
    no_canary(in_tmp)


def test_port_file_runs_a_request_from_a_recipe_file(in_tmp):
    """The library reaches what the CLI does: a recipe file's request, run by port_file."""
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    toml = in_tmp / "recipe.toml"
    toml.write_text(f'source = "{src}"\nto = "{src}"\nout = "out.safetensors"\n')
    report = surgery.port_file(surgery.PortRequest.from_file(toml))
    assert report.written and report.coverage == 1.0
    assert (in_tmp / "out.safetensors").exists()


def test_the_library_targets_a_file_may_name_are_the_ones_surgery_builds():
    from surgery.models.targets import LIBRARY_BUILDERS
    from surgery.trust import LIBRARY_TARGETS

    assert set(LIBRARY_BUILDERS) == set(LIBRARY_TARGETS)


def test_port_refuses_a_recipe_files_check_from_that_imports_code(in_tmp):
    """`--check` builds the source's architecture too: a `check_from` read from a recipe file
    is a target like `to`, built only with --trust when it would import code."""
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    toml = in_tmp / "recipe.toml"
    toml.write_text(f'source = "{src}"\ncheck = true\ncheck_from = "{RUN_TARGET}"\n')
    run = run_cli(
        "port", "--recipe", toml, "--to", "torch.nn:Linear?in_features=3&out_features=2", "--dry-run"
    )
    line = assert_clean_error(run, toml, contains="would import and call code", code=1)
    assert "subprocess:run" in line and "--trust" in run.stderr
    no_canary(in_tmp)


def test_a_rule_file_never_names_code(in_tmp):
    """A rule file's ops are a closed set: an op naming a callable is an unknown op, read as data."""
    src = in_tmp / "src.pt"
    torch.save(tiny_weights(), src)
    rules = in_tmp / "rules.toml"
    rules.write_text(
        '[[rule]]\nfrom = "weight"\nto = "weight"\nops = [{ op = "subprocess.run", args = "touch CANARY" }]\n'
    )
    run = run_cli(
        "port", src, "--to", "torch.nn:Linear?in_features=3&out_features=2", "--map", rules, "--dry-run"
    )
    assert_clean_error(run, rules, contains="unknown op", code=2)
    no_canary(in_tmp)
