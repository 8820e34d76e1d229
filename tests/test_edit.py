"""Module surgery by dotted path (`surgery/edit.py`), unit by unit.

Paths and their errors, replace/add/delete/rename/extract/without on real torchvision
models and small stacks, finding and resetting a classifier head, adapting the first
conv's weight to other input channels, and module specs: parsed, never evaluated.
Big models (vgg11, vit_b_16, convnext_tiny) are built on the meta device: structure only,
no memory, no time.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.errors import BadArgument, SurgeryError
from surgery.models.edit import (
    SPEC_FORM,
    Edit,
    EditError,
    adapt_conv_weight,
    adapt_input,
    add,
    apply,
    delete,
    extract,
    find_head,
    first_conv,
    get_module,
    input_width,
    parse_spec,
    rename_module,
    replace,
    reset_head,
    without,
)


# -- models, each built once ----------------------------------------------------------
def _build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _on_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None)


@pytest.fixture(scope="module")
def resnet18_pristine():
    return _build("resnet18")


@pytest.fixture
def resnet18(resnet18_pristine):
    """A private copy: edits never leak between tests."""
    import copy

    return copy.deepcopy(resnet18_pristine)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def stack(*widths: int) -> nn.Sequential:
    """Linear(w0, w1), ReLU, Linear(w1, w2), ReLU, ..., ending on a Linear."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Block(nn.Module):
    """A parent that calls its children by attribute in forward (not a container)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Blocks(nn.Module):
    """A ModuleList used the way research code uses it: by position."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        for i in range(len(self.blocks)):
            x = self.blocks[i](x)
        return x


# == paths ==============================================================================
def test_get_module_walks_dotted_paths_and_indices(resnet18):
    assert get_module(resnet18, "") is resnet18
    assert get_module(resnet18, "layer4.1.conv2") is resnet18.layer4[1].conv2
    assert get_module(resnet18, "fc") is resnet18.fc


@pytest.mark.parametrize(
    "path, nearby",
    [
        ("layer4.1.conv3", ["layer4.1.conv1", "layer4.1.conv2"]),
        ("fcc", ["fc"]),
        ("layer5", ["layer1", "layer2", "layer3", "layer4"]),
        ("layer4.2", ["layer4.0", "layer4.1"]),
    ],
)
def test_get_module_error_names_the_nearby_paths(resnet18, path, nearby):
    with pytest.raises(EditError) as info:
        get_module(resnet18, path)
    err = info.value
    assert err.where == path and err.message == "no such module"
    assert err.exit_code == 2 and isinstance(err, SurgeryError)
    assert err.hint.startswith("modules nearby: ")
    shown = err.hint.removeprefix("modules nearby: ").split(", ")
    assert set(nearby) <= set(shown), err.hint
    assert all(get_module(resnet18, p) is not None for p in shown)  # only paths that exist


def test_get_module_does_not_treat_parameters_as_modules(resnet18):
    with pytest.raises(EditError, match="no such module"):
        get_module(resnet18, "fc.weight")


def test_the_model_itself_cannot_be_replaced_deleted_or_renamed(resnet18):
    for call in (
        lambda: replace(resnet18, "", nn.Identity()),
        lambda: delete(resnet18, ""),
        lambda: rename_module(resnet18, "", "x"),
        lambda: add(resnet18, "", nn.Identity()),
    ):
        with pytest.raises(EditError, match="the model itself"):
            call()


# == replace / add ======================================================================
def test_replace_puts_the_new_module_in_place_and_returns_the_old(resnet18, x):
    old_fc = resnet18.fc
    new = nn.Linear(512, 7)
    assert replace(resnet18, "fc", new) is old_fc
    assert resnet18.fc is new
    assert resnet18(x).shape == (2, 7)
    keys = list(resnet18.state_dict())
    assert keys[-2:] == ["fc.weight", "fc.bias"]  # same place in the state_dict


def test_replace_inside_a_sequential_by_index():
    torch.manual_seed(0)
    model = stack(4, 8, 3)
    new = nn.Linear(8, 5)
    old = replace(model, "2", new)
    assert isinstance(old, nn.Linear) and old.out_features == 3
    assert model[2] is new and list(model._modules) == ["0", "1", "2"]
    assert model(torch.randn(2, 4)).shape == (2, 5)


def test_replace_a_missing_path_changes_nothing(resnet18):
    before = dict(resnet18.named_modules())
    with pytest.raises(EditError, match="no such module"):
        replace(resnet18, "layer4.1.nope", nn.Identity())
    with pytest.raises(EditError, match="no such module"):
        replace(resnet18, "nope.conv", nn.Identity())
    assert dict(resnet18.named_modules()) == before


def test_add_into_a_sequential_inserts_at_the_index_and_renumbers():
    a, b, c = nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)
    model = nn.Sequential(a, b, c)
    new = nn.Tanh()
    add(model, "1", new)
    assert list(model._modules) == ["0", "1", "2", "3"]
    assert list(model) == [a, new, b, c]
    assert model[1] is new and len(model) == 4
    assert model(torch.randn(5, 2)).shape == (5, 3)


def test_add_past_the_end_of_a_sequential_appends():
    model = stack(2, 3)
    new = nn.Softmax(dim=1)
    add(model, "9", new)
    assert list(model._modules) == ["0", "1"] and model[1] is new
    out = model(torch.randn(4, 2))
    assert torch.allclose(out.sum(dim=1), torch.ones(4))


def test_add_to_a_sequential_that_had_a_module_deleted_renumbers_all():
    a, b, c, d = nn.Linear(2, 2), nn.ReLU(), nn.Dropout(), nn.Linear(2, 2)
    model = nn.Sequential(a, b, c, d)
    delete(model, "2")
    assert list(model._modules) == ["0", "1", "3"]
    new = nn.Tanh()
    add(model, "7", new)
    assert list(model._modules) == ["0", "1", "2", "3"]
    assert list(model) == [a, b, d, new]


def test_add_module_on_a_non_sequential_parent(resnet18, x):
    head2 = nn.Linear(512, 3)
    add(resnet18, "head2", head2)
    assert resnet18.head2 is head2
    assert list(resnet18._modules)[-1] == "head2"
    assert "head2.weight" in resnet18.state_dict()
    assert resnet18(x).shape == (2, 1000)  # the forward does not call it, and still runs


def test_add_refuses_an_existing_name_and_an_invalid_one(resnet18):
    with pytest.raises(EditError, match="exists already"):
        add(resnet18, "fc", nn.Identity())
    with pytest.raises(EditError, match="exists already"):
        add(resnet18, "layer1", nn.Identity())  # an index into a Sequential inserts instead
    with pytest.raises(EditError, match="not a valid module name"):
        add(resnet18, "1head", nn.Identity())
    with pytest.raises(EditError, match="no such module"):
        add(resnet18, "nope.head", nn.Identity())


def test_apply_add_star_is_the_width_before_the_insertion_point():
    """`*` in an added module is the width of what feeds it: inserted in the middle of a
    Sequential, the output width of the module before it, not of the last one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(), nn.Linear(8, 2))
    model, _, _ = apply(model, Edit("delete", "1"))  # a free index 1, so the add inserts there
    model, created, _ = apply(model, Edit("add", "1", "Linear(*, 8)"))
    assert created == ["1"] and list(model._modules) == ["0", "1", "2"]
    assert model[1].in_features == 8
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_apply_add_star_after_an_activation_uses_the_last_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    model, _, _ = apply(model, Edit("add", "2", "Linear(*, 3)"))
    assert model[2].in_features == 8
    assert model(torch.randn(3, 4)).shape == (3, 3)


# == delete =============================================================================
def test_delete_from_a_sequential_removes_it_and_it_still_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2))
    kept = [model[0], model[2], model[3]]
    assert delete(model, "1") == "removed"
    assert list(model) == kept and len(model) == 3
    assert [model[i] for i in range(3)] == kept
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert model(torch.randn(2, 4)).shape == (2, 2)


def test_delete_from_a_module_dict_removes_the_key():
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    assert delete(model, "a") == "removed"
    assert list(model.keys()) == ["b"]


def test_delete_from_a_module_list_keeps_it_running():
    """The README: a ModuleList keeps running; a forward that indexes it by position must too."""
    torch.manual_seed(0)
    model = Blocks()
    kept = [model.blocks[1], model.blocks[2]]
    assert delete(model, "blocks.0") == "removed (the list renumbered)"
    assert len(model.blocks) == 2
    assert list(model.blocks) == kept
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_delete_under_a_non_container_parent_leaves_an_identity(resnet18, x):
    text = delete(resnet18, "layer4.1.bn2")
    assert "Identity" in text
    assert isinstance(resnet18.layer4[1].bn2, nn.Identity)
    assert not any(k.startswith("layer4.1.bn2.") for k in resnet18.state_dict())
    assert resnet18(x).shape == (2, 1000)
    delete(resnet18, "fc")
    assert isinstance(resnet18.fc, nn.Identity)
    assert resnet18(x).shape == (2, 512)  # the features, as `model.fc = nn.Identity()` by hand


def test_delete_inside_a_custom_block_keeps_the_block_running():
    torch.manual_seed(0)
    block = Block()
    delete(block, "bn")
    out = block(torch.randn(1, 4, 5, 5))
    assert out.shape == (1, 4, 5, 5) and isinstance(block.bn, nn.Identity)


def test_delete_a_missing_path_names_nearby_modules(resnet18):
    with pytest.raises(EditError) as info:
        delete(resnet18, "layer4.1.bn3")
    assert "layer4.1.bn2" in info.value.hint or "layer4.1.bn1" in info.value.hint


# == rename =============================================================================
def test_rename_module_keeps_its_place_and_the_forward():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(3, 4), b=nn.ReLU(), c=nn.Linear(4, 2)))
    x = torch.randn(2, 3)
    before = model(x)
    objects = list(model)
    rename_module(model, "b", "act")
    assert list(model._modules) == ["a", "act", "c"]
    assert list(model) == objects
    assert torch.equal(model(x), before)
    rename_module(model, "a", "7")  # a digit name is a valid module name too
    assert list(model._modules) == ["7", "act", "c"]


def test_rename_module_renames_the_state_dict_keys_in_order(resnet18):
    rename_module(resnet18, "layer4.1.conv2", "conv_two")
    keys = list(resnet18.state_dict())
    i = keys.index("layer4.1.conv_two.weight")
    assert keys[i - 1].startswith("layer4.1.bn1.") and keys[i + 1] == "layer4.1.bn2.weight"


def test_rename_module_refusals(resnet18):
    with pytest.raises(EditError, match="exists already"):
        rename_module(resnet18, "fc", "avgpool")
    for bad in ("a.b", "1x", "", "fc head"):
        with pytest.raises(EditError, match="not a valid module name"):
            rename_module(resnet18, "fc", bad)
    with pytest.raises(EditError, match="no such module"):
        rename_module(resnet18, "fcc", "head")
    assert list(resnet18._modules)[-1] == "fc"


# == extract / without ==================================================================
def test_extract_one_path_is_that_module(resnet18):
    assert extract(resnet18, ["layer1"]) is resnet18.layer1


def test_extract_many_paths_is_a_sequential_in_the_order_given(resnet18):
    model = extract(resnet18, ["layer1", "layer2.0", "layer2.1"])
    assert isinstance(model, nn.Sequential)
    assert list(model._modules) == ["layer1", "layer2_0", "layer2_1"]
    assert model.layer2_0 is resnet18.layer2[0]
    out = model(torch.randn(1, 64, 16, 16))
    assert out.shape == (1, 128, 8, 8)


def test_extract_a_vgg_like_backbone_runs():
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers([8, "M", 16, "M"])
    vgg = nn.Sequential(
        OrderedDict(
            features=features, avgpool=nn.AdaptiveAvgPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(64, 3)
        )
    )
    backbone = extract(vgg, ["features"])
    assert backbone is features
    assert backbone(torch.randn(1, 3, 16, 16)).shape == (1, 16, 4, 4)
    two = extract(vgg, ["features", "avgpool"])
    assert two(torch.randn(1, 3, 16, 16)).shape == (1, 16, 2, 2)


def test_extract_a_missing_path_is_an_edit_error(resnet18):
    with pytest.raises(EditError, match="no such module"):
        extract(resnet18, ["layer1", "layer9"])


def test_without_drops_top_level_modules_resnet_backbone(resnet18, x):
    backbone = without(resnet18, ["avgpool", "fc"])
    assert isinstance(backbone, nn.Sequential)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert list(backbone._modules) == names
    assert backbone.layer4 is resnet18.layer4  # the same modules, not copies
    assert backbone(x).shape == (2, 512, 2, 2)
    keys = list(backbone.state_dict())
    assert keys == [k for k in resnet18.state_dict() if not k.startswith(("fc.", "avgpool."))]


def test_without_an_unknown_name_is_an_edit_error(resnet18):
    with pytest.raises(EditError, match="no such module"):
        without(resnet18, ["avgpool", "classifier"])


# == heads ==============================================================================
@pytest.mark.parametrize(
    "name, head, in_features",
    [
        ("resnet18", "fc", 512),
        ("vgg11", "classifier.6", 4096),
        ("mobilenet_v3_small", "classifier.3", 1024),
        ("efficientnet_b0", "classifier.1", 1280),
        ("vit_b_16", "heads.head", 768),
        ("convnext_tiny", "classifier.2", 768),
    ],
)
def test_find_head_on_torchvision_models(name, head, in_features):
    model = _on_meta(name)
    assert find_head(model) == head
    assert get_module(model, head).in_features == in_features


class TimmLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.pre_logits = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)


class Nameless(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6))
        self.out = nn.Sequential(nn.Dropout(), nn.Linear(6, 2))


def test_find_head_head_attribute_and_last_linear():
    assert find_head(TimmLike()) == "head"
    assert find_head(Nameless()) == "out.1"
    heads = nn.Module()
    heads.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 2)])
    assert find_head(heads) == "heads.1"


def test_find_head_with_no_linear_is_an_edit_error():
    with pytest.raises(EditError, match="no classifier found"):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(EditError, match="no classifier found"):
        find_head(_on_meta("squeezenet1_1"))  # a conv classifier


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_b_16", "vgg11"])
def test_reset_head_keeps_the_input_width(name):
    model = _on_meta(name)
    path = find_head(model)
    old = get_module(model, path)
    got_path, new = reset_head(model, 7)
    assert got_path == path and get_module(model, path) is new
    assert isinstance(new, nn.Linear)
    assert (new.in_features, new.out_features) == (old.in_features, 7)
    assert (new.bias is None) == (old.bias is None)


def test_reset_head_on_a_live_model_runs(resnet18, x):
    path, new = reset_head(resnet18, 3)
    assert path == "fc"
    assert resnet18(x).shape == (2, 3)
    no_bias = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6, bias=False))
    _, new = reset_head(no_bias, 2)
    assert new.bias is None and no_bias(torch.randn(1, 4)).shape == (1, 2)


# == first conv =========================================================================
def _w(*shape: int, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def test_adapt_conv_weight_3_to_1_sums_the_channels():
    w = _w(8, 3, 5, 5)
    before = w.clone()
    out = adapt_conv_weight(w, 1)
    assert out.shape == (8, 1, 5, 5) and out.dtype == torch.float32
    assert torch.equal(out, w.sum(dim=1, keepdim=True))
    assert torch.equal(w, before)  # pure


def test_adapt_conv_weight_3_to_4_repeats_and_rescales():
    w = _w(8, 3, 3, 3)
    before = w.clone()
    out = adapt_conv_weight(w, 4)
    assert out.shape == (8, 4, 3, 3)
    for j in range(4):
        assert torch.allclose(out[:, j], w[:, j % 3] * 3 / 4, rtol=0, atol=1e-7)
    assert torch.equal(w, before)


def test_adapt_conv_weight_3_to_6_is_two_copies_at_half():
    w = _w(4, 3, 3, 3)
    out = adapt_conv_weight(w, 6)
    assert torch.equal(out[:, :3], w * 0.5) and torch.equal(out[:, 3:], w * 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_adapt_conv_weight_3_to_3_is_the_identity(dtype):
    w = _w(8, 3, 3, 3, dtype=dtype)
    out = adapt_conv_weight(w, 3)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_chans", [1, 4])
def test_adapt_conv_weight_keeps_half_dtypes(dtype, in_chans):
    w = _w(8, 3, 3, 3, dtype=dtype)
    out = adapt_conv_weight(w, in_chans)
    assert out.dtype == dtype
    reference = adapt_conv_weight(w.float(), in_chans).to(dtype)  # computed in float32, then cast
    assert torch.equal(out, reference)


def test_adapt_conv_weight_conv1d_and_conv3d_weights():
    assert adapt_conv_weight(_w(4, 3, 5), 1).shape == (4, 1, 5)
    assert adapt_conv_weight(_w(4, 3, 2, 2, 2), 4).shape == (4, 4, 2, 2, 2)


@pytest.mark.parametrize("shape", [(8,), (8, 3)])
def test_adapt_conv_weight_refuses_a_non_conv_weight(shape):
    with pytest.raises(ValueError, match="3 or more dims"):
        adapt_conv_weight(torch.zeros(shape), 1)


def test_first_conv_and_adapt_input(resnet18):
    assert first_conv(resnet18) == "conv1"
    w = resnet18.conv1.weight.detach().clone()
    assert adapt_input(resnet18, 1) == "conv1"
    conv = resnet18.conv1
    assert conv.in_channels == 1 and conv.out_channels == 64
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert torch.equal(conv.weight, w.sum(dim=1, keepdim=True))
    assert resnet18(torch.randn(1, 1, 32, 32)).shape == (1, 1000)


def test_adapt_input_refusals():
    with pytest.raises(EditError, match="no convolution"):
        adapt_input(nn.Sequential(nn.Linear(3, 3)), 1)
    with pytest.raises(EditError, match="grouped"):
        adapt_input(nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)), 1)
    with pytest.raises(BadArgument) as caught:
        adapt_input(nn.Sequential(nn.Conv2d(3, 3, 3)), 0)
    assert caught.value.param == "in_chans"


# == specs ==============================================================================
def test_parse_spec_nested_with_star():
    model = parse_spec("Sequential(Dropout(0.2), Linear(*, 10))", 512)
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[0], nn.Dropout) and model[0].p == 0.2
    assert (model[1].in_features, model[1].out_features) == (512, 10)


@pytest.mark.parametrize(
    "spec, check",
    [
        ("Linear(*,10)", lambda m: m.in_features == 64 and m.out_features == 10),
        ("Linear( * , 10, bias=False)", lambda m: m.in_features == 64 and m.bias is None),
        (
            "Linear(in_features=3, out_features=2, bias=False)",
            lambda m: m.in_features == 3 and m.bias is None,
        ),
        (
            "Conv2d(*, 8, (3, 5), stride=(2, 1), padding=1)",
            lambda m: m.kernel_size == (3, 5) and m.stride == (2, 1),
        ),
        ("LeakyReLU(-0.1)", lambda m: m.negative_slope == -0.1),
        ("Flatten(1, -1)", lambda m: (m.start_dim, m.end_dim) == (1, -1)),
        ("Unflatten(1, (2, 32))", lambda m: m.unflattened_size == (2, 32)),
        ("Conv2d(*, 4, 3, padding='same')", lambda m: m.padding == "same"),
        ("MaxPool2d([2, 2])", lambda m: list(m.kernel_size) == [2, 2]),
        ("Identity()", lambda m: isinstance(m, nn.Identity)),
        ("Dropout(p=0.5, inplace=True)", lambda m: m.p == 0.5 and m.inplace),
        ("Sequential(Sequential(Linear(*, 4), ReLU()), Linear(4, 2))", lambda m: m[0][0].in_features == 64),
        ("ModuleList([Linear(*, 2), Linear(2, 2)])", lambda m: m[0].in_features == 64 and len(m) == 2),
        (
            "BatchNorm1d(*, eps=1e-3, affine=False)",
            lambda m: m.num_features == 64 and m.eps == 1e-3 and m.weight is None,
        ),
    ],
)
def test_parse_spec_forms(spec, check):
    assert check(parse_spec(spec, 64)), spec


REFUSED_FORM = [
    "os.system('x')",
    "nn.Linear(2, 3)",
    "torch.nn.Linear(2, 3)",
    "Linear(2, 3).weight",
    "Linear(2, 3)()",
    "Linear",
    "",
    "lambda: Linear(2, 3)",
    "Linear(2, 3); import os",
    "Linear(2, 3) if True else None",
    "[Linear(2, 3)]",
]
REFUSED_ARGUMENT = [
    "Linear(1+1, 2)",
    "Linear(2, 10**3)",
    "Linear(2, (1,) * 3)",
    "Linear(*a)",
    "Linear(2, x)",
    "Linear(2, 3j)",
    "Linear(2, b'x')",
    "Linear(2, --3)",
    "Linear(2, {'a': 1})",
    "Linear(2, Linear)",
    "Linear(2, nn.Linear)",
    "Sequential(Linear(2, 2), os.system('x'))",
]
REFUSED_CLASS = [
    "__import__('os')",
    "eval('1')",
    "exec('import os')",
    "open('x', 'w')",
    "getattr(Linear, 'x')",
    "Foo(1)",
    "Parameter(1)",
    "Sequential(Linear(2, 2), __import__('os'))",
    "Sequential(print('x'))",
    "functional(1)",
    "init(1)",
]


@pytest.mark.parametrize("spec", REFUSED_FORM + REFUSED_ARGUMENT + REFUSED_CLASS)
def test_parse_spec_refusals_are_one_line_edit_errors_naming_the_form(spec):
    with pytest.raises(EditError) as info:
        parse_spec(spec, 8)
    err = info.value
    assert err.where == spec
    assert "\n" not in str(err)
    assert SPEC_FORM in err.message, err.message
    assert err.exit_code == 2


def test_parse_spec_refusal_kinds_say_what_is_wrong():
    def message(spec: str) -> str:
        with pytest.raises(EditError) as info:
            parse_spec(spec, 8)
        return info.value.message

    assert message("Linear(**{'in_features': 2})").startswith("no ** in a spec")
    assert message("Linear(1+1, 2)").startswith("only literals and nested specs")
    assert message("__import__('os')").startswith("'__import__' is not a torch.nn module class")
    assert message("Foo(1)").startswith("'Foo' is not a torch.nn module class")
    assert message("nn.Linear(2, 3)").startswith("not a module spec")


def test_parse_spec_star_without_a_width():
    with pytest.raises(EditError) as info:
        parse_spec("Sequential(Dropout(0.2), Linear(*, 10))")
    assert "`*`" in info.value.message and "width" in info.value.message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec, complaint",
    [
        ("Linear(2)", "out_features"),
        ("Linear(2, 3, nonsense=1)", "nonsense"),
        ("Conv2d(3, 8, 3, padding='nope')", "padding"),
        ("MultiheadAttention(7, 2)", "divisible"),
    ],
)
def test_parse_spec_class_refusing_its_arguments(spec, complaint):
    with pytest.raises(EditError) as info:
        parse_spec(spec, 8)
    msg = info.value.message
    assert "cannot be built" in msg and complaint in msg
    assert msg.startswith(spec.partition("(")[0])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [
        "Linear(open('MARKER', 'w'), 2)",
        "__import__('pathlib').Path('MARKER').touch()",
        "Sequential(Linear(2, 2), open('MARKER', 'w'))",
        "Linear(2, 2, bias=open('MARKER', 'w'))",
        "Linear(2, [open('MARKER', 'w')])",
        "Linear(*, 2, device=__import__('pathlib').Path('MARKER').touch())",
    ],
)
def test_parse_spec_never_evaluates_anything(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EditError):
        parse_spec(spec, 8)
    assert not (tmp_path / "MARKER").exists()
    assert list(tmp_path.iterdir()) == []


# == input_width ========================================================================
@pytest.mark.parametrize(
    "module, width",
    [
        (nn.Linear(7, 3), 7),
        (nn.Conv2d(5, 8, 3), 5),
        (nn.BatchNorm2d(16), 16),
        (nn.LayerNorm(32), 32),
        (nn.Sequential(nn.Dropout(), nn.Flatten(), nn.Linear(9, 2)), 9),
        (nn.MultiheadAttention(8, 2), 8),
        (nn.ReLU(), None),
        (nn.Identity(), None),
        (nn.LayerNorm((4, 5)), None),
    ],
)
def test_input_width(module, width):
    assert input_width(module) == width


def test_input_width_of_real_modules(resnet18):
    assert input_width(resnet18.fc) == 512
    assert input_width(resnet18.layer2) == 64
    assert input_width(resnet18) == 3


# == Edit records =======================================================================
@pytest.mark.parametrize(
    "edit",
    [
        Edit("replace", "fc", "Linear(*, 2)"),
        Edit("add", "classifier.7", "ReLU()"),
        Edit("delete", "classifier.5"),
        Edit("rename", "fc", "head"),
        Edit("extract", spec="features"),
        Edit("without", spec="avgpool,fc"),
        Edit("num_classes", value=10),
        Edit("in_chans", value=1),
    ],
)
def test_edit_json_round_trip(edit):
    import json

    doc = json.loads(json.dumps(edit.to_json()))
    assert Edit.from_json(doc) == edit
    assert str(edit)


def test_apply_each_op_on_resnet18(resnet18, x):
    model, created, text = apply(resnet18, Edit("replace", "fc", "Sequential(Dropout(0.2), Linear(*, 10))"))
    assert created == ["fc"] and "replaced fc (Linear)" in text
    assert model.fc[1].in_features == 512 and model(x).shape == (2, 10)
    model, created, _ = apply(model, Edit("num_classes", value=4))
    assert created == ["fc.1"] and model(x).shape == (2, 4)
    model, created, _ = apply(model, Edit("rename", "fc", "head"))
    assert created == [] and "head.1.weight" in model.state_dict()
    model, _, _ = apply(model, Edit("delete", "maxpool"))
    assert isinstance(model.maxpool, nn.Identity)
    model, _, text = apply(model, Edit("in_chans", value=1))
    assert "1 input channel" in text and model.conv1.in_channels == 1
    backbone, _, _ = apply(model, Edit("without", spec="avgpool, head"))
    assert backbone(torch.randn(1, 1, 64, 64)).shape == (1, 512, 4, 4)
    layer, _, _ = apply(model, Edit("extract", spec="layer1"))
    assert layer is model.layer1
    with pytest.raises(EditError, match="unknown edit"):
        apply(model, Edit("explode", "fc"))


# == property: delete then add back keeps the model runnable ============================
@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=6),
    data=st.data(),
)
def test_delete_then_add_back_round_trips(widths, data):
    torch.manual_seed(0)
    model = stack(*widths)
    x = torch.randn(3, widths[0])
    before = model(x)
    names = list(model._modules)
    k = data.draw(st.integers(0, len(model) - 1), label="index")
    removed = model[k]
    assert delete(model, str(k)) == "removed"
    assert len(model) == len(names) - 1 and removed not in list(model)
    add(model, str(k), removed)
    assert list(model._modules) == names and model[k] is removed
    assert torch.equal(model(x), before)

    # the same through specs: delete, then add a fresh module of the same kind at that index
    delete(model, str(k))
    spec = (
        f"Linear({removed.in_features}, {removed.out_features})"
        if isinstance(removed, nn.Linear)
        else "ReLU()"
    )
    apply(model, Edit("add", str(k), spec))
    assert list(model._modules) == names
    assert model(x).shape == before.shape


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=3, max_size=6),
    data=st.data(),
)
def test_deleting_any_activation_or_same_width_linear_keeps_it_running(widths, data):
    torch.manual_seed(0)
    model = stack(*widths)
    removable = [
        i for i, m in enumerate(model) if not isinstance(m, nn.Linear) or m.in_features == m.out_features
    ]
    if not removable:
        return
    k = data.draw(st.sampled_from(removable), label="index")
    delete(model, str(k))
    assert model(torch.randn(2, widths[0])).shape == (2, widths[-1])
