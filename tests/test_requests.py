"""Requests: every command as one value, from flags, a TOML file or a script, with errors that
name the library parameter (and, on the command line, the flag)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_clean_error, run_cli
from safetensors.torch import load_file

import surgery
from surgery.errors import BadArgument, UsageError
from surgery.plans.keys import KeyRules


@pytest.fixture
def wrapped(tmp_path):
    """A DataParallel-style checkpoint and the same weights without the prefix."""
    torch.manual_seed(0)
    state = {
        "fc.weight": torch.randn(3, 4),
        "fc.bias": torch.randn(3),
        "conv.weight": torch.randn(2, 1, 3, 3),
    }
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "plain.pth")
    return tmp_path


# == library errors name the parameter; the CLI names the flag ===========================
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"dtype": "int8"}, "dtype"),
        ({"format": "onnx"}, "format"),
        ({"shard_size": "lots"}, "shard_size"),
        ({"max_output_ratio": 0}, "max_output_ratio"),
        ({"rename": ["(unclosed=x"]}, "rename"),
        ({"strip_prefix": [3]}, "strip_prefix"),
    ],
)
def test_convert_blames_the_parameter_not_a_flag(wrapped, kwargs, param):
    with pytest.raises(BadArgument) as caught:
        surgery.convert(wrapped / "wrapped.pth", wrapped / "out.safetensors", **kwargs)
    assert caught.value.param == param and caught.value.where == param
    assert not (wrapped / "out.safetensors").exists()


def test_the_cli_shows_the_flag_a_parameter_came_from(wrapped):
    run = run_cli("convert", wrapped / "wrapped.pth", "-o", wrapped / "o.safetensors", "--dtype", "int8")
    assert_clean_error(run, "--dtype", contains="'int8' is not one of bf16, fp16, fp32", code=2)
    run = run_cli("convert", wrapped / "wrapped.pth", "-o", wrapped / "o.pt", "--shard-size", "lots")
    assert_clean_error(run, "--shard-size", code=2)


def test_a_missing_argument_is_named_as_the_command_line_names_it(tmp_path):
    assert_clean_error(run_cli("port", "--to", "torchvision:resnet18", "--dry-run"), "SOURCE", code=2)
    assert_clean_error(run_cli("diff"), "A", contains="name both checkpoints", code=2)


def test_a_collision_made_by_strip_prefix_blames_strip_prefix(wrapped):
    torch.save({"a.x": torch.ones(1), "b.x": torch.ones(1)}, wrapped / "two.pth")
    args = ["--strip-prefix", "a.", "--strip-prefix", "b."]
    run = run_cli("convert", wrapped / "two.pth", "-o", wrapped / "o.safetensors", *args)
    assert_clean_error(run, "--strip-prefix", contains="would both become 'x'", code=2)
    with pytest.raises(BadArgument) as caught:
        surgery.convert(wrapped / "two.pth", wrapped / "o.safetensors", strip_prefix=["a.", "b."])
    assert caught.value.param == "strip_prefix"


def test_a_single_string_is_one_prefix_not_its_letters(wrapped):
    assert KeyRules.parse(strip_prefix="module.").strip_prefix == ("module.",)
    report = surgery.convert(wrapped / "wrapped.pth", wrapped / "o.safetensors", strip_prefix="module.")
    assert set(load_file(wrapped / "o.safetensors")) == {"fc.weight", "fc.bias", "conv.weight"}
    assert report.written


# == requests from files ====================================================================
def test_convert_request_from_a_file_flags_win(wrapped):
    recipe = wrapped / "convert.toml"
    recipe.write_text(
        f'source = "{wrapped / "wrapped.pth"}"\nout = "{wrapped / "a.safetensors"}"\n'
        'strip_prefix = ["module."]\ndtype = "bf16"\nexclude = ["conv*"]\n'
    )
    request = surgery.ConvertRequest.from_file(recipe)
    assert request.dtype == "bfloat16" and request.keys.exclude == ("conv*",)
    run = run_cli("convert", "--recipe", recipe, "-o", wrapped / "b.safetensors", "--json")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["output"] == str(wrapped / "b.safetensors") and doc["options"]["dtype"] == "bfloat16"
    out = load_file(wrapped / "b.safetensors")
    assert set(out) == {"fc.weight", "fc.bias"} and out["fc.weight"].dtype == torch.bfloat16


def test_diff_request_from_a_file(wrapped):
    recipe = wrapped / "diff.toml"
    recipe.write_text(
        f'a = "{wrapped / "wrapped.pth"}"\nb = "{wrapped / "plain.pth"}"\nstrip_prefix = ["module."]\n'
    )
    report = surgery.diff_files(surgery.DiffRequest.from_file(recipe))
    assert report.same and report.compared == 3
    run = run_cli("diff", "--recipe", recipe, "--exit-code")
    assert run.exit_code == 0, run.stdout


@pytest.mark.parametrize("field", ["trust", "force", "dry_run"])
def test_a_request_file_never_decides_for_its_caller(wrapped, field):
    recipe = wrapped / "convert.toml"
    recipe.write_text(f'source = "{wrapped / "wrapped.pth"}"\nout = "{wrapped / "o.pt"}"\n{field} = true\n')
    with pytest.raises(UsageError, match=f"unknown field {field}"):
        surgery.ConvertRequest.from_file(recipe)


def test_a_request_file_with_a_wrong_type(wrapped):
    recipe = wrapped / "convert.toml"
    recipe.write_text('source = "x.pth"\nout = "o.pt"\nshard_size = true\n')
    run = run_cli("convert", "--recipe", recipe)
    assert_clean_error(run, recipe, contains="field 'shard_size' should be str or int, not bool", code=2)


# == diff gains the key rules port and convert have ==========================================
def test_diff_renames_and_adds_prefixes_on_both_sides(wrapped):
    torch.save(
        {f"backbone.{k}": v for k, v in torch.load(wrapped / "plain.pth").items()}, wrapped / "renamed.pth"
    )
    report = surgery.diff(wrapped / "plain.pth", wrapped / "renamed.pth", rename=[r"^backbone\.="])
    assert report.same, report.summary()
    report = surgery.diff(wrapped / "plain.pth", wrapped / "renamed.pth", add_prefix="backbone.")
    assert not report.same and len(report.only_b) == 3  # both sides get the prefix: B's doubles
    run = run_cli(
        "diff", wrapped / "plain.pth", wrapped / "renamed.pth", "--rename", r"^backbone\.=", "--exit-code"
    )
    assert run.exit_code == 0, run.stdout


def test_every_command_shows_examples_in_its_help():
    for command in ("inspect", "port", "convert", "diff", "scan", "sanitize"):
        text = run_cli(command, "--help").stdout
        examples = text[text.index("Examples:") :].splitlines()[1:]
        assert len([line for line in examples if line.strip().startswith(f"surgery {command} ")]) >= 2, text
