"""The pure parts of `surgery port`: pairing keys (surgery/match.py) and the key pipeline
(surgery/plans/keys.py), on names and shapes alone. Nothing here reads a file or builds a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.plans import keys
from surgery.plans.keys import Rename
from surgery.plans.match import (
    Entry,
    Matched,
    MatchError,
    Mismatched,
    Pair,
    auto_strip,
    fill_as_torch,
    judge,
    model_order,
    pair,
    pair_exact,
    pair_order,
    pair_suffix,
    permuted_layers,
    transposed,
)


def entries(*specs: tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], str]) -> list[Entry]:
    return [Entry(s[0], s[1], s[2] if len(s) > 2 else "float32") for s in specs]


def same(names) -> dict[str, str]:
    """The renamed-names dict of a pipeline that renamed nothing."""
    return {n: n for n in names}


def as_tuples(pairs: list[Pair]) -> list[tuple[str, str, str]]:
    return [(p.source, p.target, p.how) for p in pairs]


# -- pair_exact ---------------------------------------------------------------
def test_pair_exact_pairs_current_names_and_reports_original_source_names():
    renamed = {"module.fc.weight": "fc.weight", "module.fc.bias": "fc.bias", "module.extra": "extra"}
    pairs = pair_exact(renamed, ["fc.bias", "fc.weight", "conv.weight"])
    assert as_tuples(pairs) == [
        ("module.fc.bias", "fc.bias", "exact"),  # in target order
        ("module.fc.weight", "fc.weight", "exact"),
    ]


def test_pair_exact_with_nothing_in_common_is_empty():
    assert pair_exact(same(["a.w", "b.w"]), ["c.w", "d.w"]) == []
    assert pair_exact({}, ["a"]) == [] and pair_exact(same(["a"]), []) == []


# -- pair_suffix --------------------------------------------------------------
def test_suffix_backbone_checkpoint_into_a_detector_takes_the_longest_dotted_suffix():
    source = same(["conv1.weight", "layer1.0.conv1.weight", "fc.weight"])
    target = ["backbone.body.conv1.weight", "backbone.body.layer1.0.conv1.weight", "head.cls.weight"]
    pairs = pair_suffix(source, target, ambiguous_is_error=True)
    assert as_tuples(pairs) == [
        ("conv1.weight", "backbone.body.conv1.weight", "suffix"),
        ("layer1.0.conv1.weight", "backbone.body.layer1.0.conv1.weight", "suffix"),
    ]


def test_suffix_longest_overlap_wins_over_a_shorter_one():
    # `0.conv1.weight` and `conv1.weight` are both dotted suffixes of the target: the longer one wins
    source = same(["conv1.weight", "0.conv1.weight"])
    pairs = pair_suffix(source, ["layer1.0.conv1.weight"], ambiguous_is_error=True)
    assert as_tuples(pairs) == [("0.conv1.weight", "layer1.0.conv1.weight", "suffix")]


def test_suffix_the_other_direction_a_detector_backbone_into_a_classifier():
    source = same(["backbone.body.fc1.weight", "backbone.body.fc1.bias", "head.cls.weight"])
    pairs = pair_suffix(source, ["fc1.weight", "fc1.bias"], ambiguous_is_error=True)
    assert as_tuples(pairs) == [
        ("backbone.body.fc1.weight", "fc1.weight", "suffix"),
        ("backbone.body.fc1.bias", "fc1.bias", "suffix"),
    ]


def test_suffix_other_direction_prefers_the_source_key_that_adds_the_least():
    """A resnet's `conv1.weight` is the tail of `backbone.body.conv1.weight` and also of every
    `backbone.body.layerN.M.conv1.weight`: the detector's own stem conv is the one that
    overlaps the target most (only the detector's prefix added), as the README promises
    (`a detector's backbone into a classifier`)."""
    source = same(
        [
            "backbone.body.conv1.weight",
            "backbone.body.layer1.0.conv1.weight",
            "backbone.body.layer1.1.conv1.weight",
        ]
    )
    target = ["conv1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight"]
    pairs = pair_suffix(source, target, ambiguous_is_error=True)
    assert sorted(as_tuples(pairs)) == sorted(
        [
            ("backbone.body.conv1.weight", "conv1.weight", "suffix"),
            ("backbone.body.layer1.0.conv1.weight", "layer1.0.conv1.weight", "suffix"),
            ("backbone.body.layer1.1.conv1.weight", "layer1.1.conv1.weight", "suffix"),
        ]
    )


def test_suffix_a_target_two_source_keys_fit_equally_well_is_an_error_naming_them():
    source = same(["a.conv.weight", "b.conv.weight"])
    with pytest.raises(MatchError) as info:
        pair_suffix(source, ["conv.weight"], ambiguous_is_error=True)
    assert "'conv.weight'" in str(info.value)
    assert "a.conv.weight" in str(info.value) and "b.conv.weight" in str(info.value)
    # auto mode: skipped, not guessed
    assert pair_suffix(source, ["conv.weight"], ambiguous_is_error=False) == []


def test_suffix_one_source_feeding_two_targets_is_an_error_naming_both():
    source = same(["fc.weight"])
    target = ["head_a.fc.weight", "head_b.fc.weight"]
    with pytest.raises(MatchError) as info:
        pair_suffix(source, target, ambiguous_is_error=True)
    message = str(info.value)
    assert "'fc.weight'" in message
    assert "head_a.fc.weight" in message and "head_b.fc.weight" in message


def test_suffix_one_source_feeding_two_targets_is_silently_skipped_in_auto():
    source = same(["fc.weight", "conv.weight"])
    target = ["head_a.fc.weight", "head_b.fc.weight", "body.conv.weight"]
    pairs = pair_suffix(source, target, ambiguous_is_error=False)
    assert as_tuples(pairs) == [("conv.weight", "body.conv.weight", "suffix")]
    # and through pair(): neither head takes the shared key; both stay missing in the plan
    src = entries(("fc.weight", (2, 3)), ("conv.weight", (4,)))
    tgt = entries(("head_a.fc.weight", (2, 3)), ("head_b.fc.weight", (2, 3)), ("body.conv.weight", (4,)))
    plan = judge(pair(src, same(["fc.weight", "conv.weight"]), tgt, "auto"), src, tgt)
    assert [m.target for m in plan.matched] == ["body.conv.weight"]
    assert set(plan.missing) == {"head_a.fc.weight", "head_b.fc.weight"}
    assert plan.unexpected == ("fc.weight",)


def test_suffix_an_exact_name_beats_a_suffix():
    source = same(["fc.weight"])
    pairs = pair_suffix(source, ["fc.weight", "head.fc.weight"], ambiguous_is_error=True)
    assert as_tuples(pairs) == [("fc.weight", "fc.weight", "exact")]


def test_suffix_matches_whole_dotted_parts_only():
    # `conv1.weight` is not a dotted suffix of `xconv1.weight`
    assert pair_suffix(same(["conv1.weight"]), ["body.xconv1.weight"], ambiguous_is_error=True) == []
    assert pair_suffix(same(["body.xconv1.weight"]), ["conv1.weight"], ambiguous_is_error=True) == []


def test_suffix_reports_original_names_after_renames():
    renamed = {"module.layer.w": "layer.w"}
    pairs = pair_suffix(renamed, ["net.layer.w"], ambiguous_is_error=True)
    assert as_tuples(pairs) == [("module.layer.w", "net.layer.w", "suffix")]


# -- pair_order ---------------------------------------------------------------
def test_order_pairs_the_same_structure_by_position():
    src = entries(("enc.0.w", (3, 2)), ("enc.1.w", (3,)), ("enc.2.w", ()))
    tgt = entries(("conv.weight", (3, 2)), ("conv.bias", (3,)), ("bn.num_batches_tracked", ()))
    assert as_tuples(pair_order(src, tgt, refuse=True)) == [
        ("enc.0.w", "conv.weight", "order"),
        ("enc.1.w", "conv.bias", "order"),
        ("enc.2.w", "bn.num_batches_tracked", "order"),
    ]


def test_order_refuses_different_counts():
    src = entries(("a", (2,)), ("b", (2,)), ("c", (2,)))
    tgt = entries(("x", (2,)), ("y", (2,)))
    with pytest.raises(MatchError, match=r"3 source keys against 2 target keys"):
        pair_order(src, tgt, refuse=True)
    assert pair_order(src, tgt, refuse=False) == []


def test_order_refuses_a_shape_divergence_and_names_the_first_one():
    src = entries(("a", (2,)), ("b", (3, 4)), ("c", (5,)))
    tgt = entries(("x", (2,)), ("y", (4, 3)), ("z", (6,)))
    with pytest.raises(MatchError) as info:
        pair_order(src, tgt, refuse=True)
    message = str(info.value)
    assert "key 2" in message and "b [3, 4]" in message and "y [4, 3]" in message
    assert "c [5]" not in message and "z [6]" not in message  # the first divergence only
    assert pair_order(src, tgt, refuse=False) == []


def test_order_with_nothing_on_either_side_is_empty():
    assert pair_order([], [], refuse=True) == []


# -- pair (the modes) ---------------------------------------------------------
def test_pair_modes_dispatch():
    src = entries(("fc.weight", (2, 2)), ("body.conv.weight", (3,)))
    tgt = entries(("fc.weight", (2, 2)), ("conv.weight", (3,)))
    renamed = same(e.name for e in src)
    assert as_tuples(pair(src, renamed, tgt, "exact")) == [("fc.weight", "fc.weight", "exact")]
    assert as_tuples(pair(src, renamed, tgt, "suffix")) == [
        ("fc.weight", "fc.weight", "exact"),
        ("body.conv.weight", "conv.weight", "suffix"),
    ]
    assert as_tuples(pair(src, renamed, tgt, "order")) == [
        ("fc.weight", "fc.weight", "order"),
        ("body.conv.weight", "conv.weight", "order"),
    ]
    with pytest.raises(ValueError, match="fuzzy"):
        pair(src, renamed, tgt, "fuzzy")


def test_pair_auto_exact_then_suffix_then_order_on_what_is_left():
    src = entries(
        ("fc.weight", (2, 4)),  # exact
        ("stem.conv.weight", (8, 3)),  # suffix -> conv.weight
        ("enc.0", (5,)),  # order, with enc.1
        ("enc.1", (6, 6)),
    )
    tgt = entries(("conv.weight", (8, 3)), ("blk.a", (5,)), ("blk.b", (6, 6)), ("fc.weight", (2, 4)))
    pairs = pair(src, same(e.name for e in src), tgt, "auto")
    assert sorted(as_tuples(pairs)) == sorted(
        [
            ("fc.weight", "fc.weight", "exact"),
            ("stem.conv.weight", "conv.weight", "suffix"),
            ("enc.0", "blk.a", "order"),
            ("enc.1", "blk.b", "order"),
        ]
    )


def test_pair_auto_leaves_what_does_not_line_up_unpaired():
    src = entries(("fc.weight", (2, 4)), ("enc.0", (5,)), ("enc.1", (7,)))
    tgt = entries(("fc.weight", (2, 4)), ("blk.a", (5,)), ("blk.b", (6,)))
    pairs = pair(src, same(e.name for e in src), tgt, "auto")
    assert as_tuples(pairs) == [("fc.weight", "fc.weight", "exact")]


def test_pair_order_uses_the_kept_keys_only_in_file_order():
    src = entries(("a", (1,)), ("dropped", (9,)), ("b", (2,)))
    tgt = entries(("x", (1,)), ("y", (2,)))
    pairs = pair(src, {"a": "a", "b": "b"}, tgt, "order")
    assert as_tuples(pairs) == [("a", "x", "order"), ("b", "y", "order")]


def test_pair_order_mode_refuses_a_divergence():
    src = entries(("a", (1,)), ("b", (2,)))
    tgt = entries(("x", (1,)), ("y", (3,)))
    with pytest.raises(MatchError, match="cannot pair keys by order"):
        pair(src, same(["a", "b"]), tgt, "order")


def test_pair_suffix_mode_refuses_ambiguity_and_auto_does_not():
    src = entries(("fc.weight", (2,)))
    tgt = entries(("a.fc.weight", (2,)), ("b.fc.weight", (2,)))
    with pytest.raises(MatchError, match="would feed both"):
        pair(src, same(["fc.weight"]), tgt, "suffix")
    assert pair(src, same(["fc.weight"]), tgt, "auto") == []


# -- model order and permuted layers (issue 11, item 5) ----------------------------
def test_model_order_keeps_a_saved_order_and_sorts_a_sorted_file_naturally():
    string_sorted = entries(*((f"blocks.{i}.weight", (2,)) for i in sorted(range(12), key=str)))
    assert [e.name for e in string_sorted][:4] == [
        "blocks.0.weight",
        "blocks.1.weight",
        "blocks.10.weight",
        "blocks.11.weight",
    ]
    assert model_order(string_sorted, saved=True) == string_sorted
    assert [e.name for e in model_order(string_sorted, saved=False)] == [
        f"blocks.{i}.weight" for i in range(12)
    ]


def test_model_order_sorts_the_source_by_its_renamed_names():
    src = entries(("z.0", (1,)), ("a.1", (1,)))
    order = model_order(src, saved=False, name_of={"z.0": "layer.0", "a.1": "layer.1"})
    assert [e.name for e in order] == ["z.0", "a.1"]


def test_pair_order_of_sorted_files_pairs_layer_numbers_not_string_positions():
    """The issue's case: a template stored sorted as strings paired `block02 -> blocks.10`."""
    src = entries(*((f"block{i:02d}.weight", (4, 4)) for i in range(12)))
    tgt = entries(*((f"blocks.{i}.weight", (4, 4)) for i in sorted(range(12), key=str)))
    renamed = same(e.name for e in src)
    with pytest.raises(MatchError, match="permuting layers"):  # as stored: refused, never scrambled
        pair(src, renamed, tgt, "order")
    pairs = pair(src, renamed, tgt, "order", saved_order=False)
    assert as_tuples(pairs) == [(f"block{i:02d}.weight", f"blocks.{i}.weight", "order") for i in range(12)]


def test_permuted_layers_finds_layers_numbered_in_opposite_orders():
    assert permuted_layers([("b0.w", "l.1.w"), ("b1.w", "l.0.w")]) == (("b0.w", "l.1.w"), ("b1.w", "l.0.w"))
    assert permuted_layers([("b0.w", "l.0.w"), ("b1.w", "l.1.w"), ("b2.w", "l.2.w")]) is None


def test_permuted_layers_ignores_numbers_that_do_not_count_the_same_layers():
    # a running index against resnet's (layer, block, conv): no number corresponds one to one
    running = [
        ("enc.0.w", "layer1.0.conv1.weight"),
        ("enc.1.w", "layer1.0.conv2.weight"),
        ("enc.2.w", "layer2.0.conv1.weight"),
    ]
    assert permuted_layers(running) is None
    # names nested the other way round: each number still rises with its counterpart
    reversed_names = [(".".join(reversed(t.split("."))), t) for _, t in running] + [
        ("weight.conv1.1.layer1", "layer1.1.conv1.weight")
    ]
    assert permuted_layers(reversed_names) is None
    # other patterns are other structures: `fc` and `head.1` are not compared with blocks
    assert permuted_layers([("b1.w", "blocks.0.w"), ("fc1.w", "head.0.w"), ("b2.w", "blocks.1.w")]) is None


# -- reshape never scrambles (issue 11, item 4) --------------------------------------
def test_transposed_is_a_permutation_of_dimensions_size_one_aside():
    assert transposed((6, 4), (4, 6))
    assert transposed((2, 3, 4), (4, 2, 3))
    assert transposed((6, 4), (4, 6, 1, 1))  # a Linear read into a 1x1 conv the wrong way round
    assert not transposed((6, 4), (6, 4, 1, 1))  # Linear <-> 1x1 conv: a true reshape
    assert not transposed((6, 4), (24,)) and not transposed((4, 4), (4, 4)) and not transposed((1, 5), (5, 1))


def test_judge_with_reshape_refuses_a_transposed_pair_with_its_reason():
    src = entries(("fc.weight", (6, 4)), ("proj.weight", (8, 4)))
    tgt = entries(("fc.weight", (4, 6)), ("proj.weight", (8, 4, 1, 1)))
    pairs = [Pair("fc.weight", "fc.weight", "exact"), Pair("proj.weight", "proj.weight", "exact")]
    plan = judge(pairs, src, tgt, reshape=True)
    assert [(m.target, m.source_shape) for m in plan.matched] == [("proj.weight", (8, 4))]
    (refused,) = plan.mismatched
    assert refused.reason and "transpose rule is needed" in refused.reason
    assert refused.to_json()["reason"] == refused.reason and not plan.complete
    assert plan.steps == (f"fc.weight: source [6, 4] against target [4, 6]: {refused.reason}",)


# -- torch's own leniency (issue 11, item 3) -----------------------------------------
def _bn_plan(source_names, versions=None):
    tgt = entries(("bn.weight", (4,)), ("bn.running_mean", (4,)), ("bn.num_batches_tracked", (), "int64"),
                  ("other.num_batches_tracked", (), "int64"))  # fmt: skip
    src = entries(*((n, (4,)) for n in source_names))
    pairs = [Pair(n, "bn." + n.rpartition(".")[2], "order") for n in source_names]
    return fill_as_torch(judge(pairs, src, tgt), tgt, versions)


def test_fill_as_torch_fills_a_loaded_batchnorms_counter_without_version():
    plan = _bn_plan(["enc.weight", "enc.running_mean"])
    assert plan.filled == ("bn.num_batches_tracked",)
    assert plan.missing == ("other.num_batches_tracked",)  # a module the source does not hold at all
    assert plan.steps[-1] == "filled 1 num_batches_tracked as torch does (the target's own value)"
    assert _bn_plan(["enc.weight", "enc.running_mean"], {"enc": 1}).filled == ("bn.num_batches_tracked",)


def test_fill_as_torch_mirrors_torch_refusing_a_version_2_module_that_lost_its_counter():
    plan = _bn_plan(
        ["enc.weight", "enc.running_mean"], {"enc": 2, "bn": 1}
    )  # the source's module name counts
    assert plan.filled == () and "bn.num_batches_tracked" in plan.missing and not plan.complete


def test_fill_as_torch_fills_nothing_but_the_counter():
    tgt = entries(("bn.weight", (4,)), ("bn.running_var", (4,)), ("bn.num_batches_tracked", (4,), "int64"))
    plan = fill_as_torch(
        judge([Pair("bn.weight", "bn.weight", "exact")], entries(("bn.weight", (4,))), tgt), tgt
    )
    assert plan.filled == () and plan.missing == ("bn.running_var", "bn.num_batches_tracked")  # not a scalar


# -- judge --------------------------------------------------------------------
def test_judge_splits_matched_and_mismatched_and_lists_the_rest():
    src = entries(("fc.weight", (1000, 512)), ("fc.bias", (1000,)), ("conv.weight", (8, 3)), ("extra", (1,)))
    tgt = entries(("conv.weight", (8, 3)), ("fc.weight", (2, 512)), ("fc.bias", (2,)), ("new.weight", (4,)))
    pairs = [Pair(n, n, "exact") for n in ("conv.weight", "fc.weight", "fc.bias")]
    plan = judge(pairs, src, tgt, steps=["a step"])
    assert plan.matched == (Matched("conv.weight", "conv.weight", (8, 3), "exact"),)
    assert plan.mismatched == (
        Mismatched("fc.weight", "fc.weight", (1000, 512), (2, 512)),
        Mismatched("fc.bias", "fc.bias", (1000,), (2,)),
    )
    assert plan.missing == ("new.weight",)
    assert plan.unexpected == ("extra",)
    assert plan.tied == () and plan.steps == ("a step",)
    assert not plan.complete
    assert plan.mismatched[0].to_json() == {
        "source": "fc.weight",
        "target": "fc.weight",
        "source_shape": [1000, 512],
        "target_shape": [2, 512],
    }


def test_judge_complete_when_everything_matches():
    src = entries(("a", (2,)), ("b", ()))
    plan = judge([Pair("a", "a", "exact"), Pair("b", "b", "exact")], src, src)
    assert plan.complete and plan.missing == () and plan.unexpected == () and plan.mismatched == ()


def test_judge_equal_numel_loads_only_with_reshape():
    src = entries(("head.weight", (4, 8)))
    tgt = entries(("head.weight", (4, 8, 1, 1)))
    pairs = [Pair("head.weight", "head.weight", "exact")]
    plan = judge(pairs, src, tgt)
    assert plan.matched == () and plan.mismatched == (
        Mismatched("head.weight", "head.weight", (4, 8), (4, 8, 1, 1)),
    )
    plan = judge(pairs, src, tgt, reshape=True)
    (m,) = plan.matched
    assert m.shape == (4, 8, 1, 1) and m.source_shape == (4, 8)
    assert m.to_json() == {
        "source": "head.weight",
        "target": "head.weight",
        "shape": [4, 8, 1, 1],
        "how": "exact",
        "reshaped_from": [4, 8],
    }
    assert plan.complete


def test_judge_reshape_never_loads_a_different_size():
    src = entries(("w", (4, 8)))
    tgt = entries(("w", (4, 9)))
    plan = judge([Pair("w", "w", "exact")], src, tgt, reshape=True)
    assert plan.matched == () and len(plan.mismatched) == 1


def test_judge_records_a_dtype_cast():
    src = entries(("w", (2, 2), "float16"), ("n", (), "int64"))
    tgt = entries(("w", (2, 2), "float32"), ("n", (), "int64"))
    plan = judge([Pair("w", "w", "exact"), Pair("n", "n", "exact")], src, tgt)
    w, n = plan.matched
    assert w.cast == ("float16", "float32") and n.cast is None
    assert w.to_json()["cast"] == ["float16", "float32"] and "cast" not in n.to_json()
    assert plan.complete


def test_judge_tied_target_filled_through_either_name():
    ties = {"lm_head.weight": "embed.weight", "embed.weight": "lm_head.weight"}
    tgt = entries(("embed.weight", (32, 8)), ("block.weight", (8, 8)), ("lm_head.weight", (32, 8)))
    # the source names the embedding only
    src = entries(("embed.weight", (32, 8)), ("block.weight", (8, 8)))
    plan = judge([Pair(n, n, "exact") for n in ("embed.weight", "block.weight")], src, tgt, ties=ties)
    assert plan.tied == (("lm_head.weight", "embed.weight"),)
    assert plan.missing == () and plan.complete
    # the source names the head only
    src = entries(("lm_head.weight", (32, 8)), ("block.weight", (8, 8)))
    plan = judge([Pair(n, n, "exact") for n in ("lm_head.weight", "block.weight")], src, tgt, ties=ties)
    assert plan.tied == (("embed.weight", "lm_head.weight"),)
    assert plan.missing == () and plan.complete


def test_judge_a_tie_to_nothing_loaded_is_missing():
    ties = {"lm_head.weight": "embed.weight", "embed.weight": "lm_head.weight"}
    tgt = entries(("embed.weight", (32, 8)), ("lm_head.weight", (32, 8)))
    src = entries(("embed.weight", (31, 8)))  # paired but mismatched: fills nothing
    plan = judge([Pair("embed.weight", "embed.weight", "exact")], src, tgt, ties=ties)
    assert plan.tied == () and plan.missing == ("lm_head.weight",)
    assert [m.target for m in plan.mismatched] == ["embed.weight"]


def test_judge_both_tied_keys_present_are_both_matched():
    ties = {"lm_head.weight": "embed.weight", "embed.weight": "lm_head.weight"}
    tgt = entries(("embed.weight", (32, 8)), ("lm_head.weight", (32, 8)))
    plan = judge([Pair(e.name, e.name, "exact") for e in tgt], tgt, tgt, ties=ties, source_ties=ties)
    assert len(plan.matched) == 2 and plan.tied == () and plan.complete


def test_judge_tied_target_filled_from_two_different_source_tensors_keeps_the_first():
    ties = {"lm_head.weight": "embed.weight", "embed.weight": "lm_head.weight"}
    tgt = entries(("embed.weight", (32, 8)), ("lm_head.weight", (32, 8)))
    plan = judge([Pair(e.name, e.name, "exact") for e in tgt], tgt, tgt, ties=ties)
    assert [m.target for m in plan.matched] == ["embed.weight"]
    assert plan.tied == (("lm_head.weight", "embed.weight"),)
    assert plan.unexpected == ("lm_head.weight",) and not plan.complete


# -- auto_strip ---------------------------------------------------------------
def test_auto_strip_removes_module_prefix_when_it_makes_keys_match():
    renamed = same(["module.conv.weight", "module.fc.weight"])
    out, steps = auto_strip(renamed, ["conv.weight", "fc.weight"])
    assert out == {"module.conv.weight": "conv.weight", "module.fc.weight": "fc.weight"}
    assert len(steps) == 1
    assert steps[0].startswith("stripped prefix 'module.' (DataParallel / DistributedDataParallel)")
    assert "2 of 2 keys fit the target instead of 0" in steps[0]


def test_auto_strip_removes_module_then_orig_mod():
    renamed = same(["module._orig_mod.conv.weight", "module._orig_mod.fc.weight"])
    out, steps = auto_strip(renamed, ["conv.weight", "fc.weight"])
    assert set(out.values()) == {"conv.weight", "fc.weight"}
    assert [s.split(" (")[0] for s in steps] == ["stripped prefix 'module._orig_mod.'"]
    assert "(DataParallel / DistributedDataParallel, torch.compile)" in steps[0]


def test_auto_strip_lightning_model_prefix():
    renamed = same(["model.conv.weight", "model.fc.weight"])
    out, steps = auto_strip(renamed, ["conv.weight", "fc.weight"])
    assert set(out.values()) == {"conv.weight", "fc.weight"} and len(steps) == 1


def test_auto_strip_keeps_a_prefix_the_target_has_too():
    renamed = same(["module.conv.weight", "module.fc.weight"])
    out, steps = auto_strip(renamed, ["module.conv.weight", "module.fc.weight"])
    assert out == renamed and steps == []


def test_auto_strip_keeps_a_prefix_when_stripping_does_not_help():
    renamed = same(["module.conv.weight", "module.fc.weight"])
    out, steps = auto_strip(renamed, ["encoder.attn.weight", "encoder.mlp.weight"])
    assert out == renamed and steps == []


def test_auto_strip_counts_keys_that_become_dotted_suffixes_of_target_keys():
    # a DataParallel backbone checkpoint into a detector: stripping `module.` lets suffix matching work
    renamed = same(["module.conv.weight", "module.fc.weight"])
    out, steps = auto_strip(renamed, ["backbone.body.conv.weight", "head.weight"])
    assert out == {"module.conv.weight": "conv.weight", "module.fc.weight": "fc.weight"}
    assert "1 of 2 keys fit the target instead of 0" in steps[0]


def test_auto_strip_ignores_prefixes_that_are_not_wrappers_or_not_on_every_key():
    renamed = same(["encoder.conv.weight", "encoder.fc.weight"])
    assert auto_strip(renamed, ["conv.weight", "fc.weight"]) == (renamed, [])
    renamed = same(["module.conv.weight", "fc.weight"])
    assert auto_strip(renamed, ["conv.weight", "fc.weight"]) == (renamed, [])
    assert auto_strip({}, ["a"]) == ({}, [])


# -- the key pipeline in keys.py ----------------------------------------------
def test_rename_parse_with_groups():
    rule = Rename.parse(r"lin(\d)\.model\.1\.=heads.\1.")
    assert rule == Rename(r"lin(\d)\.model\.1\.", r"heads.\1.")
    names = same(["lin0.model.1.weight", "lin1.model.1.bias", "other.weight"])
    assert keys.rename(names, rule) == {
        "lin0.model.1.weight": "heads.0.weight",
        "lin1.model.1.bias": "heads.1.bias",
        "other.weight": "other.weight",
    }
    assert str(rule) == r"lin(\d)\.model\.1\.=heads.\1."


def test_rename_parse_escaped_equals_and_first_separator():
    rule = Rename.parse(r"a\=b=c")
    assert (rule.pattern, rule.replacement) == ("a=b", "c")
    rule = Rename.parse("x=y=z")  # split at the first unescaped `=`: REPL may hold `=`
    assert (rule.pattern, rule.replacement) == ("x", "y=z")
    rule = Rename.parse("^prefix\\.=")  # empty replacement deletes
    assert keys.rename(same(["prefix.w"]), rule) == {"prefix.w": "w"}


@pytest.mark.parametrize("text", ["no-separator", "(unclosed=x", "[a-=b"])
def test_rename_parse_refuses_bad_rules(text):
    with pytest.raises(ValueError, match="rename"):
        Rename.parse(text)


def test_renames_apply_in_order_to_current_names():
    names = same(["a.w"])
    names = keys.rename(names, Rename.parse(r"^a\.=b."))
    names = keys.rename(names, Rename.parse(r"^b\.=c."))
    assert names == {"a.w": "c.w"}


def test_strip_and_add_prefix_keep_original_names_as_keys():
    names = same(["encoder.conv.w", "encoder.fc.w", "head.w"])
    stripped = keys.strip_prefix(names, "encoder.")
    assert stripped == {"encoder.conv.w": "conv.w", "encoder.fc.w": "fc.w", "head.w": "head.w"}
    assert keys.add_prefix(stripped, "net.") == {
        "encoder.conv.w": "net.conv.w",
        "encoder.fc.w": "net.fc.w",
        "head.w": "net.head.w",
    }


def test_collisions_names_every_key_that_lands_on_one_name():
    assert keys.collisions({"a": "x", "b": "x", "c": "y", "d": "x"}) == {"x": ["a", "b", "d"]}
    assert keys.collisions({"a": "x", "b": "y"}) == {}


def test_select_include_and_exclude_globs_on_current_names():
    names = {
        "m.conv1.weight": "conv1.weight",
        "m.layer1.0.weight": "layer1.0.weight",
        "m.layer10.weight": "layer10.weight",
        "m.fc.weight": "fc.weight",
        "m.fc.bias": "fc.bias",
    }
    assert list(keys.select(names, [], [])) == list(names)
    assert list(keys.select(names, ["layer1"], [])) == ["m.layer1.0.weight"]  # module, not layer10
    assert list(keys.select(names, ["layer1*"], [])) == ["m.layer1.0.weight", "m.layer10.weight"]
    assert list(keys.select(names, [], ["fc"])) == ["m.conv1.weight", "m.layer1.0.weight", "m.layer10.weight"]
    assert list(keys.select(names, ["fc", "conv1"], ["*.bias"])) == ["m.conv1.weight", "m.fc.weight"]


def test_plan_port_refuses_a_rename_that_collides():
    from surgery.commands.port import PortOptions, plan_port
    from surgery.errors import UsageError
    from surgery.plans.keys import KeyRules

    src = entries(("a.weight", (2,)), ("b.weight", (2,)))
    options = PortOptions(KeyRules.parse(rename=[r"^[ab]\.=x."]), match="exact")
    with pytest.raises(UsageError) as info:
        plan_port(src, entries(("x.weight", (2,))), options)
    assert info.value.param == "rename"
    assert "'a.weight'" in info.value.message and "'b.weight'" in info.value.message
    assert "'x.weight'" in info.value.message


def test_a_collision_blames_the_rule_that_made_it():
    """Stripping two prefixes that leave one name is the strip's fault, not a rename's."""
    from surgery.errors import BadArgument
    from surgery.plans.keys import KeyRules

    with pytest.raises(BadArgument) as info:
        KeyRules.parse(strip_prefix=["a.", "b."]).apply(["a.x", "b.x"])
    assert info.value.param == "strip_prefix"


def test_plan_port_records_each_step_in_order():
    from surgery.commands.port import PortOptions, plan_port
    from surgery.plans.keys import KeyRules

    src = entries(("module.lin0.w", (2,)), ("module.lin1.w", (3,)), ("module.aux.w", (4,)))
    tgt = entries(("heads.0.w", (2,)), ("heads.1.w", (3,)))
    rules = KeyRules.parse(strip_prefix=["module."], rename=[r"lin(\d)\.=heads.\1."], exclude=["aux"])
    options = PortOptions(rules, match="exact")
    plan = plan_port(src, tgt, options)
    assert plan.steps == (
        "stripped prefix 'module.' from 3 keys",
        r"renamed 2 keys by lin(\d)\.=heads.\1.",
        "left out 1 keys by --include/--exclude",
        "--match exact: 2 by name",
    )
    assert [(m.source, m.target) for m in plan.matched] == [
        ("module.lin0.w", "heads.0.w"),
        ("module.lin1.w", "heads.1.w"),
    ]


# -- properties ---------------------------------------------------------------
_part = st.text(alphabet="abcxyz01", min_size=1, max_size=3)
_name = st.lists(_part, min_size=1, max_size=4).map(".".join)
_shape = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def _structure(draw, min_size=1, max_size=12):
    """A key list with shapes, and a random renaming of it (a bijection onto new names)."""
    names = draw(st.lists(_name, min_size=min_size, max_size=max_size, unique=True))
    shapes = draw(st.lists(_shape, min_size=len(names), max_size=len(names)))
    new_names = draw(st.lists(_name, min_size=len(names), max_size=len(names), unique=True))
    return names, shapes, new_names


@settings(max_examples=150, deadline=None)
@given(_structure())
def test_property_order_pairs_an_identical_structure_exactly_once(structure):
    names, shapes, new_names = structure
    src = [Entry(n, s, "float32") for n, s in zip(names, shapes, strict=True)]
    tgt = [Entry(n, s, "float32") for n, s in zip(new_names, shapes, strict=True)]
    by_position = list(zip(names, new_names, strict=True))
    if permuted_layers(by_position):  # numbered names that the renaming put in another order
        with pytest.raises(MatchError, match="permuting layers"):
            pair(src, same(names), tgt, "order")
        return
    pairs = pair(src, same(names), tgt, "order")
    assert [(p.source, p.target) for p in pairs] == by_position
    plan = judge(pairs, src, tgt)
    assert plan.complete and len(plan.matched) == len(names)
    # the same through a rename: the renamed dict carries the new names, the order is the source's
    renamed = dict(zip(names, new_names, strict=True))
    assert pair(src, renamed, tgt, "exact") == [
        Pair(s, t, "exact") for s, t in zip(names, new_names, strict=True)
    ]


@st.composite
def _two_sides(draw):
    pool = draw(st.lists(_name, min_size=1, max_size=14, unique=True))
    shape_of = {n: draw(_shape) for n in pool}
    src_names = draw(st.lists(st.sampled_from(pool), max_size=10, unique=True))
    tgt_names = draw(st.lists(st.sampled_from(pool), max_size=10, unique=True))
    src = [Entry(n, draw(st.sampled_from([shape_of[n], draw(_shape)])), "float32") for n in src_names]
    tgt = [Entry(n, shape_of[n], draw(st.sampled_from(["float32", "float16"]))) for n in tgt_names]
    # tie some target keys of equal shape to each other (both directions, as Target.ties says)
    ties: dict[str, str] = {}
    free = list(tgt)
    while len(free) >= 2 and draw(st.booleans()):
        a, b = free.pop(), free.pop()
        if a.shape == b.shape:
            ties[a.name], ties[b.name] = b.name, a.name
    mode = draw(st.sampled_from(["exact", "suffix", "order", "auto"]))
    return src, tgt, ties, mode, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(_two_sides())
def test_property_judge_places_every_key_once(case):
    src, tgt, ties, mode, reshape = case
    try:
        pairs = pair(src, same(e.name for e in src), tgt, mode)
    except MatchError:
        assert mode in ("suffix", "order")  # only the explicit modes refuse
        return
    plan = judge(pairs, src, tgt, reshape=reshape, ties=ties)
    # every target key in exactly one of matched / mismatched / missing / tied
    buckets = (
        [m.target for m in plan.matched]
        + [m.target for m in plan.mismatched]
        + list(plan.missing)
        + [t for t, _ in plan.tied]
    )
    assert sorted(buckets) == sorted(e.name for e in tgt)
    # every source key in at most one pair, and unexpected exactly when in none
    used = [m.source for m in plan.matched] + [m.source for m in plan.mismatched]
    assert len(used) == len(set(used))
    assert set(plan.unexpected) == {e.name for e in src} - set(used)
    # matched pairs agree in shape (or in size, with reshape); tied keys point at loaded ones
    shapes = {e.name: e.shape for e in src}
    for m in plan.matched:
        assert shapes[m.source] == m.shape or (reshape and m.source_shape == shapes[m.source])
    loaded = {m.target for m in plan.matched}
    assert all(via in loaded for _, via in plan.tied)
    assert plan.complete == (not plan.mismatched and not plan.missing and not plan.unexpected)
