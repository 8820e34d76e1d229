"""The classic transfer-learning recipes, end to end, on real torchvision models.

Each test runs `surgery port` with the recipe's flags on a seeded checkpoint (written
to a temporary folder, never downloaded), then does what a training script does with
the output: `surgery.load_ready`, an optimizer over `ready.param_groups`, a step.

1. fixed feature extractor (resnet18): only the new head trains, BN statistics stay
2. whole-network fine-tuning: a faster head, the rest at a base rate
3. larger rates for chosen layers only (mobilenet_v3_small's classifier.0 and .3)
4. add, delete and replace modules (mobilenet_v3_small's classifier)
5. a backbone out of a classifier: VGG `--extract features`, resnet `--drop avgpool,fc`
6. first conv adapted from 3 input channels to 1 and to 4
7. new layers initialised by each `--init` scheme

and: load_ready reproduces the report's fine-tune section; set_lr keeps the optimizer's
state; a recipe file gives what the flags give; `surgery inspect` shows the recipe.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import surgery
from surgery.models.edit import add, delete, extract, get_module, parse_spec, replace, without


# -- helpers ------------------------------------------------------------------------
def port(*args) -> tuple[object, dict]:
    """`surgery port ARGS --json` in-process: (run, the report)."""
    run = run_cli("port", *args, "--json")
    assert run.exit_code == 0, (run.stdout[-2000:], run.stderr)
    return run, json.loads(run.stdout)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def group_names(model: nn.Module, groups: list[dict]) -> dict[str, list[str]]:
    """{group name: [parameter names]}, by identity."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def every_param_in_exactly_one_group(model: nn.Module, groups: list[dict]) -> None:
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(seen) == ids(trainable)
    torch.optim.SGD(groups, lr=0.1)  # torch agrees: no duplicates, nothing frozen


def one_step(model: nn.Module, groups: list[dict], x: torch.Tensor, num_classes: int, seed: int = 5) -> dict:
    """One SGD momentum step in train mode; returns the state_dict before it."""
    torch.manual_seed(seed)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    model.train()
    y = torch.randint(0, num_classes, (x.shape[0],))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return before


def changed_keys(model: nn.Module, before: dict) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


# -- sources, each real model built once --------------------------------------------
@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """The PyTorch ImageNet example's checkpoint of a seeded resnet18 (`module.` keys, an
    optimizer, non-trivial BN statistics): (checkpoint path, the source model in eval mode)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(900)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("imagenet")
    ck = folder / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 90,
            "arch": "resnet18",
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
            "best_acc1": torch.tensor(69.7),
            "optimizer": optimizer.state_dict(),
        },
        ck,
    )
    return ck, model.eval()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """A seeded mobilenet_v3_small state_dict: (path, the source model in eval mode)."""
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v3_small.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1234)
    return torch.randn(4, 3, 64, 64)


# == 1. fixed feature extractor =======================================================
FEATURE_EXTRACTOR = ["--num-classes", "2", "--freeze", "*", "--unfreeze", "fc.*", "--strict", "false"]


@pytest.fixture(scope="module")
def feature_extractor(resnet, tmp_path_factory):
    """The recipe with --freeze-bn: (output, report)."""
    ck, _ = resnet
    out = tmp_path_factory.mktemp("fx") / "ready.safetensors"
    _, doc = port(ck, "--to", "torchvision:resnet18", *FEATURE_EXTRACTOR, "--freeze-bn", "-o", out)
    return out, doc


def test_feature_extractor_only_the_head_trains(feature_extractor, resnet, x):
    out, doc = feature_extractor
    _, source = resnet
    assert doc["written"] and doc["edits"] == ["new head fc for 2 classes"]
    ready = surgery.load_ready(out)
    model = ready.model
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert group_names(model, ready.param_groups) == {"base": ["fc.weight", "fc.bias"]}
    every_param_in_exactly_one_group(model, ready.param_groups)
    # the backbone is the source's
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)

    before = one_step(model, ready.param_groups, x, 2)
    assert changed_keys(model, before) == {"fc.weight", "fc.bias"}  # BN statistics included
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training and model.layer1.training


def test_feature_extractor_without_freeze_bn_the_bn_statistics_move(resnet, x, tmp_path):
    """Without --freeze-bn, model.train() puts BatchNorm in training mode: its running
    statistics (buffers, not parameters) are updated by the forward pass although every
    BN parameter is frozen. That is why the recipe needs --freeze-bn."""
    ck, _ = resnet
    out = tmp_path / "ready.safetensors"
    _, doc = port(ck, "--to", "torchvision:resnet18", *FEATURE_EXTRACTOR, "-o", out)
    assert doc["finetune"]["frozen_bn"] == 0
    ready = surgery.load_ready(out)
    model = ready.model
    assert group_names(model, ready.param_groups) == {"base": ["fc.weight", "fc.bias"]}
    before = one_step(model, ready.param_groups, x, 2)
    changed = changed_keys(model, before)
    assert {"fc.weight", "fc.bias"} <= changed
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == {"fc.weight", "fc.bias"}  # parameters: only the head
    stats = changed - params
    assert "bn1.running_mean" in stats and "layer4.1.bn2.running_var" in stats
    assert "bn1.num_batches_tracked" in stats
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in stats)


def test_feature_extractor_report_and_inspect_show_the_plan(feature_extractor):
    out, doc = feature_extractor
    fine = doc["finetune"]
    assert fine["frozen_bn"] == 20
    assert fine["groups"] == [
        {"name": "base", "lr": None, "weight_decay": None, "tensors": 2, "params": 1026}
    ]
    modules = {m["module"]: (m["trainable"], m["frozen"]) for m in fine["modules"]}
    assert modules["fc"] == (1026, 0) and modules["layer4"][0] == 0 and modules["conv1"] == (0, 9408)
    assert fine["warnings"] == []

    run = run_cli("inspect", out)
    assert run.exit_code == 0, run.stderr
    lines = run.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  recipe "))
    recipe = [lines[start].removeprefix("  recipe").strip()]
    for line in lines[start + 1 :]:
        if not line.startswith("    "):  # the next row's label
            break
        recipe.append(line.strip())
    assert recipe == [
        "target torchvision:resnet18",
        "edit: num_classes = 2",
        "freeze *",
        "unfreeze fc.*",
        "freeze BatchNorm statistics",
        "120 keys loaded from the source; surgery.load_ready(path) replays it",
    ]
    assert "surgery_recipe" not in run.stdout  # the raw JSON is not dumped in the metadata rows


def test_feature_extractor_recipe_in_the_metadata(feature_extractor):
    out, _ = feature_extractor
    recipe = json.loads(metadata(out)["surgery.recipe"])
    assert recipe["target"] == "torchvision:resnet18"
    assert recipe["edits"] == [{"op": "num_classes", "value": 2}]
    assert recipe["finetune"]["freeze"] == [["freeze", "*"], ["unfreeze", "fc.*"]]
    assert recipe["finetune"]["freeze_bn"] is True
    assert len(recipe["mapping"]) == 120 and recipe["mapping"]["module.conv1.weight"] == "conv1.weight"
    ready = surgery.load_ready(out)
    assert ready.recipe == surgery.Recipe.from_json(recipe)


# == 2. whole-network fine-tuning =====================================================
@pytest.fixture(scope="module")
def whole_network(resnet, tmp_path_factory):
    ck, _ = resnet
    out = tmp_path_factory.mktemp("whole") / "ready.safetensors"
    _, doc = port(
        ck,
        "--to",
        "torchvision:resnet18",
        "--num-classes",
        "2",
        "--lr",
        "head:fc.*=1e-2",
        "--base-lr",
        "1e-3",
        "--strict",
        "false",
        "-o",
        out,
    )
    return out, doc


def test_whole_network_two_named_groups(whole_network):
    out, doc = whole_network
    ready = surgery.load_ready(out)
    model = ready.model
    groups = {g["name"]: g for g in ready.param_groups}
    assert set(groups) == {"head", "base"} and len(ready.param_groups) == 2
    assert groups["head"]["lr"] == 1e-2 and groups["base"]["lr"] == 1e-3
    assert "weight_decay" not in groups["head"]
    names = group_names(model, ready.param_groups)
    assert names["head"] == ["fc.weight", "fc.bias"]
    assert names["base"] == [n for n, _ in model.named_parameters() if not n.startswith("fc.")]
    assert all(p.requires_grad for p in model.parameters())  # frozen: none
    every_param_in_exactly_one_group(model, ready.param_groups)
    assert ids(groups["head"]["params"]) == ids([model.fc.weight, model.fc.bias])
    assert ready.summary.to_json() == doc["finetune"]


def test_set_lr_changes_one_group_and_keeps_the_momentum(whole_network, x):
    out, _ = whole_network
    ready = surgery.load_ready(out)
    model = ready.model.train()
    optimizer = torch.optim.SGD(ready.param_groups, lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    F.cross_entropy(model(x), torch.randint(0, 2, (x.shape[0],))).backward()
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    assert len(before["state"]) == 62  # a momentum buffer per parameter

    assert surgery.set_lr(optimizer, "head", 1e-4) == 1
    after = optimizer.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for k, state in before["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], state["momentum_buffer"])
    for old, new in zip(before["param_groups"], after["param_groups"], strict=True):
        expected = dict(old, lr=1e-4) if old["name"] == "head" else old
        assert new == expected
    # the buffers are the optimizer's own, still attached to the same parameters
    assert optimizer.state[model.fc.weight]["momentum_buffer"] is not None

    with pytest.raises(KeyError, match="there are base, head"):
        surgery.set_lr(optimizer, "heads", 1e-4)


# == 3. larger rates for chosen layers only ===========================================
@pytest.mark.parametrize(
    "rules, fast",
    [
        (["--lr", "classifier.0=1e-2", "--lr", "classifier.3=1e-2"], ["classifier.0", "classifier.3"]),
        (["--lr", "fast:classifier.[03].*=1e-2"], ["fast"]),
    ],
    ids=["two rules", "one glob"],
)
def test_larger_lr_for_chosen_layers_only(mobilenet, tmp_path, rules, fast):
    path, _ = mobilenet
    out = tmp_path / "ready.safetensors"
    _, doc = port(path, "--to", "torchvision:mobilenet_v3_small", *rules, "--base-lr", "1e-3", "-o", out)
    assert doc["summary"].startswith("loaded 244/244 tensors")
    ready = surgery.load_ready(out)
    model = ready.model
    every_param_in_exactly_one_group(model, ready.param_groups)
    at_fast = {n for g in ready.param_groups if g["lr"] == 1e-2 for n in group_names(model, [g])[g["name"]]}
    assert at_fast == {"classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"}
    assert [g["name"] for g in ready.param_groups] == ["base", *fast]
    base = ready.param_groups[0]
    assert base["lr"] == 1e-3 and len(base["params"]) == len(list(model.parameters())) - 4
    assert ready.summary.to_json() == doc["finetune"]


# == 4. add, delete, replace =========================================================
CLASSIFIER_EDITS = [
    "--delete",
    "classifier.2",
    "--replace",
    "classifier.3=Linear(*, 10)",
    "--add",
    "classifier.4=ReLU()",
]


def hand_edited_mobilenet() -> nn.Module:
    """The same edits as a user writes them with torch: del (which renumbers), index, append."""
    model = torchvision.models.mobilenet_v3_small(weights=None)
    del model.classifier[2]  # the Dropout
    model.classifier[2] = nn.Linear(1024, 10)
    model.classifier.append(nn.ReLU())
    return model


def test_add_delete_replace_on_a_real_classifier(mobilenet, tmp_path):
    path, source = mobilenet
    out = tmp_path / "edited.safetensors"
    _, doc = port(
        path, "--to", "torchvision:mobilenet_v3_small", *CLASSIFIER_EDITS, "--strict", "false", "-o", out
    )
    assert doc["edits"] == [
        "deleted classifier.2: removed",
        "replaced classifier.3 (Linear) by Linear(*, 10)",
        "added classifier.4 = ReLU()",
    ]
    state = load_file(out)
    hand = hand_edited_mobilenet()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in hand.state_dict().items()
    }
    assert state["classifier.2.weight"].shape == (10, 1024)
    assert not any(k.startswith("classifier.3.") for k in state)
    for k, v in source.state_dict().items():  # everything but the new head is the source's
        if not k.startswith("classifier.3."):
            assert torch.equal(state[k], v), k

    ready = surgery.load_ready(out)
    model = ready.model.eval()
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "Hardswish", "Linear", "ReLU"]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    hand.load_state_dict(state, strict=True)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 10) and (y >= 0).all()  # the ReLU at the end runs
        assert torch.equal(y, hand.eval()(x))


def test_add_delete_replace_through_the_library_on_vgg_like_classifier():
    """The same three edits with the library functions, on torchvision's VGG classifier
    layout (0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Dropout, 6 Linear), small."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("features", torchvision.models.vgg.make_layers([8, "M", 16, "M"]))
    model.add_module("avgpool", nn.AdaptiveAvgPool2d((2, 2)))
    model.add_module("flatten", nn.Flatten())
    model.add_module(
        "classifier",
        nn.Sequential(
            nn.Linear(64, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, 32),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(32, 5),
        ),
    )
    x = torch.randn(2, 3, 16, 16)
    delete(model, "classifier.5")
    old = replace(model, "classifier.6", parse_spec("Linear(*, 10)", 32))
    assert old.out_features == 5
    add(model, "classifier.7", parse_spec("Softmax(dim=1)"))
    kinds = [type(m).__name__ for m in model.classifier]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear", "Softmax"]
    y = model.eval()(x)
    assert y.shape == (2, 10) and torch.allclose(y.sum(dim=1), torch.ones(2))
    assert get_module(model, "classifier.5").out_features == 10


# == 5. backbones ====================================================================
VGG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]  # vgg11


@pytest.fixture(scope="module")
def vgg_features(tmp_path_factory):
    """A seeded vgg11 checkpoint's `features.*` tensors (the 120M-parameter classifier is
    left out to keep the file small): (path, the features module)."""
    torch.manual_seed(2)
    features = torchvision.models.vgg.make_layers(VGG_A)
    with torch.device("meta"):
        real = torchvision.models.vgg11().features
    assert [(k, v.shape) for k, v in features.state_dict().items()] == [
        (k, v.shape) for k, v in real.state_dict().items()
    ]
    path = tmp_path_factory.mktemp("vgg") / "vgg11.pth"
    torch.save({"state_dict": {"features." + k: v for k, v in features.state_dict().items()}}, path)
    return path, features.eval()


@pytest.mark.slow
def test_vgg_extract_features_is_the_backbone(vgg_features, tmp_path):
    path, features = vgg_features
    out = tmp_path / "backbone.safetensors"
    _, doc = port(path, "--to", "torchvision:vgg11", "--extract", "features", "--match", "auto", "-o", out)
    assert doc["edits"] == ["extracted features"]
    assert doc["summary"].startswith("loaded 16/16 tensors (100.0% of parameters)")
    state = load_file(out)
    assert list(state) == list(features.state_dict())  # the backbone's keys: 0.weight, 0.bias, 3.weight, ...
    for k, v in features.state_dict().items():
        assert torch.equal(state[k], v), k
    ready = surgery.load_ready(out)
    assert isinstance(ready.model, nn.Sequential) and len(ready.model) == 21
    torch.manual_seed(4)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = ready.model.eval()(x)
        assert maps.shape == (1, 512, 2, 2)
        assert torch.equal(maps, features(x))
    every_param_in_exactly_one_group(ready.model, ready.param_groups)


def test_extract_loads_the_backbone_with_the_default_match(mobilenet, tmp_path):
    """`--extract features` drops the `features.` level from the target's keys; the
    source's `features.*` keys must still find them without extra flags (as `--drop`
    keeps the names and loads with the default exact match)."""
    path, source = mobilenet
    _, doc = port(
        path,
        "--to",
        "torchvision:mobilenet_v3_small",
        "--extract",
        "features",
        "--strict",
        "false",
        "--dry-run",
    )
    assert doc["coverage"] == 1.0, doc["summary"]
    assert len(doc["matched"]) == len(source.features.state_dict())


def test_resnet_drop_avgpool_fc_is_the_backbone(resnet, tmp_path):
    ck, source = resnet
    out = tmp_path / "backbone.safetensors"
    _, doc = port(ck, "--to", "torchvision:resnet18", "--drop", "avgpool,fc", "--strict", "false", "-o", out)
    assert doc["summary"] == (
        "loaded 120/120 tensors (100.0% of parameters); missing 0; unexpected 2: module.fc.{bias,weight}"
    )
    state = load_file(out)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    ready = surgery.load_ready(out)
    body = nn.Sequential(*list(source.children())[:-2]).eval()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = ready.model.eval()(x)
        assert maps.shape == (2, 512, 2, 2)
        assert torch.equal(maps, body(x))


def test_library_extract_and_without_on_real_models(resnet):
    _, source = resnet
    model = copy.deepcopy(source)
    backbone = without(model, ["avgpool", "fc"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert backbone(x).shape == (1, 512, 2, 2)
    layers = extract(model, ["layer1", "layer2"])
    assert list(layers._modules) == ["layer1", "layer2"]
    with torch.device("meta"):
        vgg = torchvision.models.vgg11()
    assert extract(vgg, ["features"]) is vgg.features


# == 6. first conv for 1 and 4 input channels =========================================
@pytest.fixture(scope="module")
def in_chans_outputs(resnet, tmp_path_factory):
    ck, _ = resnet
    folder = tmp_path_factory.mktemp("in_chans")
    outs = {}
    for n in (1, 4):
        outs[n] = folder / f"in{n}.safetensors"
        _, doc = port(ck, "--to", "torchvision:resnet18", "--in-chans", str(n), "--verify", "-o", outs[n])
        assert doc["verified"] == 122
        assert doc["edits"][-1] == f"first conv conv1 adapted to {n} input channel" + ("s" if n > 1 else "")
    return outs


def test_in_chans_1_sums_the_first_conv(in_chans_outputs, resnet):
    _, source = resnet
    out = in_chans_outputs[1]
    state = load_file(out)
    w = source.conv1.weight.detach()
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.equal(state["conv1.weight"], w.sum(dim=1, keepdim=True))
    assert torch.equal(state["fc.weight"], source.fc.weight)
    ready = surgery.load_ready(out)
    model = ready.model.eval()
    torch.manual_seed(6)
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        # conv(sum_c w_c, x) == conv(w, x repeated to 3 channels)
        assert torch.allclose(model.conv1(gray), source.conv1(gray.expand(-1, 3, -1, -1)), atol=1e-5)
        assert torch.allclose(model(gray), source(gray.expand(-1, 3, -1, -1)), atol=1e-4)


def test_in_chans_4_repeats_and_rescales_the_first_conv(in_chans_outputs, resnet):
    _, source = resnet
    out = in_chans_outputs[4]
    state = load_file(out)
    w = source.conv1.weight.detach()
    new = state["conv1.weight"]
    assert new.shape == (64, 4, 7, 7)
    for j in range(4):
        assert torch.allclose(new[:, j], w[:, j % 3] * 3 / 4, rtol=0, atol=1e-7)
    ready = surgery.load_ready(out)
    model = ready.model.eval()
    torch.manual_seed(7)
    x4 = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        got = model.conv1(x4)
        # channels 0-2 see the source's filters, channel 3 channel 0's again, all scaled by 3/4
        expected = 0.75 * (source.conv1(x4[:, :3]) + F.conv2d(x4[:, 3:], w[:, :1], stride=2, padding=3))
        assert torch.allclose(got, expected, atol=1e-5)
        # a 4-channel image made of the same gray plane keeps the 3-channel activations' scale
        gray = torch.randn(2, 1, 64, 64)
        a4 = model.conv1(gray.expand(-1, 4, -1, -1))
        a3 = source.conv1(gray.expand(-1, 3, -1, -1))
        assert math.isclose(a4.abs().mean().item(), a3.abs().mean().item(), rel_tol=0.35)
        assert model(x4).shape == (2, 1000)


# == 7. initialisation of new layers =================================================
NEW_LAYERS = [
    "--replace",
    "fc=Sequential(Linear(*, 1024), BatchNorm1d(1024), ReLU(), Linear(1024, 10))",
    "--replace",
    "layer4.1.conv2=Conv2d(*, 512, 5, padding=2, bias=False)",
]
CONV_N = 5 * 5 * 512  # k*k*out_channels; also fan_in and fan_out of the 512 -> 512 5x5 conv


@pytest.fixture(scope="module")
def init_outputs(resnet, tmp_path_factory):
    """One port per scheme, made when first asked for: {scheme: state_dict of the output}."""
    ck, _ = resnet
    folder = tmp_path_factory.mktemp("init")
    cache: dict[str, dict] = {}

    def get(scheme: str) -> dict:
        if scheme not in cache:
            out = folder / f"{scheme}.safetensors"
            torch.manual_seed(11)
            _, doc = port(
                ck,
                "--to",
                "torchvision:resnet18",
                *NEW_LAYERS,
                "--init",
                scheme,
                "--strict",
                "false",
                "-o",
                out,
            )
            assert doc["edits"][-1] == f"initialised fc, layer4.1.conv2 ({scheme})"
            cache[scheme] = load_file(out)
        return cache[scheme]

    return get


def _std(t: torch.Tensor) -> float:
    return t.double().std().item()


@pytest.mark.parametrize("scheme", ["normal", "kaiming", "xavier", "zeros", "default"])
def test_init_scheme_statistics(init_outputs, resnet, scheme):
    state = init_outputs(scheme)
    _, source = resnet
    lin, lin2, conv = state["fc.0.weight"], state["fc.3.weight"], state["layer4.1.conv2.weight"]
    assert lin.shape == (1024, 512) and conv.shape == (512, 512, 5, 5)
    biases = [state["fc.0.bias"], state["fc.3.bias"]]
    if scheme == "normal":
        assert math.isclose(_std(lin), 0.01, rel_tol=0.03)
        assert math.isclose(_std(conv), math.sqrt(2 / CONV_N), rel_tol=0.03)
        assert abs(lin.double().mean().item()) < 1e-3
    elif scheme == "kaiming":
        assert math.isclose(_std(lin), math.sqrt(2 / 1024), rel_tol=0.03)  # fan_out of Linear(512, 1024)
        assert math.isclose(_std(lin2), math.sqrt(2 / 10), rel_tol=0.15)
        assert math.isclose(_std(conv), math.sqrt(2 / CONV_N), rel_tol=0.03)
    elif scheme == "xavier":
        bound = math.sqrt(6 / (512 + 1024))
        assert lin.abs().max().item() <= bound and lin.abs().max().item() > 0.99 * bound
        assert math.isclose(_std(lin), bound / math.sqrt(3), rel_tol=0.03)
        conv_bound = math.sqrt(6 / (2 * CONV_N))
        assert conv.abs().max().item() <= conv_bound * (1 + 1e-6)
        assert math.isclose(_std(conv), conv_bound / math.sqrt(3), rel_tol=0.03)
    elif scheme == "zeros":
        assert not lin.any() and not lin2.any() and not conv.any()
    else:  # default: the layers' own reset_parameters (kaiming uniform, bound 1/sqrt(fan_in))
        assert lin.any() and conv.any() and biases[0].any()
        assert lin.abs().max().item() <= 1 / math.sqrt(512)
        assert math.isclose(_std(lin), 1 / math.sqrt(512) / math.sqrt(3), rel_tol=0.05)
        assert conv.abs().max().item() <= 1 / math.sqrt(CONV_N) * (1 + 1e-6)
    if scheme != "default":
        assert all(not b.any() for b in biases)
    # what was not created is the source's, untouched by the scheme
    assert torch.equal(state["layer4.1.conv1.weight"], source.layer4[1].conv1.weight)
    assert torch.equal(state["layer4.1.bn2.weight"], source.layer4[1].bn2.weight)


@pytest.mark.parametrize("scheme", ["normal", "kaiming", "xavier"])
def test_init_new_batchnorm_starts_at_weight_1_bias_0(init_outputs, scheme):
    state = init_outputs(scheme)
    assert torch.equal(state["fc.1.weight"], torch.ones(1024))
    assert torch.equal(state["fc.1.bias"], torch.zeros(1024))


def test_init_zeros_still_starts_norm_layers_at_weight_1(init_outputs):
    """README and initialise()'s docstring: norms start at weight 1, bias 0 (for every
    scheme but `default`), so a zero-initialised head still normalises."""
    state = init_outputs("zeros")
    assert torch.equal(state["fc.1.weight"], torch.ones(1024))
    assert torch.equal(state["fc.1.bias"], torch.zeros(1024))


# == load_ready against the report ===================================================
REPORT_CASES = {
    "feature extractor": [*FEATURE_EXTRACTOR, "--freeze-bn", "--lr", "head:fc.*=1e-2"],
    "decays": [
        "--num-classes",
        "3",
        "--freeze",
        "conv1",
        "--freeze",
        "layer1",
        "--lr",
        "head:fc.*=1e-2",
        "--lr",
        "deep:layer4.*=5e-3",
        "--base-lr",
        "1e-3",
        "--weight-decay",
        "1e-4",
        "--layer-decay",
        "0.8",
        "--strict",
        "false",
    ],
    "gray input": [
        "--num-classes",
        "2",
        "--in-chans",
        "1",
        "--freeze",
        "conv1.*",
        "--freeze",
        "bn1.*",
        "--lr",
        "head:fc.*=1e-2",
        "--base-lr",
        "1e-3",
        "--strict",
        "false",
    ],
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_load_ready_reproduces_the_reports_fine_tune_section(resnet, tmp_path, case):
    ck, _ = resnet
    out = tmp_path / "ready.safetensors"
    _, doc = port(ck, "--to", "torchvision:resnet18", *REPORT_CASES[case], "-o", out)
    ready = surgery.load_ready(out)
    model = ready.model
    assert ready.summary.to_json() == doc["finetune"]
    reported = [
        (g["name"], g["lr"], g["weight_decay"], g["tensors"], g["params"]) for g in doc["finetune"]["groups"]
    ]
    rebuilt = [
        (g["name"], g.get("lr"), g.get("weight_decay"), len(g["params"]), sum(p.numel() for p in g["params"]))
        for g in ready.param_groups
    ]
    assert rebuilt == reported
    every_param_in_exactly_one_group(model, ready.param_groups)
    state = load_file(out)
    assert list(model.state_dict()) == list(state)
    names = group_names(model, ready.param_groups)
    for name, params in names.items():  # each group's parameters follow the rules
        if name.startswith("head"):
            assert all(p.startswith("fc.") for p in params)
        elif name.startswith("deep"):
            assert all(p.startswith("layer4.") for p in params)
        if name.endswith("/no_decay"):
            assert all(state[p].ndim <= 1 for p in params)


def test_layer_decay_scales_rates_from_the_head_down(resnet, tmp_path):
    ck, _ = resnet
    _, doc = port(
        ck,
        "--to",
        "torchvision:resnet18",
        "--num-classes",
        "2",
        "--base-lr",
        "1e-2",
        "--layer-decay",
        "0.5",
        "--strict",
        "false",
        "--dry-run",
    )
    groups = doc["finetune"]["groups"]
    by_module = {}
    for g in groups:
        _, layer = g["name"].split("/layer")
        by_module[int(layer)] = g["lr"]
    layers = sorted(by_module)
    assert by_module[layers[-1]] == 1e-2  # the head at the full rate
    for lower, upper in zip(layers, layers[1:], strict=False):
        ratio = by_module[lower] / by_module[upper]
        k = math.log(ratio, 0.5)
        assert ratio < 1 and math.isclose(k, round(k)) and round(k) >= 1  # F ** (steps between them)


# == recipe files ====================================================================
RECIPE_TOML = """
source = "{source}"
to = "torchvision:resnet18"
out = "{out}"
strict = false
in_chans = 1
init = "zeros"
freeze = ["conv1.*", "bn1.*", "layer1.*"]
unfreeze = ["layer1.1.*"]
freeze_bn = true
lr = {{ "head:fc.*" = 1e-2, "layer4.*" = 5e-3 }}
base_lr = 1e-3
weight_decay = 1e-4

[[edits]]
op = "delete"
path = "maxpool"

[[edits]]
op = "replace"
path = "fc"
spec = "Sequential(Dropout(0.2), Linear(*, 10))"
"""
RECIPE_FLAGS = [
    "--to",
    "torchvision:resnet18",
    "--strict",
    "false",
    "--replace",
    "fc=Sequential(Dropout(0.2), Linear(*, 10))",
    "--delete",
    "maxpool",
    "--in-chans",
    "1",
    "--init",
    "zeros",
    "--unfreeze",
    "layer1.1.*",  # given first on the command line: freezes still apply first
    "--freeze",
    "conv1.*",
    "--freeze",
    "bn1.*",
    "--freeze",
    "layer1.*",
    "--freeze-bn",
    "--lr",
    "head:fc.*=1e-2",
    "--lr",
    "layer4.*=5e-3",
    "--base-lr",
    "1e-3",
    "--weight-decay",
    "1e-4",
]


def test_recipe_file_gives_what_the_flags_give(resnet, tmp_path):
    ck, _ = resnet
    by_flags = tmp_path / "flags.safetensors"
    by_file = tmp_path / "file.safetensors"
    _, doc_flags = port(ck, *RECIPE_FLAGS, "-o", by_flags)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE_TOML.format(source=ck, out=by_file))
    _, doc_file = port("--recipe", recipe)
    assert doc_file["written"] and by_file.exists()

    a, b = load_file(by_flags), load_file(by_file)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # fresh keys are zeros (--init zeros), the rest loaded
    assert not a["fc.1.weight"].any()
    meta_a, meta_b = metadata(by_flags), metadata(by_file)
    assert meta_a["surgery.recipe"] == meta_b["surgery.recipe"]
    assert doc_flags["finetune"] == doc_file["finetune"]
    assert doc_flags["edits"] == doc_file["edits"]

    ready = surgery.load_ready(by_file)
    trainable = {n for n, p in ready.model.named_parameters() if p.requires_grad}
    assert "layer1.1.conv1.weight" in trainable and "layer1.0.conv1.weight" not in trainable
    assert "conv1.weight" not in trainable and not any(".bn" in n or n.startswith("bn") for n in trainable)
    groups = {g["name"]: g["lr"] for g in ready.param_groups}
    # BN parameters are frozen (--freeze-bn) and resnet convs have no bias: only the
    # head has parameters of 1 dimension, so only it has a no_decay group
    assert groups == {"base": 1e-3, "layer4.*": 5e-3, "head": 1e-2, "head/no_decay": 1e-2}


def test_recipe_file_flags_on_the_command_line_win(resnet, tmp_path):
    ck, _ = resnet
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE_TOML.format(source=ck, out=tmp_path / "unused.safetensors"))
    _, doc = port("--recipe", recipe, "--base-lr", "5e-4", "--dry-run")
    groups = {g["name"]: g["lr"] for g in doc["finetune"]["groups"]}
    assert groups["base"] == 5e-4 and groups["head"] == 1e-2
    assert not (tmp_path / "unused.safetensors").exists()
