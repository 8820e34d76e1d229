"""`surgery port` refusing bad input: one `error: <where>: ...` line on stderr, a non-zero
exit, no traceback, nothing written (no OUT, no temporary file beside it), the input unchanged.

`where` is the file at fault, or the option (`--rename`, `--match`, `--plan`, `--out`,
`--strict`), or the target spec, whichever the user has to fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, assert_clean_error, run_cli

import surgery

TINY = FIXTURES / "tiny_state_dict.pth"

BAD_TARGETS = f'''
"""Factories for the bad-input tests of `surgery port` (written by tests/test_port_bad_input.py)."""
import importlib.util
from torch import nn

_spec = importlib.util.spec_from_file_location("_badtargets_fixtures", {str(FIXTURES / "make_fixtures.py")!r})
_mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mf)


def tiny_net(num_classes=10):
    return _mf.tiny_net(num_classes)


def raises():
    raise RuntimeError("factory exploded")


def not_module():
    return {{"weight": 1}}


class TwoHeads(nn.Module):
    """Two heads whose keys both end with the source's `fc.weight`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.b = nn.Module()
        self.a.fc = nn.Linear(16, 10)
        self.b.fc = nn.Linear(16, 10)


not_callable = 42
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("badcode")
    (folder / "badtargets.py").write_text(BAD_TARGETS)
    yield folder
    sys.modules.pop("badtargets", None)


@pytest.fixture
def case(tmp_path, code_dir, monkeypatch):
    """A source copied into its own folder, an empty output folder, cwd = the factories' folder."""
    monkeypatch.chdir(code_dir)
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "src.pth"
    shutil.copyfile(TINY, src)
    return Case(src, out_dir)


class Case:
    def __init__(self, src: Path, out_dir: Path):
        self.src = src
        self.out_dir = out_dir
        self.out = out_dir / "out.safetensors"
        self.digest = _sha(src)

    def check_untouched(self, *, out_dir_holds: tuple[str, ...] = ()) -> None:
        """Nothing written: the output folder holds what it held (no OUT, no temporary file),
        and the source is byte for byte what it was."""
        assert sorted(os.listdir(self.out_dir)) == sorted(out_dir_holds)
        assert sorted(os.listdir(self.src.parent)) == ["src.pth"]
        assert _sha(self.src) == self.digest


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def port(*args):
    return run_cli("port", *args)


def hint_of(run) -> str:
    hints = [line for line in run.stderr.splitlines() if line.startswith("hint: ")]
    return hints[0] if hints else ""


# -- targets ----------------------------------------------------------------
def test_unknown_torchvision_model_suggests_the_near_name(case):
    run = port(case.src, "--to", "torchvision:resnet19", "-o", case.out)
    assert_clean_error(run, "torchvision:resnet19", contains="torchvision has no model 'resnet19'", code=2)
    assert "resnet18" in hint_of(run)
    case.check_untouched()


def test_unknown_timm_model(case):
    run = port(case.src, "--to", "timm:resnet_nosuch", "-o", case.out)
    assert_clean_error(run, "timm:resnet_nosuch", contains="timm has no model 'resnet_nosuch'", code=2)
    case.check_untouched()


def test_unimportable_factory_module(case):
    run = port(case.src, "--to", "nosuchmodule:build", "-o", case.out)
    assert_clean_error(run, "nosuchmodule:build", contains="cannot import 'nosuchmodule'", code=2)
    case.check_untouched()


def test_factory_module_without_the_callable(case):
    run = port(case.src, "--to", "badtargets:nothing_here", "-o", case.out)
    assert_clean_error(run, "badtargets:nothing_here", contains="has no 'nothing_here'", code=2)
    run = port(case.src, "--to", "badtargets:not_callable", "-o", case.out)
    assert_clean_error(run, "badtargets:not_callable", contains="not callable", code=2)
    case.check_untouched()


def test_factory_that_raises(case):
    run = port(case.src, "--to", "badtargets:raises", "-o", case.out)
    assert_clean_error(
        run,
        "badtargets:raises",
        contains="building the target failed: RuntimeError: factory exploded",
        code=1,
    )
    case.check_untouched()


def test_factory_returning_a_non_module(case):
    run = port(case.src, "--to", "badtargets:not_module", "-o", case.out)
    assert_clean_error(run, "badtargets:not_module", contains="not an nn.Module", code=1)
    case.check_untouched()


def test_a_target_spec_that_names_nothing(case):
    run = port(case.src, "--to", "no-such-file.pth", "-o", case.out)
    assert_clean_error(run, "no-such-file.pth", contains="unknown target", code=2)
    case.check_untouched()


def test_template_target_that_is_not_a_checkpoint(case, tmp_path):
    template = tmp_path / "notes.txt"
    template.write_text("these are not weights\n")
    run = port(case.src, "--to", template, "-o", case.out)
    assert_clean_error(run, template, contains="not a checkpoint", code=1)
    assert template.read_text() == "these are not weights\n"
    case.check_untouched()


def test_template_target_takes_no_arguments(case):
    run = port(case.src, "--to", f"{TINY}?num_classes=2", "-o", case.out)
    assert_clean_error(run, f"{TINY}?num_classes=2", contains="takes no arguments", code=2)
    case.check_untouched()


def test_bad_target_argument(case):
    run = port(case.src, "--to", "badtargets:tiny_net", "--arg", "oops", "-o", case.out)
    assert_clean_error(run, "badtargets:tiny_net", contains="'oops' is not NAME=VALUE", code=2)
    run = port(case.src, "--to", "badtargets:tiny_net?classes", "-o", case.out)
    assert_clean_error(run, "badtargets:tiny_net?classes", contains="is not NAME=VALUE", code=2)
    case.check_untouched()


def test_pretrained_weights_are_never_downloaded(case, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for spec in ("torchvision:resnet18?weights=DEFAULT", "torchvision:resnet18?weights=IMAGENET1K_V1"):
        run = port(case.src, "--to", spec, "-o", case.out)
        assert_clean_error(run, spec, contains="cannot be downloaded", code=2)
    run = port(case.src, "--to", "timm:resnet18?pretrained=True", "-o", case.out)
    assert_clean_error(run, "timm:resnet18?pretrained=True", contains="cannot be downloaded", code=2)
    # torchvision's old `pretrained=True` spelling: refused one way or another, never fetched
    run = port(case.src, "--to", "torchvision:resnet18?pretrained=True", "-o", case.out)
    assert_clean_error(run, "torchvision:resnet18?pretrained=True")
    assert not (tmp_path / "torch_home").exists() and not (tmp_path / "hf_home").exists()
    case.check_untouched()


# -- the key pipeline -------------------------------------------------------
@pytest.mark.parametrize(
    "rule, contains",
    [("(unclosed=x", "bad regex"), ("[a-=b", "bad regex"), ("no-separator", "is not REGEX=REPL")],
)
def test_bad_rename_rule(case, rule, contains):
    run = port(case.src, "--to", TINY, "--rename", rule, "-o", case.out)
    line = assert_clean_error(run, "--rename", contains=contains, code=2)
    assert repr(rule) in line
    case.check_untouched()


def test_rename_that_makes_two_keys_collide(case):
    run = port(case.src, "--to", TINY, "--rename", r"(weight|bias)$=w", "-o", case.out)
    line = assert_clean_error(run, "--rename", contains="would both become", code=2)
    assert "'bn1.weight'" in line and "'bn1.bias'" in line and "'bn1.w'" in line
    case.check_untouched()


def test_unknown_match_mode(case):
    run = port(case.src, "--to", TINY, "--match", "fuzzy", "-o", case.out)
    line = assert_clean_error(run, "--match", contains="'fuzzy'", code=2)
    assert all(mode in line for mode in ("exact", "suffix", "order", "auto"))
    case.check_untouched()


def test_order_match_on_a_different_structure_names_the_first_divergence(case):
    run = port(case.src, "--to", "badtargets:tiny_net?num_classes=2", "--match", "order", "-o", case.out)
    line = assert_clean_error(run, case.src, contains="cannot pair keys by order", code=1)
    assert "fc.weight [10, 16]" in line and "fc.weight [2, 16]" in line
    case.check_untouched()


def test_suffix_match_feeding_one_source_key_to_two_targets(case):
    run = port(case.src, "--to", "badtargets:TwoHeads", "--match", "suffix", "--no-strict", "-o", case.out)
    line = assert_clean_error(run, case.src, contains="would feed both", code=1)
    assert "'a.fc.weight'" in line and "'b.fc.weight'" in line
    case.check_untouched()


def test_unknown_key(case):
    run = port(case.src, "--key", "model_ema", "--to", TINY, "-o", case.out)
    assert_clean_error(run, case.src, contains="'model_ema'", code=2)
    case.check_untouched()


# -- the output ---------------------------------------------------------------
def test_out_in_a_missing_folder(case):
    out = case.out_dir / "nowhere" / "out.pt"
    run = port(case.src, "--to", TINY, "-o", out)
    assert_clean_error(run, out, contains="does not exist", code=2)
    assert not out.parent.exists()
    case.check_untouched()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_an_unwritable_folder(case):
    locked = case.out_dir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        run = port(case.src, "--to", TINY, "-o", locked / "out.pt")
        assert_clean_error(run, locked / "out.pt", contains="not writable", code=2)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


def test_out_is_a_folder(case):
    run = port(case.src, "--to", TINY, "-o", case.out_dir)
    assert_clean_error(run, case.out_dir, contains="folder", code=2)
    case.check_untouched()


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_out_equal_to_src(case, force):
    for out in (case.src, case.src.parent / ".." / "in" / "src.pth"):
        run = port(case.src, "--to", TINY, "-o", out, "--no-strict", *force)
        assert_clean_error(run, out, contains="the output is an input of this run", code=2)
    link = case.out_dir / "link.pth"
    link.symlink_to(case.src)
    run = port(case.src, "--to", TINY, "-o", link, *force)
    assert_clean_error(run, link, contains="the output is an input of this run", code=2)
    assert link.is_symlink()
    case.check_untouched(out_dir_holds=("link.pth",))


def test_out_equal_to_a_shard_of_the_source(case, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded_safetensors", src)
    shard = src / "model-00001-of-00002.safetensors"
    digest = _sha(shard)
    run = port(src, "--to", TINY, "-o", shard, "--force")
    assert_clean_error(run, shard, contains="the output is an input of this run", code=2)
    assert _sha(shard) == digest
    case.check_untouched()


def test_out_equal_to_the_template_checkpoint_is_refused(case, tmp_path):
    """The template is an input too: `an input is never overwritten`, even with --force."""
    template = tmp_path / "template.pth"
    shutil.copyfile(TINY, template)
    digest = _sha(template)
    run = port(case.src, "--to", template, "-o", template, "--force")
    assert_clean_error(run, template, contains="input", code=2)
    assert _sha(template) == digest
    case.check_untouched()


def test_out_existing_without_force(case):
    case.out.write_bytes(b"precious")
    run = port(case.src, "--to", TINY, "-o", case.out)
    assert_clean_error(run, case.out, contains="the output exists", code=2)
    assert "--force" in hint_of(run)
    assert case.out.read_bytes() == b"precious"
    case.check_untouched(out_dir_holds=("out.safetensors",))


def test_plan_out_existing_without_force(case):
    plan = case.out_dir / "plan.json"
    plan.write_text("{}")
    run = port(case.src, "--to", TINY, "-o", case.out, "--plan-out", plan)
    assert_clean_error(run, plan, contains="the output exists", code=2)
    assert plan.read_text() == "{}"
    case.check_untouched(out_dir_holds=("plan.json",))


def test_out_missing_without_dry_run(case):
    run = port(case.src, "--to", TINY)
    assert_clean_error(run, "--out", contains="-o OUT", code=2)
    case.check_untouched()


def test_a_write_that_fails_midway_leaves_nothing(case, monkeypatch):
    """A full disk: the temporary file is removed and OUT never appears."""

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for out in (case.out, case.out_dir / "out.pt"):
        run = port(case.src, "--to", TINY, "-o", out)
        assert_clean_error(run, out, contains="cannot write: No space left on device", code=1)
    monkeypatch.undo()
    case.check_untouched()


# -- strictness ---------------------------------------------------------------
@pytest.mark.parametrize("value", ["maybe", "2"])
def test_strict_takes_true_or_false_only(case, value):
    run = port(case.src, "--to", TINY, "--strict", value, "-o", case.out)
    assert_clean_error(run, "--strict", contains=repr(value), code=2)
    case.check_untouched()


# -- plans --------------------------------------------------------------------
def test_plan_that_is_not_json(case):
    plan = case.out_dir / "plan.json"
    plan.write_text("{mapping: oops")
    run = port(case.src, "--to", TINY, "--plan", plan, "-o", case.out)
    assert_clean_error(run, plan, contains="not valid JSON", code=2)
    case.check_untouched(out_dir_holds=("plan.json",))


@pytest.mark.parametrize("doc", [[1, 2], {"mapping": ["a"]}, {"mapping": {"conv1.weight": 3}}, {}])
def test_plan_without_a_mapping_object(case, doc):
    plan = case.out_dir / "plan.json"
    plan.write_text(json.dumps(doc))
    run = port(case.src, "--to", TINY, "--plan", plan, "-o", case.out)
    assert_clean_error(run, plan, contains='"mapping"', code=2)
    case.check_untouched(out_dir_holds=("plan.json",))


def test_missing_plan_file(case):
    plan = case.out_dir / "nothere.json"
    run = port(case.src, "--to", TINY, "--plan", plan, "-o", case.out)
    assert_clean_error(run, plan, contains="no such plan file", code=2)
    case.check_untouched()


def test_plan_naming_unknown_keys(case):
    plan = case.out_dir / "plan.json"
    plan.write_text(json.dumps({"mapping": {"conv1.weight": "conv1.weight", "bn1.weight": "nosuch.weight"}}))
    run = port(case.src, "--to", TINY, "--plan", plan, "-o", case.out)
    assert_clean_error(run, "--plan", contains="nosuch.weight", code=2)
    plan.write_text(json.dumps({"mapping": {"nosuch.source": "conv1.weight"}}))
    run = port(case.src, "--to", TINY, "--plan", plan, "-o", case.out)
    assert_clean_error(run, "--plan", contains="nosuch.source", code=2)
    case.check_untouched(out_dir_holds=("plan.json",))


def test_plan_mapping_two_sources_to_one_target(case):
    plan = case.out_dir / "plan.json"
    plan.write_text(json.dumps({"mapping": {"bn1.weight": "bn1.bias", "bn1.bias": "bn1.bias"}}))
    run = port(case.src, "--to", TINY, "--plan", plan, "-o", case.out, "--no-strict")
    assert_clean_error(run, "--plan", contains="'bn1.bias'", code=2)
    case.check_untouched(out_dir_holds=("plan.json",))


def test_plan_applied_to_a_source_that_lacks_one_of_its_keys(case, tmp_path):
    import torch

    plan = case.out_dir / "plan.json"
    assert port(case.src, "--to", TINY, "--dry-run", "--plan-out", plan).exit_code == 0
    smaller = tmp_path / "smaller.pth"
    state = torch.load(TINY, weights_only=True)
    del state["fc.bias"]
    torch.save(state, smaller)
    digest = _sha(smaller)
    run = port(smaller, "--to", TINY, "--plan", plan, "-o", case.out, "--no-strict")
    assert_clean_error(run, "--plan", contains="fc.bias", code=2)
    assert _sha(smaller) == digest
    case.check_untouched(out_dir_holds=("plan.json",))


# -- sources --------------------------------------------------------------------
def test_source_that_is_not_a_checkpoint(case, tmp_path):
    src = tmp_path / "page.pth"
    src.write_bytes(b"<!DOCTYPE html><html>404</html>\n")
    run = port(src, "--to", TINY, "-o", case.out)
    assert_clean_error(run, src, code=1)
    assert src.read_bytes() == b"<!DOCTYPE html><html>404</html>\n"
    case.check_untouched()


def test_source_that_does_not_exist(case, tmp_path):
    src = tmp_path / "nothere.pth"
    run = port(src, "--to", TINY, "-o", case.out)
    assert_clean_error(run, src, contains="no such file", code=1)
    case.check_untouched()


def test_source_with_a_payload_without_trust(case):
    src = FIXTURES / "payload_os_system.pth"
    run = port(src, "--to", TINY, "-o", case.out)
    line = assert_clean_error(run, src, contains="refused: the source is not safe to load (danger", code=1)
    assert "os.system" in line and "--trust" in hint_of(run)
    case.check_untouched()


# -- the library --------------------------------------------------------------
def test_library_errors_are_surgery_errors():
    """`Errors are surgery.SurgeryError subclasses`: bad options, collisions and keys that
    cannot be paired as asked, each before anything is loaded."""
    import torch

    model = _tiny_net(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgery.UsageError, match="fuzzy"):
        surgery.port(TINY, into=model, match="fuzzy")
    with pytest.raises(surgery.UsageError, match="would both become"):
        surgery.port(TINY, into=model, rename=[r"(weight|bias)$=w"])
    with pytest.raises(surgery.UsageError):
        surgery.port(TINY, into=model, rename=["(unclosed=x"])
    with pytest.raises(surgery.SurgeryError, match="not safe to load"):
        surgery.port(FIXTURES / "payload_os_system.pth", into=model)
    with pytest.raises(surgery.SurgeryError, match="cannot pair keys by order"):
        surgery.port(TINY, into=model, match="order")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _tiny_net(num_classes: int):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bad_make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_net(num_classes)
