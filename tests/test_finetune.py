"""The fine-tune plan (`surgery/finetune.py`) and `surgery port`'s refusals of bad edits and plans.

Which parameters train (freeze/unfreeze rules in order, with a warning for a rule that
matches nothing), frozen BatchNorm, optimizer groups by identity (first matching rule
wins, no decay for biases and norms, layer-wise decay), `set_lr` by group name, and on
the command line: one clean `error:` line, a non-zero exit and nothing written.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, assert_clean_error, run_cli
from torch import nn

import surgery
from surgery.commands.port_request import finetune_from_fields
from surgery.errors import SurgeryError, UsageError
from surgery.models.edit import SPEC_FORM
from surgery.models.finetune import (
    BASE_GROUP,
    FinetunePlan,
    LrRule,
    apply_freeze,
    layer_ids,
    layers_by_structure,
    param_groups,
    set_lr,
    summarize,
)

_spec = importlib.util.spec_from_file_location("_finetune_make_fixtures", FIXTURES / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)


def tiny(num_classes: int = 10) -> nn.Sequential:
    """conv1, bn1, relu, layer1 (conv, BN, ReLU), pool, flatten, fc."""
    torch.manual_seed(0)
    return mf.tiny_net(num_classes)


def plan(**kwargs) -> FinetunePlan:
    if "lr" in kwargs:
        kwargs["lr"] = tuple(LrRule.parse(r) for r in kwargs["lr"])
    if "freeze" in kwargs:
        kwargs["freeze"] = tuple(kwargs["freeze"])
    return FinetunePlan(**kwargs)


def named_groups(model: nn.Module, groups: list[dict]) -> dict[str, list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


NAMES = [  # tiny()'s parameters
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "layer1.0.weight",
    "layer1.1.weight",
    "layer1.1.bias",
    "fc.weight",
    "fc.bias",
]


def training(rules) -> tuple[list[str], list[str]]:
    """apply_freeze on a fresh tiny(): the names that train, in order, and the warnings."""
    model = tiny()
    warnings = apply_freeze(model, rules if isinstance(rules, FinetunePlan) else plan(freeze=rules))
    return [n for n, p in model.named_parameters() if p.requires_grad], warnings


# == which parameters train =============================================================
def test_without_rules_everything_trains():
    assert training([]) == (NAMES, [])


def test_freeze_then_unfreeze():
    assert training([("freeze", "*"), ("unfreeze", "fc.*")]) == (["fc.weight", "fc.bias"], [])


def test_freeze_rules_apply_in_the_order_given():
    assert training([("unfreeze", "fc.*"), ("freeze", "*")])[0] == []
    on, _ = training([("freeze", "*"), ("unfreeze", "fc"), ("freeze", "fc.bias")])
    assert on == ["fc.weight"]  # `fc` names the module


def test_freeze_module_globs_and_wildcards():
    on, _ = training([("freeze", "bn1"), ("freeze", "layer1")])
    assert on == ["conv1.weight", "fc.weight", "fc.bias"]
    on, _ = training([("freeze", "*.bias")])
    assert on == ["conv1.weight", "bn1.weight", "layer1.0.weight", "layer1.1.weight", "fc.weight"]
    on, _ = training([("freeze", "fc")])
    assert "fc.weight" not in on and "conv1.weight" in on  # not fc.* prefixes of other names


def test_freeze_warns_for_each_rule_matching_nothing():
    on, warnings = training(
        [("freeze", "nosuch*"), ("unfreeze", "fc.*"), ("unfreeze", "head.*"), ("freeze", "FC.*")]
    )
    assert warnings == [
        "--freeze 'nosuch*' matches no parameter",
        "--unfreeze 'head.*' matches no parameter",
        "--freeze 'FC.*' matches no parameter",  # case matters
    ]
    assert on == NAMES


def test_fields_put_every_freeze_before_every_unfreeze():
    fields = {"unfreeze": ["fc.*"], "freeze": ["*", "bn1.*"], "lr": ["head:fc.*=1e-2"], "base_lr": 1e-3}
    fp = finetune_from_fields(fields)
    assert fp.freeze == (("freeze", "*"), ("freeze", "bn1.*"), ("unfreeze", "fc.*"))
    assert fp.lr == (LrRule("head", "fc.*", 1e-2),)
    assert training(fp)[0] == ["fc.weight", "fc.bias"]
    # a recipe file's table form of lr rules
    fp = finetune_from_fields({"lr": {"head:fc.*": 1e-2, "layer4.*": 5e-3}})
    assert fp.lr == (LrRule("head", "fc.*", 1e-2), LrRule("layer4.*", "layer4.*", 5e-3))


# == apply_freeze =======================================================================
def test_apply_freeze_resets_what_an_earlier_plan_froze():
    model = tiny()
    apply_freeze(model, plan(freeze=[("freeze", "*")]))
    assert apply_freeze(model, plan(freeze=[("freeze", "conv1")])) == []
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["conv1.weight"]


def test_freeze_bn_keeps_batchnorm_in_eval_even_under_train():
    model = tiny()
    apply_freeze(model, plan(freeze_bn=True))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2
    model.train()
    assert model.training and model.conv1.training and model.fc.training
    assert not any(bn.training for bn in bns)
    model.eval()
    model.train(True)
    bns[0].train()
    assert not any(bn.training for bn in bns)
    # their parameters freeze, the rest still trains
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "bn1.weight",
        "bn1.bias",
        "layer1.1.weight",
        "layer1.1.bias",
    ]
    # statistics do not move in a training forward pass
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model(torch.randn(4, 3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_freeze_bn_wins_over_unfreeze():
    model = tiny()
    apply_freeze(model, plan(freeze=[("unfreeze", "*")], freeze_bn=True))
    assert not model.bn1.weight.requires_grad and model.conv1.weight.requires_grad


def test_without_freeze_bn_statistics_move_in_train_mode():
    model = tiny()
    apply_freeze(model, plan(freeze=[("freeze", "*")]))
    model.train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 8, 8))
    assert model.bn1.training and not torch.equal(model.bn1.running_mean, before)


def test_frozen_bn_model_can_still_be_copied():
    import copy

    model = tiny()
    apply_freeze(model, plan(freeze_bn=True))
    twin = copy.deepcopy(model)
    twin.train()
    assert not twin.bn1.training and twin.conv1.training
    model.train()
    assert not model.bn1.training


def test_frozen_bn_model_survives_torch_save_and_load():
    """A whole model saved with torch.save (or sent to another process) loads back, frozen BN included."""
    import io

    model = tiny()
    apply_freeze(model, plan(freeze_bn=True))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    again.train()
    assert not again.bn1.training and again.conv1.training


# == param_groups =======================================================================
def test_param_groups_first_matching_rule_wins():
    model = tiny()
    groups, warnings = param_groups(model, plan(lr=["head:fc.*=1e-2", "all:*=1e-3"]))
    assert warnings == []
    names = named_groups(model, groups)
    assert list(names) == ["all", "head"]
    assert names["head"] == ["fc.weight", "fc.bias"]
    assert {g["name"]: g["lr"] for g in groups} == {"all": 1e-3, "head": 1e-2}
    groups, _ = param_groups(model, plan(lr=["all:*=1e-3", "head:fc.*=1e-2"]))
    assert [g["name"] for g in groups] == ["all"]  # the first rule took everything


def test_param_groups_hold_the_parameters_themselves():
    model = tiny()
    groups, _ = param_groups(model, plan(lr=["head:fc.*=1e-2"], base_lr=1e-3))
    head = next(g for g in groups if g["name"] == "head")
    assert head["params"][0] is model.fc.weight and head["params"][1] is model.fc.bias
    assert all(isinstance(p, nn.Parameter) for g in groups for p in g["params"])
    base = next(g for g in groups if g["name"] == BASE_GROUP)
    assert base["lr"] == 1e-3 and len(base["params"]) == len(list(model.parameters())) - 2


def test_param_groups_are_by_identity_not_by_value():
    """Two parameters with equal values stay two objects in their groups."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight)
        model[1].bias.copy_(model[0].bias)
    groups, _ = param_groups(model, plan(lr=["first:0.*=1e-2"]))
    names = named_groups(model, groups)
    assert names == {"first": ["0.weight", "0.bias"], "base": ["1.weight", "1.bias"]}
    first, base = groups
    assert first["params"][0] is model[0].weight and base["params"][0] is model[1].weight
    assert len({id(p) for g in groups for p in g["params"]}) == 4
    torch.optim.SGD(groups, lr=0.1)


def test_tied_parameters_appear_once():
    torch.manual_seed(0)
    model = mf.TinyLM()
    assert model.lm_head.weight is model.embed.weight
    groups, _ = param_groups(model, plan(lr=["fast:embed.*=1e-2"], base_lr=1e-3, weight_decay=0.1))
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == 3  # embed (= lm_head), block.weight, block.bias
    assert sum(p is model.embed.weight for p in every) == 1
    torch.optim.AdamW(groups)  # torch refuses a parameter in two groups


def test_a_tied_weight_is_reached_through_either_of_its_names():
    """`lm_head.weight` is a parameter name of the model (and a key of its state_dict) even
    though it shares its tensor with `embed.weight`: rules naming it must reach it."""
    torch.manual_seed(0)
    model = mf.TinyLM()
    warnings = apply_freeze(model, plan(freeze=[("freeze", "lm_head.*")]))
    assert warnings == []
    assert not model.lm_head.weight.requires_grad
    model = mf.TinyLM()
    groups, warnings = param_groups(model, plan(lr=["head:lm_head.*=1e-2"]))
    assert warnings == []
    head = next(g for g in groups if g["name"] == "head")
    assert len(head["params"]) == 1 and head["params"][0] is model.lm_head.weight


def test_param_groups_no_decay_for_biases_and_norms():
    model = tiny()
    groups, _ = param_groups(model, plan(lr=["head:fc.*=1e-2"], base_lr=1e-3, weight_decay=5e-4))
    names = named_groups(model, groups)
    assert names == {
        "base": ["conv1.weight", "layer1.0.weight"],
        "base/no_decay": ["bn1.weight", "bn1.bias", "layer1.1.weight", "layer1.1.bias"],
        "head": ["fc.weight"],
        "head/no_decay": ["fc.bias"],
    }
    wd = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert wd == {
        "base": (1e-3, 5e-4),
        "base/no_decay": (1e-3, 0.0),
        "head": (1e-2, 5e-4),
        "head/no_decay": (1e-2, 0.0),
    }
    for g in groups:
        assert all((p.ndim <= 1) == g["name"].endswith("/no_decay") for p in g["params"])


def test_param_groups_without_rates_leave_lr_to_the_optimizer():
    model = tiny()
    groups, _ = param_groups(model, plan())
    assert len(groups) == 1 and groups[0]["name"] == BASE_GROUP
    assert "lr" not in groups[0] and "weight_decay" not in groups[0]
    optimizer = torch.optim.SGD(groups, lr=0.05)
    assert optimizer.param_groups[0]["lr"] == 0.05


def test_param_groups_skip_frozen_parameters():
    model = tiny()
    apply_freeze(model, plan(freeze=[("freeze", "conv1"), ("freeze", "layer1")]))
    groups, _ = param_groups(model, plan(lr=["head:fc.*=1e-2"]))
    every = {id(p) for g in groups for p in g["params"]}
    assert every == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.conv1.weight) not in every


def lrs_by_name(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    return {n: g["lr"] for g in groups for n in named_groups(model, [g])[g["name"]]}


def test_layer_decay_scales_from_the_head_down():
    model = tiny()  # conv1, bn1 (the stem), layer1 = Sequential(conv 0, BN 1, ReLU), fc
    groups, warnings = param_groups(model, plan(base_lr=1.0, layer_decay=0.5))
    assert warnings == []
    assert lrs_by_name(model, groups) == {
        "conv1.weight": 0.125,  # before the first block: layer 0
        "bn1.weight": 0.125,
        "bn1.bias": 0.125,
        "layer1.0.weight": 0.25,  # the repeated blocks layer1.0, layer1.1: layers 1 and 2
        "layer1.1.weight": 0.5,
        "layer1.1.bias": 0.5,
        "fc.weight": 1.0,  # after the last block: the head at the full rate
        "fc.bias": 1.0,
    }
    assert [g["name"] for g in groups] == ["base/layer0", "base/layer1", "base/layer2", "base/layer3"]


def test_layer_decay_with_rules_and_weight_decay_names_every_part():
    model = tiny()
    groups, _ = param_groups(
        model, plan(lr=["head:fc.*=1e-2"], base_lr=1e-3, weight_decay=1e-4, layer_decay=0.9)
    )
    assert [g["name"] for g in groups] == [
        "base/layer0",
        "base/layer0/no_decay",
        "base/layer1",
        "base/layer2/no_decay",
        "head/layer3",
        "head/layer3/no_decay",
    ]
    head = {g["name"]: g["lr"] for g in groups}
    assert head["head/layer3"] == 1e-2
    assert head["base/layer0"] == pytest.approx(1e-3 * 0.9**3)


def per_parameter(model: nn.Module, groups: list[dict], lr: str = "lr") -> dict[str, tuple[float, float]]:
    """name -> (rate or scale, weight decay), from surgery's groups or timm's."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: (g[lr], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_on_a_timm_vit_is_timms_own():
    """timm's group_matcher decides: cls_token and pos_embed at the bottom, each block its own layer."""
    import timm
    from timm.optim import param_groups_layer_decay

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    groups, warnings = param_groups(model, plan(base_lr=1.0, weight_decay=0.05, layer_decay=0.75))
    ours = per_parameter(model, groups)
    theirs = per_parameter(
        model, param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75), lr="lr_scale"
    )
    assert ours == theirs and len(ours) == len(list(model.parameters()))
    assert warnings == []
    rates = {name: lr for name, (lr, _) in ours.items()}
    assert len({rates[f"blocks.{i}.attn.qkv.weight"] for i in range(12)}) == 12
    assert rates["cls_token"] == rates["pos_embed"] == rates["patch_embed.proj.weight"] == 0.75**13
    assert rates["head.weight"] == 1.0


def test_layer_decay_on_torchvision_resnet18_numbers_its_blocks():
    """No group_matcher: layer1.0 ... layer4.1 are the blocks, as timm numbers its own resnet18."""
    import timm
    import torchvision
    from timm.optim import param_groups_layer_decay

    model = torchvision.models.resnet18(weights=None)
    groups, warnings = param_groups(model, plan(base_lr=1.0, weight_decay=1e-4, layer_decay=0.5))
    assert warnings == []
    rates = lrs_by_name(model, groups)
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    per_block = [{lr for n, lr in rates.items() if n.startswith(f"{b}.")} for b in blocks]
    assert all(len(r) == 1 for r in per_block)
    ladder = [r.pop() for r in per_block]
    assert ladder == sorted(ladder) and len(set(ladder)) == 8  # each block its own rate, rising
    assert (
        rates["conv1.weight"] == rates["bn1.weight"] == rates["bn1.bias"] == min(rates.values()) < ladder[0]
    )
    assert rates["fc.weight"] == rates["fc.bias"] == 1.0 > ladder[-1]
    # timm's resnet18 has the same parameter names and a group_matcher: the same scales
    theirs = timm.create_model("resnet18", pretrained=False)
    expected = per_parameter(
        theirs, param_groups_layer_decay(theirs, weight_decay=1e-4, layer_decay=0.5), "lr_scale"
    )
    assert per_parameter(model, groups) == expected


def test_layer_decay_that_changes_nothing_warns():
    class Net(nn.Module):  # no repeated blocks: one layer
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.norm = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

    model = Net()
    groups, warnings = param_groups(model, plan(base_lr=1e-3, layer_decay=0.5))
    assert warnings == [
        "--layer-decay 0.5 changes nothing: Net is one layer "
        "(no timm group_matcher, no repeated blocks such as blocks.0, blocks.1 or layer1, layer2)"
    ]
    assert [(g["name"], g["lr"]) for g in groups] == [("base/layer0", 1e-3)]
    model = tiny()
    apply_freeze(model, plan(freeze=[("freeze", "*"), ("unfreeze", "fc")]))
    _, warnings = param_groups(model, plan(base_lr=1e-3, layer_decay=0.5))
    assert warnings == ["--layer-decay 0.5 changes nothing: every trainable parameter is in one layer"]
    _, warnings = param_groups(tiny(), plan(base_lr=1e-3, layer_decay=1.0))
    assert warnings == ["--layer-decay 1 changes nothing: a factor of 1 keeps every rate"]


def test_layer_decay_without_a_base_rate_warns_that_the_optimizer_rate_is_unscaled():
    model = tiny()
    groups, warnings = param_groups(model, plan(lr=["head:fc.*=1e-2"], layer_decay=0.5))
    assert warnings == [
        "--layer-decay 0.5 without --base-lr: the base groups take the optimizer's own lr, unscaled "
        "(torch optimizers ignore lr_scale; surgery.set_lr applies it)"
    ]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    assert {g["lr"] for g in optimizer.param_groups if g["name"].startswith("base/")} == {0.1}
    set_lr(optimizer, "base", 0.1)
    assert lrs(optimizer)["base/layer0"] == pytest.approx(0.1 * 0.5**3)


@pytest.mark.parametrize(
    "names, layers",
    [
        (  # torchvision's VisionTransformer: the embeddings below, encoder.ln with the head
            [
                "class_token",
                "conv_proj.weight",
                "encoder.pos_embedding",
                "encoder.layers.encoder_layer_0.ln_1.weight",
                "encoder.layers.encoder_layer_0.mlp.0.weight",
                "encoder.layers.encoder_layer_0.mlp.3.weight",
                "encoder.layers.encoder_layer_1.ln_1.weight",
                "encoder.layers.encoder_layer_1.mlp.0.weight",
                "encoder.ln.weight",
                "heads.head.weight",
            ],
            [0, 0, 0, 1, 1, 1, 2, 2, 3, 3],
        ),
        (  # VGG: features.N are the blocks (more than classifier.N), each conv and BN its own
            [
                "features.0.weight",
                "features.1.weight",
                "features.4.weight",
                "classifier.0.weight",
                "classifier.3.weight",
            ],
            [1, 2, 3, 4, 4],
        ),
        (  # a Sequential of conv and BN inside a block is one block, not two
            [
                "features.0.0.weight",
                "features.0.1.weight",
                "features.1.0.block.0.weight",
                "features.1.1.block.0.weight",
                "head.weight",
            ],
            [1, 1, 2, 3, 4],
        ),
        (  # DenseNet: a transition between blocks goes with the block before it
            [
                "features.conv0.weight",
                "features.denseblock1.denselayer1.conv1.weight",
                "features.denseblock1.denselayer2.conv1.weight",
                "features.transition1.conv.weight",
                "features.denseblock2.denselayer1.conv1.weight",
                "features.denseblock2.denselayer2.conv1.weight",
                "features.norm5.weight",
                "classifier.weight",
            ],
            [0, 1, 2, 2, 3, 4, 5, 5],
        ),
        (  # the run that holds the most parameters, not the first: two heads, twelve blocks
            [
                "stem.0.weight",
                "stem.1.weight",
                *(f"blocks.{i}.fc.weight" for i in range(12)),
                "heads.0.weight",
                "heads.1.weight",
            ],
            [0, 0, *range(1, 13), 13, 13],
        ),
        (["fc1.weight", "fc1.bias", "fc2.weight"], [1, 1, 2]),
        (["weight", "bias", "conv.weight"], [0, 0, 0]),
    ],
    ids=["torchvision-vit", "vgg", "conv-bn-stem", "densenet", "most-parameters", "mlp", "one-layer"],
)
def test_layers_by_structure(names, layers):
    assert layers_by_structure(names) == dict(zip(names, layers, strict=True))


def test_layers_by_structure_of_a_real_torchvision_vit():
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=2
    )
    layers = layer_ids(model)
    assert {n for n, i in layers.items() if i == 0} == {
        "class_token",
        "conv_proj.weight",
        "conv_proj.bias",
        "encoder.pos_embedding",
    }
    for i in range(3):
        assert {layers[n] for n in layers if f"encoder_layer_{i}." in n} == {i + 1}
    assert {n for n, i in layers.items() if i == 4} == {
        "encoder.ln.weight",
        "encoder.ln.bias",
        "heads.head.weight",
        "heads.head.bias",
    }


def test_lr_rule_reaching_only_frozen_parameters_is_a_usage_error():
    model = tiny()
    fp = plan(freeze=[("freeze", "*")], lr=["head:fc.*=1e-2"])
    apply_freeze(model, fp)
    with pytest.raises(UsageError) as info:
        param_groups(model, fp)
    err = info.value
    assert err.param == "lr" and "reaches only frozen parameters" in err.message
    assert "head:fc.*=0.01" in err.message and "fc.weight" in err.message
    assert err.exit_code == 2


def test_lr_rule_reaching_some_frozen_parameters_takes_the_trainable_ones():
    model = tiny()
    fp = plan(freeze=[("freeze", "fc.bias")], lr=["head:fc.*=1e-2"])
    apply_freeze(model, fp)
    groups, warnings = param_groups(model, fp)
    assert warnings == [] and named_groups(model, groups)["head"] == ["fc.weight"]


def test_lr_rule_matching_nothing_is_a_warning():
    model = tiny()
    groups, warnings = param_groups(model, plan(lr=["head:head.*=1e-2", "fc.*=1e-3"]))
    assert warnings == ["--lr head:head.*=0.01 matches no parameter"]
    assert [g["name"] for g in groups] == ["base", "fc.*"]


def test_summarize_counts_per_module_and_group():
    model = tiny()
    fp = plan(freeze=[("freeze", "*"), ("unfreeze", "fc")], freeze_bn=True, lr=["head:fc.*=1e-2"])
    warnings = apply_freeze(model, fp)
    groups, more = param_groups(model, fp)
    summary = summarize(model, groups, warnings + more, fp)
    modules = {m: (t, f) for m, t, f in summary.modules}
    assert modules == {"conv1": (0, 216), "bn1": (0, 16), "layer1": (0, 1184), "fc": (170, 0)}
    assert summary.frozen_bn == 2
    (group,) = summary.groups
    assert (group.name, group.lr, group.tensors, group.params) == ("head", 1e-2, 2, 170)
    assert json.loads(json.dumps(summary.to_json()))["groups"][0]["name"] == "head"


# == lazy modules ======================================================================
LAZY_NET = '''
"""A net whose head is an nn.LazyLinear: its weight has no shape until the first forward pass."""
from collections import OrderedDict

from torch import nn


def build(num_classes=2):
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), flatten=nn.Flatten(), fc=nn.LazyLinear(num_classes)))
'''
LAZY_FIX = "run one forward pass first to initialise the lazy modules"


@pytest.fixture
def lazy_source(tmp_path, monkeypatch):
    """cwd = a folder holding the factory `lazynet:build`; and a checkpoint of that net after a
    forward pass, written by torch.save."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "lazynet.py").write_text(LAZY_NET)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    import lazynet

    torch.manual_seed(0)
    trained = lazynet.build()
    trained(torch.zeros(1, 3, 6, 6))
    path = tmp_path / "lazynet.pt"
    torch.save(trained.state_dict(), path)
    yield path, trained, lazynet.build
    sys.modules.pop("lazynet", None)


def test_port_into_a_lazy_module_names_the_parameters_and_the_fix(lazy_source):
    path, trained, build = lazy_source
    model = build()
    with pytest.raises(SurgeryError) as info:
        surgery.port(path, into=model)
    assert (
        str(info.value) == f"Sequential: fc.weight, fc.bias are not initialised yet (LazyLinear): {LAZY_FIX}"
    )
    assert info.value.exit_code == 1
    model(torch.zeros(1, 3, 6, 6))  # the fix
    report = surgery.port(path, into=model, strict=True)
    assert report.plan.complete and torch.equal(model.fc.weight, trained.fc.weight)


def test_fine_tune_plan_of_a_lazy_module_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    for call in (apply_freeze, param_groups):
        with pytest.raises(SurgeryError) as info:
            call(model, plan(freeze=[("freeze", "0")], base_lr=1e-3, weight_decay=1e-4))
        assert (
            str(info.value)
            == f"Sequential: 1.weight, 1.bias are not initialised yet (LazyLinear): {LAZY_FIX}"
        )


def test_cli_port_to_a_lazy_factory_target(lazy_source, tmp_path):
    path, _, _ = lazy_source
    out = tmp_path / "out.safetensors"
    for extra in ([], ["--freeze", "conv", "--layer-decay", "0.5"]):
        run = run_cli("port", path, "--to", "lazynet:build", *extra, "-o", out)
        line = assert_clean_error(run, "lazynet:build", contains=LAZY_FIX, code=1)
        assert "fc.weight, fc.bias are not initialised yet (LazyLinear)" in line
        assert "hint: e.g. model(torch.zeros(1, 3, 224, 224))" in run.stderr
        assert not out.exists()


# == set_lr =============================================================================
@pytest.fixture
def optimizer():
    model = tiny()
    groups, _ = param_groups(model, plan(lr=["head:fc.*=1e-2"], base_lr=1e-3, weight_decay=1e-4))
    opt = torch.optim.SGD(groups, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return opt


def lrs(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


def test_set_lr_by_name_changes_the_group_and_its_no_decay_part(optimizer):
    assert surgery.set_lr is set_lr
    assert set_lr(optimizer, "head", 1e-4) == 2
    assert lrs(optimizer) == {"base": 1e-3, "base/no_decay": 1e-3, "head": 1e-4, "head/no_decay": 1e-4}


def test_set_lr_one_part_only(optimizer):
    assert set_lr(optimizer, "base/no_decay", 0.0) == 1
    assert lrs(optimizer) == {"base": 1e-3, "base/no_decay": 0.0, "head": 1e-2, "head/no_decay": 1e-2}


def test_set_lr_keeps_the_optimizer_state(optimizer):
    import copy

    before = copy.deepcopy(optimizer.state_dict())
    set_lr(optimizer, "base", 5e-4)
    after = optimizer.state_dict()
    for k, s in before["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], s["momentum_buffer"])
    for old, new in zip(before["param_groups"], after["param_groups"], strict=True):
        assert new == (dict(old, lr=5e-4) if old["name"].startswith("base") else old)


def test_set_lr_layer_parts():
    model = tiny()
    groups, _ = param_groups(model, plan(lr=["head:fc.*=1e-2"], base_lr=1e-3, layer_decay=0.5))
    opt = torch.optim.SGD(groups)
    n_base = sum(g["name"].startswith("base/") for g in opt.param_groups)
    assert n_base >= 3
    assert set_lr(opt, "base", 1e-5) == n_base
    # each layer keeps its decay: the new rate is scaled as the old one was
    assert all(
        g["lr"] == pytest.approx(1e-5 * g["lr_scale"])
        for g in opt.param_groups
        if g["name"].startswith("base/")
    )
    assert lrs(opt)["head/layer3"] == 1e-2
    assert set_lr(opt, "base/layer0", 1e-6) == 1


def test_set_lr_does_not_touch_groups_whose_name_only_starts_alike():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups, _ = param_groups(model, plan(lr=["head:1.*=1e-2", "head2:0.*=1e-3"]))
    opt = torch.optim.SGD(groups)
    assert set_lr(opt, "head", 0.5) == 1
    assert lrs(opt) == {"head2": 1e-3, "head": 0.5}
    groups, _ = param_groups(model, plan(lr=["1.*=1e-2"]))  # unnamed: the glob is the name
    opt = torch.optim.SGD(groups, lr=0.1)
    assert set_lr(opt, "1.*", 0.2) == 1
    with pytest.raises(KeyError):
        set_lr(opt, "1", 0.2)


def test_set_lr_unknown_name_is_a_key_error_naming_the_groups(optimizer):
    with pytest.raises(KeyError) as info:
        set_lr(optimizer, "backbone", 1e-4)
    message = info.value.args[0]
    assert (
        message == "no parameter group named 'backbone'; there are base, base/no_decay, head, head/no_decay"
    )
    assert lrs(optimizer)["head"] == 1e-2


# == LrRule.parse =======================================================================
@pytest.mark.parametrize(
    "text, rule, shown",
    [
        ("head:fc.*=1e-2", LrRule("head", "fc.*", 1e-2), "head:fc.*=0.01"),
        ("fc.*=0.1", LrRule("fc.*", "fc.*", 0.1), "fc.*=0.1"),
        ("classifier.0=1e-2", LrRule("classifier.0", "classifier.0", 1e-2), "classifier.0=0.01"),
        ("layer4.*=0", LrRule("layer4.*", "layer4.*", 0.0), "layer4.*=0"),
        (
            "fast:classifier.[03].*=3e-4",
            LrRule("fast", "classifier.[03].*", 3e-4),
            "fast:classifier.[03].*=0.0003",
        ),
        ("head:fc.*= 1e-2", LrRule("head", "fc.*", 1e-2), "head:fc.*=0.01"),
    ],
)
def test_lr_rule_parse_forms(text, rule, shown):
    parsed = LrRule.parse(text)
    assert parsed == rule
    assert str(parsed) == shown
    assert LrRule.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text", ["fc.*", "=1e-2", "fc.*=", "fc.*=abc", "fc.*=-1e-3", "head:fc.*=-1", "", "=", "fc.*=nan"]
)
def test_lr_rule_parse_errors(text):
    with pytest.raises(UsageError) as info:
        LrRule.parse(text)
    err = info.value
    assert err.param == "lr" and "[NAME:]GLOB=VALUE" in err.message
    assert repr(text) in err.message


def test_finetune_plan_json_round_trip():
    fp = plan(
        freeze=[("freeze", "*"), ("unfreeze", "fc.*")],
        freeze_bn=True,
        lr=["head:fc.*=1e-2", "layer4.*=1e-3"],
        base_lr=1e-4,
        weight_decay=0.05,
        layer_decay=0.75,
    )
    assert FinetunePlan.from_json(json.loads(json.dumps(fp.to_json()))) == fp
    assert not fp.empty and FinetunePlan().empty


# == the command line: refusals and warnings ===========================================
SRC = FIXTURES / "imagenet_example.pth.tar"
TINY = "fixtures.make_fixtures:tiny_net?num_classes=2"


@pytest.fixture
def at_root(monkeypatch):
    """cwd = the repository, where `fixtures.make_fixtures:tiny_net` imports from."""
    monkeypatch.chdir(ROOT)
    return ROOT


def refused(tmp_path, *args, where: object, contains: str = "", code: int = 2) -> tuple[object, str]:
    """`surgery port SRC --to TINY ARGS -o OUT`: one clean error line, exit `code`, nothing written."""
    out = tmp_path / "out.safetensors"
    run = run_cli("port", SRC, "--to", TINY, *args, "--strict", "false", "-o", out)
    line = assert_clean_error(run, where, contains=contains, code=code)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either
    return run, line


def test_cli_delete_a_path_that_does_not_exist(at_root, tmp_path):
    run, _ = refused(tmp_path, "--delete", "nosuch", where="nosuch", contains="no such module")
    hints = [line for line in run.stderr.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1 and hints[0].startswith("hint: modules nearby: ")
    assert "fc" in hints[0] and "layer1" in hints[0]
    run, _ = refused(tmp_path, "--delete", "layer1.5", where="layer1.5", contains="no such module")
    assert "layer1.0" in run.stderr or "layer1.2" in run.stderr


def test_cli_replace_with_a_call_outside_torch_nn_runs_nothing(at_root, tmp_path, monkeypatch):
    marker = tmp_path.parent / f"{tmp_path.name}-MARKER"
    spec = f"__import__('os').system('touch {marker}')"
    refused(tmp_path, "--replace", f"fc={spec}", where=spec, contains=SPEC_FORM)
    spec = f"Linear(open('{marker}', 'w'), 2)"
    refused(tmp_path, "--add", f"fc2={spec}", where=spec, contains="'open' is not a torch.nn module class")
    spec = "os.system('x')"
    refused(tmp_path, "--replace", f"fc={spec}", where=spec, contains="not a module spec")
    assert not marker.exists()


def test_cli_star_without_a_width(at_root, tmp_path):
    refused(
        tmp_path, "--replace", "relu=Linear(*, 3)", where="Linear(*, 3)", contains="`*` needs the input width"
    )


def test_cli_class_refusing_its_arguments(at_root, tmp_path):
    refused(tmp_path, "--replace", "fc=Linear(16)", where="Linear(16)", contains="cannot be built")


def test_cli_unknown_init(at_root, tmp_path):
    refused(
        tmp_path, "--num-classes", "3", "--init", "he", where="--init", contains="'he' is not one of default"
    )


def test_cli_malformed_edit_and_lr_flags(at_root, tmp_path):
    refused(tmp_path, "--replace", "fc", where="--replace", contains="is not PATH=SPEC")
    refused(tmp_path, "--lr", "fc.*", where="--lr", contains="[NAME:]GLOB=VALUE")
    refused(tmp_path, "--rename-module", "fc=1bad", where="1bad", contains="not a valid module name")
    refused(tmp_path, "--add", "fc=ReLU()", where="fc", contains="exists already")


def test_cli_lr_for_only_frozen_parameters(at_root, tmp_path):
    refused(
        tmp_path,
        "--freeze",
        "*",
        "--lr",
        "head:fc.*=1e-2",
        where="--lr",
        contains="reaches only frozen parameters",
    )


@pytest.mark.parametrize(
    "flag, value", [("--base-lr", "-1e-3"), ("--weight-decay", "-1e-4"), ("--layer-decay", "-0.5")]
)
def test_cli_negative_rates_are_refused(at_root, tmp_path, flag, value):
    """As `--lr` refuses a negative VALUE, so do the other rates of the plan."""
    refused(tmp_path, flag, value, where=flag)


def test_cli_freeze_pattern_matching_nothing_warns(at_root, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli(
        "port",
        SRC,
        "--to",
        TINY,
        "--freeze",
        "layer9.*",
        "--lr",
        "head:head.*=1e-2",
        "--strict",
        "false",
        "-o",
        out,
    )
    assert run.exit_code == 0, run.stderr
    assert out.exists()
    lines = run.stderr.splitlines()
    assert lines == [
        "warning: --freeze 'layer9.*' matches no parameter",
        "warning: --lr head:head.*=0.01 matches no parameter",
    ]
    assert "error" not in run.stderr
    ready = surgery.load_ready(out, trust=True)  # the recipe names a factory: TINY
    assert ready.summary.warnings == (
        "--freeze 'layer9.*' matches no parameter",
        "--lr head:head.*=0.01 matches no parameter",
    )


def test_cli_warnings_in_json_mode_stay_off_stdout(at_root, tmp_path):
    run = run_cli("port", SRC, "--to", TINY, "--freeze", "nosuch", "--strict", "false", "--dry-run", "--json")
    assert run.exit_code == 0
    doc = json.loads(run.stdout)
    assert doc["finetune"]["warnings"] == ["--freeze 'nosuch' matches no parameter"]
    assert run.stderr.splitlines() == ["warning: --freeze 'nosuch' matches no parameter"]


def test_cli_unfreeze_given_first_still_applies_after_the_freezes(at_root, tmp_path):
    out = tmp_path / "out.safetensors"
    run = run_cli(
        "port", SRC, "--to", TINY, "--unfreeze", "fc", "--freeze", "*", "--strict", "false", "-o", out
    )
    assert run.exit_code == 0, run.stderr
    ready = surgery.load_ready(out, trust=True)  # the recipe names a factory: TINY
    assert [n for n, p in ready.model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def write(tmp_path, name: str, text: str):
    path = tmp_path.parent / f"{tmp_path.name}-{name}"  # beside tmp_path: tmp_path must stay empty
    path.write_text(text)
    return path


def test_cli_recipe_with_unknown_fields(at_root, tmp_path):
    recipe = write(
        tmp_path, "recipe.toml", f'source = "{SRC}"\nto = "{TINY}"\nfreze = ["*"]\nlearning_rate = 1\n'
    )
    out = tmp_path / "out.safetensors"
    run = run_cli("port", "--recipe", recipe, "-o", out)
    line = assert_clean_error(run, recipe, contains="unknown fields freze, learning_rate", code=2)
    assert line.endswith("unknown fields freze, learning_rate")
    assert "hint: fields: source, to, out" in run.stderr
    assert not out.exists()


def test_cli_recipe_that_is_not_toml(at_root, tmp_path):
    recipe = write(tmp_path, "recipe.toml", "source: checkpoint.pth\nto: [resnet18\n")
    run = run_cli("port", "--recipe", recipe, "-o", tmp_path / "out.safetensors")
    assert_clean_error(run, recipe, contains="not a TOML file", code=2)
    assert list(tmp_path.iterdir()) == []
    binary = write(tmp_path, "recipe.bin", "")
    binary.write_bytes(b"\xff\xfe\x00garbage")
    run = run_cli("port", "--recipe", binary, "-o", tmp_path / "out.safetensors")
    assert_clean_error(run, binary, contains="not a TOML file", code=2)


def test_cli_recipe_field_of_the_wrong_type_or_edit_shape(at_root, tmp_path):
    recipe = write(tmp_path, "types.toml", f'source = "{SRC}"\nto = "{TINY}"\nnum_classes = "2"\n')
    run = run_cli("port", "--recipe", recipe, "-o", tmp_path / "out.safetensors")
    assert_clean_error(run, recipe, contains="field 'num_classes' should be int, not str", code=2)
    recipe = write(
        tmp_path, "edit.toml", f'source = "{SRC}"\nto = "{TINY}"\n[[edits]]\nop = "delete"\nwhere = "fc"\n'
    )
    run = run_cli("port", "--recipe", recipe, "-o", tmp_path / "out.safetensors")
    assert_clean_error(run, recipe, contains="each edit is a table with op", code=2)
    run = run_cli(
        "port", "--recipe", tmp_path.parent / "no-such-recipe.toml", "-o", tmp_path / "out.safetensors"
    )
    assert_clean_error(run, tmp_path.parent / "no-such-recipe.toml", contains="no such recipe file", code=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_edits_with_a_template_target(at_root, tmp_path):
    template = FIXTURES / "tiny.safetensors"
    out = tmp_path / "out.safetensors"
    run = run_cli("port", SRC, "--to", template, "--num-classes", "2", "--strict", "false", "-o", out)
    assert_clean_error(run, template, contains="edits need a built target", code=2)
    run = run_cli("port", SRC, "--to", template, "--freeze", "fc.*", "--strict", "false", "-o", out)
    assert_clean_error(run, template, contains="a fine-tune plan needs a built target", code=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_refusals_as_a_real_process(tmp_path):
    """The same one-line error from `python -m surgery`, run from the repository."""
    from conftest import run_subprocess

    out = tmp_path / "out.safetensors"
    run = run_subprocess(
        "port", SRC, "--to", TINY, "--delete", "nosuch", "--strict", "false", "-o", out, cwd=ROOT
    )
    assert_clean_error(run, "nosuch", contains="no such module", code=2)
    assert not out.exists()
