"""The pure planning of adapter merges and extracts: names, shapes and configs in, plans out.

PEFT itself is the reference where it has a rule of its own (`get_pattern_key` for rank and
alpha patterns); the merges against PEFT's own `merge_and_unload` are in test_adapters.py.
"""

from __future__ import annotations

import math

import pytest

from surgery.errors import SurgeryError
from surgery.plans.adapters import AdapterTensors, LoraConfig, _alignment, plan_adapters
from surgery.plans.extract import extract_layout, is_embedding, lora_layout

P = "base_model.model."


def adapter(shapes: dict[str, tuple[int, ...]], **config) -> AdapterTensors:
    settings = {"r": 2, "alpha": 4.0} | config
    return AdapterTensors("lora", LoraConfig(**settings), {P + k: v for k, v in shapes.items()})


def linear(module: str, out: int, inp: int, r: int = 2) -> dict[str, tuple[int, ...]]:
    return {f"{module}.lora_A.weight": (r, inp), f"{module}.lora_B.weight": (out, r)}


BASE = {
    "fc.weight": (4, 8),
    "fc.bias": (4,),
    "norm.weight": (8,),
    "conv.weight": (6, 3, 3, 3),
    "emb.weight": (10, 8),
}


def test_each_layer_kind_gets_its_layout_and_scaling():
    shapes = {
        **linear("fc", 4, 8),
        "conv.lora_A.weight": (2, 3, 3, 3),
        "conv.lora_B.weight": (6, 2, 1, 1),
        "emb.lora_embedding_A": (2, 10),
        "emb.lora_embedding_B": (8, 2),
    }
    plan = plan_adapters([adapter(shapes)], BASE)
    layouts = {name: [d.layout for d in deltas] for name, deltas in plan.deltas.items()}
    assert layouts == {"fc.weight": ["linear"], "conv.weight": ["conv"], "emb.weight": ["embedding"]}
    assert {d.scaling for deltas in plan.deltas.values() for d in deltas} == {2.0}


def test_rslora_scales_by_the_square_root_of_the_rank():
    plan = plan_adapters([adapter(linear("fc", 4, 8, r=4), r=4, rslora=True)], BASE)
    assert plan.deltas["fc.weight"][0].scaling == pytest.approx(4.0 / math.sqrt(4))


def test_patterns_resolve_as_peft_resolves_them():
    peft_utils = pytest.importorskip("peft.utils.other")
    config = LoraConfig(r=8, alpha=16, rank_pattern={"h.1.attn": 4, "c_proj": 2}, alpha_pattern={"proj": 3})
    for module in (
        "transformer.h.1.attn",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.10.attn",
        "c_proj",
        "x.proj",
    ):
        rank_key = peft_utils.get_pattern_key(list(config.rank_pattern), module)
        alpha_key = peft_utils.get_pattern_key(list(config.alpha_pattern), module)
        rank = config.rank_pattern.get(rank_key, config.r)
        alpha = config.alpha_pattern.get(alpha_key, config.alpha)
        assert config.rank_and_scaling(module) == (rank, alpha / rank), module


def test_fan_in_fan_out_takes_conv1d_weights_transposed_and_leaves_a_linear_as_it_is():
    base = {"c_attn.weight": (8, 24), "lm_head.weight": (100, 8)}
    shapes = {**linear("c_attn", 24, 8), **linear("lm_head", 100, 8)}
    plan = plan_adapters([adapter(shapes, fan_in_fan_out=True)], base)
    assert plan.deltas["c_attn.weight"][0].layout == "fan_in_fan_out"
    assert plan.deltas["lm_head.weight"][0].layout == "linear"


def test_a_rank_other_than_the_configs_is_refused():
    with pytest.raises(SurgeryError, match="the config says rank 2"):
        plan_adapters([adapter(linear("fc", 4, 8, r=3))], BASE)


def test_factors_for_another_size_are_refused_naming_both_shapes():
    with pytest.raises(SurgeryError, match=r"make \[4, 16\] as linear, the base's fc.weight is \[4, 8\]"):
        plan_adapters([adapter(linear("fc", 4, 16))], BASE)


def test_tensors_that_land_on_nothing_are_all_listed():
    shapes = {**linear("fc", 4, 8), **linear("encoder.q", 4, 8), **linear("encoder.k", 4, 8)}
    with pytest.raises(SurgeryError) as caught:
        plan_adapters([adapter(shapes)], BASE)
    assert "2 tensors match nothing in the base" in caught.value.message
    assert "encoder.k.weight" in caught.value.message and "encoder.q.weight" in caught.value.message


def test_an_empty_adapter_is_refused():
    with pytest.raises(SurgeryError, match="changes nothing"):
        plan_adapters([adapter({})], BASE)


def test_dora_and_other_methods_are_refused():
    with pytest.raises(SurgeryError, match="DoRA"):
        plan_adapters([adapter({**linear("fc", 4, 8), "fc.lora_magnitude_vector": (4,)})], BASE)
    with pytest.raises(SurgeryError, match="DoRA"):
        LoraConfig.from_json({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}, "c.json")
    with pytest.raises(SurgeryError, match="'IA3'"):
        LoraConfig.from_json({"peft_type": "IA3"}, "c.json")


@pytest.mark.parametrize("field, value", [("r", 0), ("r", "8"), ("lora_alpha", None), ("rank_pattern", [1])])
def test_a_config_field_of_the_wrong_kind_is_refused(field, value):
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4} | {field: value}
    with pytest.raises(SurgeryError, match="not a valid LoRA config"):
        LoraConfig.from_json(doc, "c.json")


def test_whole_tensors_replace_the_base_and_cannot_be_unmerged():
    shapes = {**linear("fc", 4, 8), "norm.weight": (8,), "fc.base_layer.bias": (4,)}
    plan = plan_adapters([adapter(shapes)], BASE)
    assert sorted(plan.replaced) == ["fc.bias", "norm.weight"]
    with pytest.raises(SurgeryError, match="cannot be unmerged"):
        plan_adapters([adapter(shapes)], BASE, unmerge=True)


def test_two_adapters_replacing_one_tensor_are_refused():
    one = adapter({"norm.weight": (8,)})
    with pytest.raises(SurgeryError, match="replaced by two adapters"):
        plan_adapters([one, one], BASE)


@pytest.mark.parametrize(
    "targets, base, expected",
    [
        (["transformer.h.0.c.weight"], {"h.0.c.weight": 1, "h.1.c.weight": 1}, ("transformer.", "")),
        (["h.0.c.weight", "h.0.c.bias"], {"module.h.0.c.weight": 1, "module.h.0.c.bias": 1}, ("", "module.")),
        (["fc.weight"], {"a.fc.weight": 1, "b.fc.weight": 1}, ("", "")),  # two ways: a guess, not taken
        (["x.y.weight"], {"module.h.0.c.weight": 1}, ("", "")),  # only the leaf would meet: no
        (["fc.weight", "other.weight"], {"m.fc.weight": 1}, ("", "")),  # not every name meets
    ],
)
def test_prefix_alignment_is_one_unambiguous_change(targets, base, expected):
    assert _alignment(targets, base)[:2] == expected


def test_extract_layout_keeps_embeddings_norms_and_tied_tensors_whole():
    shapes = {
        "wte.weight": (100, 8),
        "lm_head.weight": (100, 8),
        "h.0.fc.weight": (8, 8),
        "h.0.fc.bias": (8,),
        "h.0.ln.weight": (8,),
        "h.0.ln.bias": (8,),
        "conv.weight": (4, 3, 3, 3),
    }
    changed = ["wte.weight", "lm_head.weight", "h.0.fc.weight", "h.0.fc.bias", "h.0.ln.weight", "conv.weight"]
    layout = extract_layout(changed, shapes, tied={"lm_head.weight", "wte.weight"})
    assert layout.lora == {"h.0.fc.weight": "linear", "conv.weight": "conv"}
    assert layout.biases == ["h.0.fc.bias"]
    assert layout.modules == ["wte", "lm_head", "h.0.ln"]
    assert "h.0.ln.bias" in layout.whole  # a module saved whole: all of its tensors


def test_extract_refuses_what_an_adapter_cannot_hold():
    with pytest.raises(SurgeryError, match="cls_token"):
        extract_layout(["cls_token"], {"cls_token": (1, 8)})
    with pytest.raises(SurgeryError, match="holds the LoRA layer block.fc"):
        extract_layout(["block.fc.weight", "block.scale"], {"block.fc.weight": (4, 4), "block.scale": (4,)})


@pytest.mark.parametrize(
    "module, embedding",
    [("transformer.wte", True), ("model.embed_tokens", True), ("fc", False), ("lm_head", False)],
)
def test_embeddings_by_name(module, embedding):
    assert is_embedding(module) is embedding
    assert (lora_layout(f"{module}.weight", (10, 8), False) is None) is embedding
