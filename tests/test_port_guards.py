"""A port never writes a wrong model quietly (issue 11, items 1, 2 and 7).

Guards: a port that would load less than --min-coverage of the target is refused, strict
or not, and writes nothing; the library refuses it too. Strict with intent: keys new by
the user's edits (--num-classes, --replace, --drop) or by --allow-missing/--allow-unexpected
do not fail a strict port. Hints: the refusal names the easy fix (a prefix, suffix
matching, a rename between keys of equal shape).

Inputs are real files: a BERT-shaped stand-in (no transformers needed) saved bare and
under `bert.`, and the session's seeded torchvision resnet18.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

import surgery
from surgery.plans.hints import PrefixFix, diagnose, prefix_fix, rename_candidates, suffix_pairs
from surgery.values import Entry

# -- inputs -----------------------------------------------------------------------------


def bert_like():
    """A small module named as BERT's encoder is: embeddings, encoder.layer.N.*, pooler."""
    import torch
    from torch import nn

    torch.manual_seed(11)
    model = nn.Module()
    model.embeddings = nn.Module()
    model.embeddings.word_embeddings = nn.Embedding(30, 8)
    model.embeddings.LayerNorm = nn.LayerNorm(8)
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList()
    for _ in range(2):
        layer = nn.Module()
        layer.attention = nn.Linear(8, 8)
        layer.output = nn.Linear(8, 8)
        model.encoder.layer.append(layer)
    model.pooler = nn.Linear(8, 8)
    return model


def wrapped(inner):
    """`inner` as the `bert` submodule of a task model (BertForSequenceClassification's layout)."""
    from torch import nn

    model = nn.Module()
    model.bert = inner
    return model


@dataclass(frozen=True)
class Bert:
    bare: Path  # the encoder's keys (embeddings..., encoder.layer.0...)
    template: Path  # the same keys under `bert.`, zeros: a template target


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Bert:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("bert")
    state = bert_like().state_dict()
    save_file(state, folder / "bare.safetensors")
    save_file({"bert." + k: torch.zeros_like(v) for k, v in state.items()}, folder / "template.safetensors")
    return Bert(folder / "bare.safetensors", folder / "template.safetensors")


def port_json(*args) -> tuple[object, dict]:
    run = run_cli("port", *args, "--json")
    assert run.stdout.startswith("{"), run
    return run, json.loads(run.stdout)


def hint_of(run) -> str:
    hints = [line for line in run.stderr.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, run.stderr
    return hints[0]


# -- 1. guards --------------------------------------------------------------------------
def test_no_strict_port_that_loads_nothing_is_refused_and_writes_nothing(bert, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli("port", bert.bare, "--to", bert.template, "--strict", "false", "-o", out)
    assert_clean_error(run, bert.bare, contains="0.0% of the target's parameters would be loaded", code=1)
    assert "under --min-coverage 50%" in run.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "not written (under --min-coverage 50%)" in run.stdout  # the report is printed
    hint = hint_of(run)
    assert "--add-prefix bert." in hint and "--strict false" not in hint


def test_min_coverage_zero_writes_it_by_name(bert, tmp_path):
    out = tmp_path / "out.safetensors"
    run, doc = port_json(
        bert.bare, "--to", bert.template, "--strict", "false", "--min-coverage", "0", "-o", out
    )
    assert run.exit_code == 0, run
    assert doc["written"] and doc["coverage"] == 0.0 and doc["min_coverage"] == 0.0
    assert out.exists()


def test_the_prefix_the_hint_names_ports_everything_strictly(bert, tmp_path):
    out = tmp_path / "out.safetensors"
    run, doc = port_json(bert.bare, "--to", bert.template, "--add-prefix", "bert.", "-o", out)
    assert run.exit_code == 0, run
    assert doc["coverage"] == 1.0 and doc["missing"] == [] and doc["hints"] == []


def test_strict_refusal_never_hints_strict_false_when_almost_nothing_matched(bert, tmp_path):
    run = run_cli("port", bert.bare, "--to", bert.template, "--min-coverage", "0", "--dry-run")
    assert_clean_error(run, bert.bare, contains="strict port refused", code=1)
    hint = hint_of(run)
    assert "--add-prefix bert." in hint and "--strict false" not in hint


def test_min_coverage_is_of_what_was_expected_and_partial_ports_pass(seeded_resnet18, tmp_path):
    """The default 50% lets a port that loads most of the model through, strict false."""
    out = tmp_path / "out.safetensors"
    target = "torchvision:resnet18?num_classes=2"
    run, doc = port_json(seeded_resnet18.plain, "--to", target, "--strict", "false", "-o", out)
    assert run.exit_code == 0 and doc["written"], run
    assert doc["summary"].startswith("loaded 120/122 tensors (99.99% of parameters)")
    run = run_cli(
        "port",
        seeded_resnet18.plain,
        "--to",
        target,
        "--strict",
        "false",
        "--min-coverage",
        "100",
        "--dry-run",
    )
    assert_clean_error(run, seeded_resnet18.plain, contains="under --min-coverage 100%", code=1)


def test_library_port_refuses_a_port_that_loads_nothing(bert):
    """The issue's case: BERT tensors into a resnet18, with the library's defaults (strict=False)."""
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgery.PortFailed) as info:
        surgery.port(bert.bare, into=model)
    assert "0.0% of the target's parameters would be loaded, under --min-coverage 50%" in str(info.value)
    assert info.value.report.coverage == 0.0 and not info.value.report.plan.matched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded
    assert surgery.port(bert.bare, into=model, min_coverage=0).coverage == 0.0  # opted out by name


def test_library_hint_names_the_prefix(bert):
    model = wrapped(bert_like())
    with pytest.raises(surgery.PortFailed) as info:
        surgery.port(bert.bare, into=model, match="exact")
    assert info.value.hint.startswith("--add-prefix bert. would pair 13 of 13 missing keys")
    assert surgery.port(bert.bare, into=model, match="exact", add_prefix="bert.").coverage == 1.0


def test_library_port_file_refuses_and_writes_nothing(bert, tmp_path):
    out = tmp_path / "out.safetensors"
    request = surgery.PortRequest(str(bert.bare), str(bert.template), out=str(out), strict=False)
    with pytest.raises(surgery.PortFailed):
        surgery.port_file(request)
    assert not out.exists()


@pytest.mark.parametrize("value", ["150", "-1"])
def test_min_coverage_out_of_range_is_bad_usage(bert, tmp_path, value):
    run = run_cli("port", bert.bare, "--to", bert.template, "--min-coverage", value, "-o", tmp_path / "o.pt")
    assert run.exit_code == 2 and "Traceback" not in run.stderr, run
    assert "--min-coverage" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_recipe_min_coverage_of_the_wrong_type_is_a_clean_error(bert, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'source = "{bert.bare}"\nto = "{bert.template}"\nmin_coverage = "none"\n')
    run = run_cli("port", "--recipe", recipe, "--dry-run")
    assert_clean_error(run, recipe, contains="min_coverage", code=2)


def test_recipe_sets_min_coverage_and_allow_globs(bert, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'source = "{bert.bare}"\nto = "{bert.template}"\nmin_coverage = 0\n'
        'allow_missing = ["bert.*"]\nallow_unexpected = ["*"]\n'
    )
    run, doc = port_json("--recipe", recipe, "--dry-run")
    assert run.exit_code == 0, run  # strict, everything declared new or unused
    assert len(doc["new"]) == len(doc["unused"]) == 13 and doc["missing"] == doc["unexpected"] == []


# -- 2. strict with intent --------------------------------------------------------------
def test_strict_port_with_num_classes_works_on_the_first_try(seeded_resnet18, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "five.safetensors"
    run, doc = port_json(
        seeded_resnet18.plain, "--to", "torchvision:resnet18", "--num-classes", "5", "-o", out
    )
    assert run.exit_code == 0, run
    assert sorted(doc["new"]) == ["fc.bias", "fc.weight"] and sorted(doc["unused"]) == [
        "fc.bias",
        "fc.weight",
    ]
    assert doc["mismatched"] == [] and doc["missing"] == [] and doc["unexpected"] == []
    assert doc["summary"] == (
        "loaded 120/122 tensors (100.0% of the expected parameters); new 2: fc.{bias,weight}; "
        "missing 0; unexpected 0; unused 2: fc.{bias,weight}"
    )
    state = load_file(out)
    assert state["fc.weight"].shape == (5, 512)
    source = seeded_resnet18.state
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("fc."))


def test_strict_num_classes_report_shows_new_rows(seeded_resnet18):
    run = run_cli(
        "port", seeded_resnet18.plain, "--to", "torchvision:resnet18", "--num-classes", "5", "--dry-run"
    )
    assert run.exit_code == 0, run
    lines = run.stdout.splitlines()
    assert "  new         fc.{bias,weight}" in lines
    assert "  mismatched  none" in lines
    assert "  unused      fc.{bias,weight}" in lines
    assert any("expected from the source (2,565 new)" in line for line in lines)


def test_strict_port_with_replace_works_through_a_prefix(seeded_resnet18, tmp_path):
    """The ImageNet example's `module.fc.*` is under the replaced `fc` once `module.` is stripped."""
    out = tmp_path / "head.safetensors"
    run, doc = port_json(
        seeded_resnet18.imagenet,
        "--to",
        "torchvision:resnet18",
        "--replace",
        "fc=Sequential(Dropout(0.2), Linear(*, 5))",
        "-o",
        out,
    )
    assert run.exit_code == 0, run
    assert sorted(doc["new"]) == ["fc.1.bias", "fc.1.weight"]
    assert sorted(doc["unused"]) == ["module.fc.bias", "module.fc.weight"]
    assert doc["coverage"] == 1.0 and out.exists()


def test_strict_port_into_a_bigger_head_without_intent_is_still_refused(seeded_resnet18):
    run = run_cli("port", seeded_resnet18.plain, "--to", "torchvision:resnet18?num_classes=5", "--dry-run")
    assert_clean_error(run, seeded_resnet18.plain, contains="mismatched 2: fc.{bias,weight}", code=1)
    assert "--strict false" in hint_of(run)  # most of the model matched: loading what matches is a fix


def test_allow_missing_says_a_head_is_new(seeded_resnet18, tmp_path):
    out = tmp_path / "out.safetensors"
    target = "torchvision:resnet18?num_classes=5"
    run, doc = port_json(seeded_resnet18.plain, "--to", target, "--allow-missing", "fc", "-o", out)
    assert run.exit_code == 0, run
    assert sorted(doc["new"]) == ["fc.bias", "fc.weight"] and doc["mismatched"] == []


def test_allow_unexpected_says_extra_source_keys_are_expected(seeded_resnet18, tmp_path):
    import torch

    src = tmp_path / "extra.pth"
    state = dict(seeded_resnet18.state)
    state["aux_head.weight"] = torch.ones(3, 512)
    state["aux_head.bias"] = torch.ones(3)
    torch.save(state, src)
    run = run_cli("port", src, "--to", "torchvision:resnet18", "--dry-run")
    assert_clean_error(run, src, contains="unexpected 2: aux_head.{bias,weight}", code=1)
    run, doc = port_json(src, "--to", "torchvision:resnet18", "--allow-unexpected", "aux_head.*", "--dry-run")
    assert run.exit_code == 0, run
    assert doc["unused"] == ["aux_head.weight", "aux_head.bias"] and doc["unexpected"] == []


def test_allow_missing_does_not_excuse_other_keys(seeded_resnet18):
    run = run_cli(
        "port",
        seeded_resnet18.plain,
        "--to",
        "torchvision:resnet18?num_classes=5",
        "--allow-missing",
        "fc.bias",
        "--dry-run",
    )
    assert_clean_error(run, seeded_resnet18.plain, contains="mismatched 1: fc.weight", code=1)


# -- 7. hints that diagnose --------------------------------------------------------------
def e(name: str, shape: tuple[int, ...] = (4,)) -> Entry:
    return Entry(name, shape, "float32")


def test_prefix_fix_adds_strips_or_both():
    names = ["a.weight", "b.weight", "c.0.bias"]
    assert prefix_fix([e("bert." + n) for n in names], [e(n) for n in names]) == PrefixFix("", "bert.", 3)
    assert prefix_fix([e(n) for n in names], [e("encoder." + n) for n in names]) == PrefixFix(
        "encoder.", "", 3
    )
    assert prefix_fix([e("x." + n) for n in names], [e("y." + n) for n in names]) == PrefixFix("y.", "x.", 3)


def test_prefix_fix_needs_equal_shapes_and_more_than_one_key():
    assert (
        prefix_fix([e("bert.a.weight", (2,)), e("bert.b.weight", (2,))], [e("a.weight"), e("b.weight")])
        is None
    )
    assert prefix_fix([e("bert.a.weight")], [e("a.weight")]) is None


def test_suffix_matching_is_suggested_when_no_one_prefix_pairs_them_all():
    missing = [e("backbone.body.conv.weight"), e("backbone.body.bn.weight"), e("neck.fpn.weight")]
    unexpected = [e("conv.weight"), e("bn.weight"), e("fpn.weight")]
    assert suffix_pairs(missing, unexpected) == 3
    hints = diagnose(missing, unexpected, match="exact")
    assert hints[0].startswith("--add-prefix backbone.body. would pair 2 of 3")
    assert hints[1] == "--match suffix would pair 3 of 3 missing keys with unexpected keys of their shape"
    assert not any("--match suffix" in h for h in diagnose(missing, unexpected, match="auto"))


def test_rename_candidates_pair_the_one_key_of_each_shape():
    missing = [e("class_token", (1, 1, 768)), e("norm.weight", (768,)), e("norm.bias", (768,))]
    unexpected = [e("cls_token", (1, 1, 768)), e("ln.weight", (768,)), e("ln.bias", (768,))]
    pairs = rename_candidates(missing, unexpected)
    assert [(m.name, u.name) for m, u in pairs] == [("class_token", "cls_token")]  # [768] is ambiguous
    assert diagnose(missing, unexpected) == [
        "missing class_token [1, 1, 768] next to unexpected cls_token [1, 1, 768]: "
        "maybe --rename '^cls_token$=class_token'"
    ]


def test_diagnose_says_nothing_without_both_sides():
    assert diagnose([e("a")], []) == [] and diagnose([], [e("a")]) == []
    assert diagnose([e("a", (2,))], [e("b", (3,))]) == []


def test_prefix_fix_after_stripped_names_is_a_rename():
    """Once the rules changed the names (auto-stripped `module.`), a new --add-prefix would turn
    the stripping off: the hint is a --rename, which runs after it."""
    hints = diagnose([e("bert.a.w"), e("bert.b.w")], [e("a.w"), e("b.w")], plain_names=False)
    assert hints == ["--rename '^=bert.' would pair 2 of 2 missing keys with unexpected keys of their shape"]


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A ViT-shaped source naming its class token `cls_token`; a template naming it `class_token`."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("vit")
    body = {f"blocks.{i}.{p}": torch.randn(16, 16) for i in range(3) for p in ("qkv.weight", "proj.weight")}
    save_file({**body, "cls_token": torch.randn(1, 1, 16)}, folder / "source.safetensors")
    save_file({**body, "class_token": torch.zeros(1, 1, 16)}, folder / "template.safetensors")
    return folder / "source.safetensors", folder / "template.safetensors"


def test_cli_hint_names_the_candidate_rename_and_the_rename_works(vit_pair, tmp_path):
    source, template = vit_pair
    run = run_cli("port", source, "--to", template, "--dry-run")
    assert_clean_error(run, source, contains="missing 1: class_token; unexpected 1: cls_token", code=1)
    hint = hint_of(run)
    assert "missing class_token [1, 1, 16] next to unexpected cls_token [1, 1, 16]" in hint
    assert "maybe --rename '^cls_token$=class_token'" in hint
    assert "  hints       missing class_token [1, 1, 16] next to unexpected cls_token" in run.stdout
    out = tmp_path / "out.safetensors"
    run, doc = port_json(source, "--to", template, "--rename", "^cls_token$=class_token", "-o", out)
    assert run.exit_code == 0 and doc["coverage"] == 1.0, run


def test_cli_hint_names_a_prefix_to_strip(bert, tmp_path):
    run = run_cli("port", bert.template, "--to", bert.bare, "--dry-run")
    assert_clean_error(run, bert.template, code=1)
    assert "--strip-prefix bert. would pair 13 of 13 missing keys" in hint_of(run)


def test_with_intent_reads_source_keys_by_their_renamed_names():
    from surgery.plans.intent import Intent, with_intent
    from surgery.plans.match import Mismatched, PortPlan

    plan = PortPlan(
        (),
        (Mismatched("module.fc.weight", "fc.weight", (10, 4), (2, 4)),),
        ("fc.bias", "extra.weight"),
        ("module.fc.bias", "module.aux.weight", "module.other.weight"),
    )
    renamed = {
        k: k.removeprefix("module.") for k in ("module.fc.weight", "module.fc.bias", "module.aux.weight")
    }
    renamed["module.other.weight"] = "other.weight"
    read = with_intent(plan, Intent(created=("fc",), removed=("aux",)), renamed)
    assert read.new == ("fc.weight", "fc.bias") and read.missing == ("extra.weight",)
    assert read.unused == ("module.fc.weight", "module.fc.bias", "module.aux.weight")
    assert read.mismatched == () and read.unexpected == ("module.other.weight",)
    assert not read.complete  # extra.weight and other.weight nobody asked for
    allowed = with_intent(read, Intent(allow_missing=("extra",), allow_unexpected=("other.*",)), renamed)
    assert (
        allowed.complete and allowed.new[-1] == "extra.weight" and allowed.unused[-1] == "module.other.weight"
    )


@pytest.mark.parametrize("param", ["allow_missing", "allow_unexpected"])
def test_library_allow_globs_are_strings(param):
    """One glob or a list of them; anything else is refused naming the parameter, before any reading."""
    from torch import nn

    from surgery.errors import BadArgument

    with pytest.raises(BadArgument, match=param):
        surgery.port("fixtures/tiny.safetensors", into=nn.Linear(2, 2), **{param: ["fc.*", 1]})
