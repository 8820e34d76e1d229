"""Pure functions over names (surgery/names.py): prefixes, globs, grouping."""

from __future__ import annotations

from surgery.names import (
    build_tree,
    common_prefix,
    group_names,
    matches,
    natural_order,
    numbered,
    wrapper_prefixes,
)


def test_common_prefix_is_dotted_and_needs_two_names():
    assert common_prefix(["module.fc.weight", "module.conv1.weight"]) == "module."
    assert common_prefix(["module.fc.weight", "module.fc.bias"]) == "module.fc."
    assert common_prefix(["fc.weight"]) == ""
    assert common_prefix(["modulea.x", "moduleb.x"]) == ""
    assert common_prefix([]) == ""


def test_wrapper_prefixes_are_named_in_order():
    assert wrapper_prefixes("module._orig_mod.backbone.") == [
        ("module.", "DataParallel / DistributedDataParallel"),
        ("_orig_mod.", "torch.compile"),
    ]
    assert wrapper_prefixes("backbone.") == []


def test_glob_selects_names_and_whole_modules():
    assert matches("layer1.0.conv1.weight", ["layer1"])
    assert matches("layer1.0.conv1.weight", ["*.conv1.*"])
    assert not matches("layer10.0.weight", ["layer1"])
    assert matches("fc.bias", ["conv*", "fc.b*"])
    assert not matches("fc.bias", [])


def test_tree_groups_names_counts_and_merges_single_child_chains():
    root = build_tree(
        [("module.backbone.conv.weight", 10), ("module.backbone.conv.bias", 2), ("module.head.weight", 5)]
    )
    assert root.numel == 17 and root.count == 3
    (module,) = root.children.values()
    assert module.label == "module"
    assert [c.label for c in module.children.values()] == ["backbone.conv", "head"]
    conv = module.children["backbone"]
    assert conv.leaves == ["module.backbone.conv.weight", "module.backbone.conv.bias"] and conv.numel == 12


def test_group_names_writes_shared_parents_once():
    assert group_names(["layer4.1.conv1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"]) == [
        "fc.{bias,weight}",
        "layer4.1.conv1.weight",
        "layer4.1.conv2.weight",
    ]


def test_natural_order_compares_numbers_as_numbers():
    names = [f"blocks.{i}.weight" for i in sorted(range(12), key=str)] + ["block02.w", "block2.w", "1a", "a1"]
    assert natural_order(names) == (
        ["1a", "a1", "block02.w", "block2.w"] + [f"blocks.{i}.weight" for i in range(12)]
    )


def test_numbered_splits_a_name_into_its_pattern_and_numbers():
    assert numbered("blocks.10.fc2.weight") == ("blocks.#.fc#.weight", (10, 2))
    assert numbered("block02.w") == ("block#.w", (2,))
    assert numbered("head.weight") == ("head.weight", ())


def test_natural_order_reads_a_name_of_thousands_of_digits_without_failing():
    """`int` refuses 4300 digits and more; a file may name a key that way."""
    long = "block" + "9" * 5000 + ".w"
    assert natural_order([long, "block10.w", "block2.w"]) == ["block2.w", "block10.w", long]
    pattern, numbers = numbered(long)
    assert pattern.startswith("block#") and len(numbers) > 1
