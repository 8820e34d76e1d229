"""The check that runs both models (`surgery/models/check.py`): outputs on one seeded probe
compared, and the first diverging module named.

Real models with seeded random weights, tiny configurations: torchvision resnet18 and
VisionTransformer, a transformers GPT-2, a timm ViT, and small modules written here for
what real models do not show in isolation (a nanoGPT-style `(logits, loss)` output, a module
called twice, a forward that raises).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import surgery
from surgery.errors import BadArgument
from surgery.models.check import CheckResult, ProbeFailed, check, make_probe

IMAGES_64 = (2, 3, 64, 64)  # resnet18 runs on any size: 64 pixels keep its tests fast


def _perturbed(model: nn.Module, name: str, scale: float = 0.5) -> nn.Module:
    """A copy of `model` with seeded noise added to one parameter (noise, not a constant:
    a constant added to a weight behind a LayerNorm cancels out)."""
    other = copy.deepcopy(model)
    param = other.get_parameter(name)
    noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        param.add_(noise * scale)
    return other


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def resnet_conv_perturbed(resnet) -> nn.Module:
    return _perturbed(resnet, "layer2.0.conv1.weight")


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


class TinyGPT(nn.Module):
    """nanoGPT's shape in small: token and position embeddings, one linear head, and a
    forward returning `(logits, loss)`."""

    def __init__(self, vocab: int = 50, positions: int = 8, width: int = 16):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(positions, width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        positions = torch.arange(idx.shape[-1])
        return self.lm_head(self.wte(idx) + self.wpe(positions)), None


class SharedTwice(nn.Module):
    """One linear layer called twice, a bare parameter scaling in between."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x) * self.scale)


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shapes do not fit\nsecond line of the message\nthird")


class Wrapped(nn.Module):
    """The same network under another path, as a training framework wraps it."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


# -- vision ---------------------------------------------------------------------------------
def test_two_resnet18_with_one_state_dict_pass_exactly(resnet):
    result = check(resnet, copy.deepcopy(resnet), probe_shape=IMAGES_64)

    assert result.passed
    assert (result.max_abs, result.max_rel) == (0.0, 0.0)
    assert result.source_shape == result.target_shape == (2, 10)
    assert result.first_divergence is None
    # conv, bn, each block and stage, downsample, fc: every module with parameters but the model
    assert result.compared == 56 and result.skipped == 0
    assert result.summary() == (
        "outputs equal within atol 1e-05, rtol 0.0001 (max abs 0, max rel 0); 56 module pairs compared"
    )


def test_a_perturbed_conv_is_named_as_the_first_divergence(resnet, resnet_conv_perturbed):
    result = check(resnet, resnet_conv_perturbed, probe_shape=IMAGES_64)

    assert not result.passed
    assert result.max_abs > 1e-3
    divergence = result.first_divergence
    assert (divergence.source, divergence.target) == ("layer2.0.conv1", "layer2.0.conv1")
    assert divergence.max_abs > 1e-3
    assert result.summary().startswith("outputs differ: max abs ")
    assert "; first divergence at layer2.0.conv1, max abs " in result.summary()


def test_a_vision_model_gets_images_of_its_first_convs_channels_at_224(resnet):
    images, probe = make_probe(resnet, resnet)

    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.float32
    assert (probe.kind, probe.shape, probe.dtype, probe.seed) == ("images", (2, 3, 224, 224), "float32", 0)
    assert probe.describe() == "images float32 [2, 3, 224, 224], seed 0"


def test_the_probe_is_the_seeds_own(resnet):
    first, _ = make_probe(resnet, resnet, probe_shape=IMAGES_64, seed=3)
    again, _ = make_probe(resnet, resnet, probe_shape=IMAGES_64, seed=3)
    other, _ = make_probe(resnet, resnet, probe_shape=IMAGES_64, seed=4)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_torchvision_vit_gets_a_probe_at_its_image_size(tv_vit):
    result = check(tv_vit, copy.deepcopy(tv_vit))

    assert result.passed and result.max_abs == 0.0
    assert result.probe.shape == (2, 3, 32, 32)
    # out_proj's weights are used by MultiheadAttention's functional call: never run, skipped
    assert result.skipped == 2 and result.compared > 10


def test_a_timm_vit_gets_a_probe_at_its_image_size():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_heads=2,
        embed_dim=32,
        num_classes=10,
    )
    result = check(vit, copy.deepcopy(vit))

    assert result.passed
    assert result.probe.shape == (2, 3, 32, 32)
    assert result.compared > 10


# -- language models --------------------------------------------------------------------------
def test_a_gpt2_against_its_copy_passes_on_token_ids_in_its_vocabulary(gpt2):
    ids, probe = make_probe(gpt2, gpt2)
    result = check(gpt2, copy.deepcopy(gpt2))

    assert ids.dtype == torch.int64 and ids.shape == (2, 16)
    assert int(ids.min()) >= 0 and int(ids.max()) < 100
    assert probe.describe() == "token ids int64 [2, 16] in [0, 100), seed 0"
    assert result.passed and result.max_abs == 0.0
    assert result.source_shape == (2, 16, 100)  # the logits of the model output
    assert result.compared > 20


def test_a_perturbed_gpt2_mlp_is_named_as_the_first_divergence(gpt2):
    result = check(gpt2, _perturbed(gpt2, "transformer.h.1.mlp.c_fc.weight"))

    assert not result.passed
    assert result.first_divergence.target == "transformer.h.1.mlp.c_fc"
    assert "first divergence at transformer.h.1.mlp.c_fc, max abs" in result.summary()


def test_token_ids_fit_the_smaller_vocabulary_and_the_position_count():
    small, large = TinyGPT(vocab=30, positions=8), TinyGPT(vocab=50, positions=12)
    ids, probe = make_probe(large, small, seed=0)

    assert probe.kind == "tokens" and probe.high == 30
    assert ids.shape == (2, 8)  # at most the 8 positions the smaller model takes
    assert int(ids.max()) < 30
    with pytest.raises(BadArgument, match="9 tokens, but the models take at most 8 positions") as error:
        make_probe(large, small, probe_shape=(2, 9))
    assert error.value.param == "probe_shape"


def test_a_nanogpt_style_tuple_output_is_compared_by_its_logits():
    torch.manual_seed(0)
    model = TinyGPT()
    result = check(model, copy.deepcopy(model))
    changed = check(model, _perturbed(model, "lm_head.weight"))

    assert result.passed and result.source_shape == (2, 8, 50)
    assert not changed.passed and changed.first_divergence.target == "lm_head"


def test_a_dict_probe_is_passed_as_keyword_arguments(gpt2):
    ids = torch.arange(12).reshape(2, 6)
    result = check(gpt2, copy.deepcopy(gpt2), probe={"input_ids": ids, "labels": ids})

    # the logits compared, not the loss the output holds first when given labels
    assert result.passed and result.source_shape == (2, 6, 100)
    assert result.probe.describe() == "the given input_ids, labels: int64 [2, 6]"


# -- which modules are compared ------------------------------------------------------------
def test_a_layout_changed_module_is_skipped(resnet, resnet_conv_perturbed):
    plain = check(resnet, resnet_conv_perturbed, probe_shape=IMAGES_64)
    result = check(resnet, resnet_conv_perturbed, probe_shape=IMAGES_64, layout_changed=["layer2.0.conv1"])

    assert result.first_divergence.target == "layer2.0.bn1"  # the next module to run
    assert (result.compared, result.skipped) == (plain.compared - 1, plain.skipped + 1)


def test_modules_pairs_paths_that_differ(resnet, resnet_conv_perturbed):
    wrapped = Wrapped(resnet_conv_perturbed)
    pairs = {name: f"backbone.{name}" for name in ("conv1", "layer1.0.conv1", "layer2.0.conv1", "fc")}
    result = check(resnet, wrapped, modules=pairs, probe_shape=IMAGES_64)

    assert (result.compared, result.skipped) == (4, 0)
    assert (result.first_divergence.source, result.first_divergence.target) == (
        "layer2.0.conv1",
        "backbone.layer2.0.conv1",
    )
    assert "first divergence at backbone.layer2.0.conv1 (source layer2.0.conv1), max abs" in result.summary()
    # without pairs, the two models share no path: nothing to compare, the outputs still are
    assert check(resnet, Wrapped(resnet), probe_shape=IMAGES_64).compared == 0


def test_a_shared_module_is_compared_at_its_first_call():
    torch.manual_seed(0)
    model = SharedTwice()
    other = _perturbed(model, "scale")
    result = check(model, other, probe_shape=(2, 8))

    assert not result.passed
    assert result.compared == 1  # `shared`, whose first call saw the same input
    assert result.first_divergence is None
    assert "; no compared module diverges; 1 module pair compared" in result.summary()


def test_other_output_shapes_fail_clearly(resnet):
    two_classes = torchvision.models.resnet18(weights=None, num_classes=2)
    kept = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    two_classes.load_state_dict(kept, strict=False)
    result = check(resnet, two_classes, probe_shape=IMAGES_64)

    assert not result.passed
    assert result.max_abs is None and result.max_rel is None
    assert (result.source_shape, result.target_shape) == ((2, 10), (2, 2))
    assert result.first_divergence is None  # fc's outputs have other shapes: skipped
    assert (result.compared, result.skipped) == (55, 1)
    assert result.summary() == (
        "outputs differ in shape: source [2, 10], target [2, 2]; no compared module diverges; "
        "55 module pairs compared, 1 skipped"
    )
    assert json.loads(json.dumps(result.to_json(), allow_nan=False))["max_abs"] is None


# -- the result -----------------------------------------------------------------------------
def test_to_json_is_plain_json(resnet, resnet_conv_perturbed):
    result = check(resnet, resnet_conv_perturbed, probe_shape=IMAGES_64)
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))

    assert document["passed"] is False
    assert document["summary"] == result.summary()
    assert document["output_shape"] == {"source": [2, 10], "target": [2, 10]}
    assert document["probe"] == {
        "kind": "images",
        "shape": [2, 3, 64, 64],
        "dtype": "float32",
        "seed": 0,
        "high": None,
        "names": [],
    }
    assert document["first_divergence"]["target"] == "layer2.0.conv1"
    assert document["first_divergence"]["max_abs"] == result.first_divergence.max_abs
    assert isinstance(result, CheckResult)


def test_hooks_are_removed_and_modes_restored(resnet):
    source, target = copy.deepcopy(resnet).train(), copy.deepcopy(resnet).train()
    target.layer1.eval()  # a mixed model keeps its mix
    modes = [m.training for m in target.modules()]
    check(source, target, probe_shape=IMAGES_64)

    assert _no_hooks(source) and _no_hooks(target)
    assert source.training and all(m.training for m in source.modules())
    assert [m.training for m in target.modules()] == modes


def test_eval_mode_makes_dropout_still():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    result = check(model, copy.deepcopy(model))

    assert result.passed and result.max_abs == 0.0
    assert result.probe.kind == "values" and result.probe.shape == (2, 8)


# -- errors --------------------------------------------------------------------------------
def test_a_model_that_raises_gives_one_line_naming_it_and_the_probe(resnet):
    raising = Raises().train()
    with pytest.raises(ProbeFailed) as error:
        check(resnet, raising, probe_shape=IMAGES_64)

    assert str(error.value) == (
        "target model Raises: fails on images float32 [2, 3, 64, 64], seed 0: RuntimeError: shapes do not fit"
    )
    assert error.value.exit_code == 2 and error.value.hint
    assert _no_hooks(raising) and _no_hooks(resnet)
    assert raising.training


def test_a_vit_given_another_image_size_fails_in_one_line(resnet, tv_vit):
    with pytest.raises(ProbeFailed, match=r"^target model VisionTransformer: fails on images") as error:
        check(resnet, tv_vit, probe_shape=IMAGES_64)

    assert "\n" not in str(error.value)
    assert _no_hooks(tv_vit)


def test_a_model_returning_no_tensor_is_refused():
    class Nothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return {"note": "no tensor here"}

    with pytest.raises(ProbeFailed, match="source model Nothing: returned dict, which holds no tensor"):
        check(Nothing(), Nothing())


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"atol": -1.0}, "atol", "a tolerance is a number >= 0, got -1.0"),
        ({"rtol": float("nan")}, "rtol", "a tolerance is a number >= 0, got nan"),
        ({"modules": {"layer9": "fc"}}, "modules", "the source ResNet has no module 'layer9'"),
        ({"modules": {"fc": "head"}}, "modules", "the target ResNet has no module 'head'"),
        ({"modules": [("fc", "fc")]}, "modules", "a mapping of source to target module paths, got list"),
        ({"layout_changed": ["nowhere"]}, "layout_changed", "the target ResNet has no module 'nowhere'"),
        ({"probe": [1, 2]}, "probe", "a tensor or a dict of keyword arguments, got list"),
        ({"probe": torch.zeros(1, 3, 8, 8), "probe_shape": (1, 3, 8, 8)}, "probe_shape", "not both"),
        ({"probe_shape": (2, 0, 8)}, "probe_shape", "sizes are whole numbers >= 1, got [2, 0, 8]"),
        ({"probe_shape": "2,3"}, "probe_shape", "a list of sizes"),
    ],
)
def test_bad_arguments_are_refused_naming_them(resnet, kwargs, param, message):
    source, target = copy.deepcopy(resnet), copy.deepcopy(resnet)
    with pytest.raises(BadArgument) as error:
        check(source, target, **kwargs)

    assert error.value.param == param
    assert message in error.value.message
    assert "\n" not in str(error.value)
    assert _no_hooks(source) and _no_hooks(target)


def test_models_taking_other_inputs_are_refused(resnet):
    with pytest.raises(BadArgument, match="takes images, the target TinyGPT tokens") as error:
        check(resnet, TinyGPT())
    assert error.value.param == "probe"


def test_a_model_with_no_telling_first_layer_needs_a_probe_shape():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(BadArgument, match="cannot tell what input Sequential takes"):
        check(model, model)
    assert check(model, model, probe_shape=(3, 8)).passed


# -- the package ----------------------------------------------------------------------------
def test_surgery_check_stays_the_function_and_imports_no_torch():
    code = (
        "import sys, surgery\n"
        "first, again = surgery.check, surgery.check\n"
        "assert callable(first) and first is again, (first, again)\n"
        "assert surgery.CheckResult.__name__ == 'CheckResult'\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert surgery.check is check


def test_equal_outputs_from_modules_that_differ_fail(tv_vit):
    """torchvision's ViT starts with a zero head: every model of it outputs zeros. A wrong
    port still changes the modules compared, and that fails the check."""
    assert not tv_vit.heads.head.weight.any()
    other = copy.deepcopy(tv_vit)
    with torch.no_grad():
        other.encoder.layers[0].mlp[0].weight.add_(torch.randn_like(other.encoder.layers[0].mlp[0].weight))
    result = check(tv_vit, other)
    assert result.max_abs == 0 and not result.passed
    assert result.first_divergence is not None
    assert result.first_divergence.target == "encoder.layers.encoder_layer_0.mlp.0"
    assert result.constant and "but modules differ" in result.summary()
    assert "the source's output is constant" in result.summary()
