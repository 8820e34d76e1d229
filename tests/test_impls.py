"""Implementations of the same network, the key mappings between them, and the presets.

Each mapping is written here in plain torch (renames, transposes, the rotary row
permutation) and proved by the outputs it gives. Each preset is then planned by surgery's
own engine (`read_preset`, `plan_port`: what `surgery port --preset --dry-run` shows),
which must fill exactly the target's keys, in its shapes, from every key of the source;
`test_presets.py` runs the presets end to end through the CLI, with `--check`.
Models are tiny and seeded, never downloaded; every parameter is moved off its init, so that
norms and biases are not constants a wrong mapping could hide behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn

from surgery.commands.maps import PRESETS as PRESET_FOLDER
from surgery.commands.maps import read_preset
from surgery.commands.port import rule_values
from surgery.models import transforms
from surgery.models.targets import target_of_module
from surgery.plans.match import PortOptions, PortPlan, plan_port
from surgery.values import Entry, both_ways
from tests.impls import MetaLlama, NanoGPT, gpt2_config, llama_config

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported (inside the builders)

GPT = {"n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 64, "block_size": 32}
# grouped-query (4 heads, 2 kv heads); Meta's ffn rule gives 96 (2/3 of 4 * 32 = 85, rounded up
# to 16); eps and theta unlike transformers' defaults, so the config must carry them.
LLAMA = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "multiple_of": 16}
LLAMA |= {"norm_eps": 1e-5, "rope_theta": 500000.0, "max_seq_len": 32}
TV_VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
TIMM_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "num_heads": 2, "embed_dim": 32, "mlp_ratio": 2}
Builder = Callable[[int], nn.Module]  # a seed -> the model, seeded and perturbed
Source = Callable[[Builder], nn.Module]  # the `source` fixture


# -- models -------------------------------------------------------------------------------
def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """The model in eval mode with every parameter (a tied one once) and batch-norm statistic
    moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(1 + torch.rand(b.shape, generator=g))
    return model.eval()


def nanogpt(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(NanoGPT(**GPT), seed)


def hf_gpt2(seed: int) -> nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return perturbed(GPT2LMHeadModel(gpt2_config(**GPT)), seed)


def meta_llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(MetaLlama(**LLAMA), seed)


def hf_llama(seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return perturbed(LlamaForCausalLM(llama_config(**LLAMA)), seed)


def tv_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(torchvision.models.VisionTransformer(**TV_VIT, num_classes=10), seed)


def timm_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **TIMM_VIT, num_classes=10)
    return perturbed(model, seed)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """The model in eval mode with the batch-norm statistics of one seeded batch (with the
    init's unit statistics a perturbed resnet50's outputs grow to 1e12)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def tv_resnet50(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return with_batch_statistics(perturbed(torchvision.models.resnet50(weights=None), seed))


def timm_resnet50(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return with_batch_statistics(perturbed(timm.create_model("resnet50", pretrained=False), seed))


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    torch.testing.assert_close(outputs(a, x), outputs(b, x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    """A builder's model of seed 0, built once a module: sources are read, never loaded into."""
    built: dict[Builder, nn.Module] = {}

    def build(builder: Builder) -> nn.Module:
        if builder not in built:
            built[builder] = builder(0)
        return built[builder]

    yield build
    built.clear()


# -- the mappings, written out in plain torch -----------------------------------------------
def layer_names(
    outer: dict[str, str], per_layer: dict[str, str], src: str, dst: str, n: int
) -> dict[str, str]:
    """Each key's name on the other side: `outer` as given, `per_layer` under every layer's prefix."""
    layers = {f"{src}{i}.{a}": f"{dst}{i}.{b}" for i in range(n) for a, b in per_layer.items()}
    return outer | layers


def inverse(names: dict[str, str]) -> dict[str, str]:
    return {b: a for a, b in names.items()}


def renamed(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    return {names[k]: v for k, v in state.items()}


CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def hf_gpt2_to_nanogpt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D holds (in, out), nn.Linear (out, in); every name stays."""
    return {k: v.t() if CONV1D.fullmatch(k) else v for k, v in state.items()}


META_TO_HF = layer_names(
    {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    | {"output.weight": "lm_head.weight"},
    {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    },
    "layers.",
    "model.layers.",
    LLAMA["n_layers"],
)


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> transformers' halves, within each head
    (`permute` in transformers' convert_llama_weights_to_hf.py)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_llama_to_hf(
    state: dict[str, torch.Tensor], q_heads: int, kv_heads: int, *, permute: bool = True
) -> dict[str, torch.Tensor]:
    heads = {"attention.wq.weight": q_heads, "attention.wk.weight": kv_heads} if permute else {}
    out = {}
    for key, value in state.items():
        n = next((n for suffix, n in heads.items() if key.endswith(suffix)), None)
        out[META_TO_HF[key]] = value if n is None else permute_rope(value, n)
    return out


def hf_llama_to_meta(state: dict[str, torch.Tensor], q_heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    heads = {"self_attn.q_proj.weight": q_heads, "self_attn.k_proj.weight": kv_heads}
    out = {}
    for key, value in state.items():
        n = next((n for suffix, n in heads.items() if key.endswith(suffix)), None)
        out[inverse(META_TO_HF)[key]] = value if n is None else unpermute_rope(value, n)
    return out


TV_TO_TIMM_VIT = layer_names(
    {
        "class_token": "cls_token",
        "encoder.pos_embedding": "pos_embed",
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "encoder.ln.weight": "norm.weight",
        "encoder.ln.bias": "norm.bias",
        "heads.head.weight": "head.weight",
        "heads.head.bias": "head.bias",
    },
    {
        "ln_1.weight": "norm1.weight",
        "ln_1.bias": "norm1.bias",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj.weight": "attn.proj.weight",
        "self_attention.out_proj.bias": "attn.proj.bias",
        "ln_2.weight": "norm2.weight",
        "ln_2.bias": "norm2.bias",
        "mlp.0.weight": "mlp.fc1.weight",
        "mlp.0.bias": "mlp.fc1.bias",
        "mlp.3.weight": "mlp.fc2.weight",
        "mlp.3.bias": "mlp.fc2.bias",
    },
    "encoder.layers.encoder_layer_",
    "blocks.",
    TV_VIT["num_layers"],
)


# -- the hand-written conversions ---------------------------------------------------------
def test_hf_gpt2_into_nanogpt_transposes_the_four_conv1d_weights_and_keeps_every_name(source: Source) -> None:
    hf = source(hf_gpt2)
    nano = nanogpt(1)
    assert list(nano.state_dict()) == list(hf.state_dict())
    nano.load_state_dict(hf_gpt2_to_nanogpt(hf.state_dict()))
    assert nano.lm_head.weight is nano.transformer.wte.weight
    assert_same_outputs(nano, hf, tokens())


def test_hf_gpt2_into_nanogpt_without_transposing_the_square_c_proj_gives_other_logits(
    source: Source,
) -> None:
    hf = source(hf_gpt2)
    nano = nanogpt(1)
    state = hf_gpt2_to_nanogpt(hf.state_dict())
    state["transformer.h.0.attn.c_proj.weight"] = hf.state_dict()["transformer.h.0.attn.c_proj.weight"]
    nano.load_state_dict(state)
    assert (outputs(nano, tokens()) - outputs(hf, tokens())).abs().max() > 1e-3


def test_meta_llama_into_hf_llama_renames_and_permutes_the_rotary_rows(source: Source) -> None:
    meta = source(meta_llama)
    hf = hf_llama(1)
    hf.load_state_dict(meta_llama_to_hf(meta.state_dict(), LLAMA["n_heads"], LLAMA["n_kv_heads"]))
    assert_same_outputs(hf, meta, tokens())


def test_hf_llama_back_into_meta_llama_is_bit_identical(source: Source) -> None:
    meta = source(meta_llama)
    heads = LLAMA["n_heads"], LLAMA["n_kv_heads"]
    back = hf_llama_to_meta(meta_llama_to_hf(meta.state_dict(), *heads), *heads)
    assert list(back) == list(meta.state_dict())
    assert all(torch.equal(back[k], v) for k, v in meta.state_dict().items())


@pytest.mark.parametrize(
    ("kv_heads", "permute"),
    [(LLAMA["n_kv_heads"], False), (LLAMA["n_heads"], True)],
    ids=["no-rotary-permutation", "wk-permuted-with-the-query-heads"],
)
def test_meta_llama_into_hf_llama_gives_other_logits_with_a_wrong_permutation(
    source: Source, kv_heads: int, permute: bool
) -> None:
    meta = source(meta_llama)
    hf = hf_llama(1)
    hf.load_state_dict(meta_llama_to_hf(meta.state_dict(), LLAMA["n_heads"], kv_heads, permute=permute))
    assert (outputs(hf, tokens()) - outputs(meta, tokens())).abs().max() > 1e-3


def test_torchvision_vit_and_timm_vit_of_one_configuration_agree_on_what_is_not_a_weight(
    source: Source,
) -> None:
    tv, tm = source(tv_vit), source(timm_vit)
    assert tm.global_pool == "token" and isinstance(tm.fc_norm, nn.Identity)  # the class token's output
    assert tm.num_prefix_tokens == 1 and not tm.no_embed_class  # one class token, inside pos_embed
    assert tm.blocks[0].norm1.eps == tv.encoder.layers[0].ln_1.eps == tm.norm.eps == tv.encoder.ln.eps == 1e-6
    assert tm.blocks[0].attn.qkv.bias is not None and isinstance(tm.blocks[0].ls1, nn.Identity)


@pytest.mark.parametrize(
    ("src", "dst", "names"),
    [(tv_vit, timm_vit, TV_TO_TIMM_VIT), (timm_vit, tv_vit, inverse(TV_TO_TIMM_VIT))],
    ids=["torchvision-to-timm", "timm-to-torchvision"],
)
def test_vit_renamed_between_torchvision_and_timm_gives_the_same_outputs(
    source: Source, src: Builder, dst: Builder, names: dict[str, str]
) -> None:
    model, into = source(src), dst(1)
    into.load_state_dict(renamed(model.state_dict(), names))
    assert_same_outputs(into, model, images())


def test_torchvision_resnet50_and_timm_resnet50_share_every_key_and_give_the_same_outputs(
    source: Source,
) -> None:
    tv, into = source(tv_resnet50), timm_resnet50(1)
    assert [(k, v.shape) for k, v in tv.state_dict().items()] == [
        (k, v.shape) for k, v in into.state_dict().items()
    ]
    into.load_state_dict(tv.state_dict())
    assert_same_outputs(into, tv, images(64))


# -- the presets, planned by surgery's own engine -----------------------------------------
@dataclass(frozen=True)
class Pair:
    """A preset, the models on both sides, the target's keyword arguments (what its rules'
    `"{name}"` parameters may name, as a target spec gives them), and keys real checkpoints
    of the source hold that the target has no use for (the preset must drop them)."""

    preset: str
    source: Builder
    target: Builder
    target_kwargs: dict[str, Any] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


PAIRS = [
    Pair("torchvision-vit-to-timm", tv_vit, timm_vit),
    Pair("timm-vit-to-torchvision", timm_vit, tv_vit),
    Pair(
        "gpt2-hf-to-nanogpt",
        hf_gpt2,
        nanogpt,
        GPT,
        ("transformer.h.0.attn.bias", "transformer.h.1.attn.masked_bias"),
    ),
    Pair("llama-meta-to-hf", meta_llama, hf_llama, dropped=("rope.freqs",)),
    Pair("llama-hf-to-meta", hf_llama, meta_llama, LLAMA, ("model.layers.1.self_attn.rotary_emb.inv_freq",)),
    Pair("torchvision-resnet-to-timm", tv_resnet50, timm_resnet50),
    Pair("timm-resnet-to-torchvision", timm_resnet50, tv_resnet50),
]
PAIR = pytest.mark.parametrize("pair", PAIRS, ids=[p.preset for p in PAIRS])


def planned(pair: Pair, model: nn.Module, into: nn.Module, extra: tuple[str, ...] = ()) -> PortPlan:
    """What `surgery port --preset` plans for `model`'s state_dict (and `extra` keys) into
    `into`, as its `--dry-run` shows it: the preset read and bound by the engine, the keys
    no rule takes matched by name, tied weights (GPT-2's lm_head) known on both sides."""
    target, saved = target_of_module(into, pair.preset, pair.target_kwargs), target_of_module(model)
    source = saved.entries + [Entry(k, (1,), "float32") for k in extra]
    options = PortOptions(
        match="exact", rules=(read_preset(pair.preset),), rule_args=tuple(rule_values(target).items())
    )
    return plan_port(source, target.entries, options, both_ways(target.aliases()), both_ways(saved.aliases()))


def filled(plan: PortPlan) -> set[str]:
    return {m.target for m in plan.matched} | {t for t, _ in plan.tied}


def test_every_preset_file_is_proved_here() -> None:
    assert sorted(p.stem for p in PRESET_FOLDER.glob("*.toml")) == sorted(p.preset for p in PAIRS)
    assert [p.name for p in PRESET_FOLDER.iterdir() if p.suffix != ".toml"] == []


@PAIR
def test_preset_fills_every_target_key_from_every_source_key_in_the_targets_shapes(
    pair: Pair, source: Source
) -> None:
    model, target = source(pair.source), source(pair.target)
    plan = planned(pair, model, target)
    assert plan.complete and not plan.unused, plan.steps  # nothing missing, unexpected or mismatched
    assert filled(plan) == set(target.state_dict())


@pytest.mark.parametrize("pair", [p for p in PAIRS if p.dropped], ids=[p.preset for p in PAIRS if p.dropped])
def test_preset_drops_what_real_checkpoints_of_the_source_hold_beyond_the_weights(
    pair: Pair, source: Source
) -> None:
    model, target = source(pair.source), source(pair.target)
    plan = planned(pair, model, target, pair.dropped)
    assert plan.complete and sorted(plan.unused) == sorted(pair.dropped)
    assert filled(plan) == set(target.state_dict())


def test_the_engines_rotary_permutation_is_transformers_conversion_scripts(source: Source) -> None:
    """`permute_rope` here is transformers' convert_llama_weights_to_hf.py; the presets run
    the engine's, which must be the same, and its inverse the inverse."""
    wk = source(meta_llama).state_dict()["layers.0.attention.wk.weight"]
    heads = LLAMA["n_kv_heads"]
    assert torch.equal(transforms.permute_rope(wk, heads), permute_rope(wk, heads))
    assert torch.equal(transforms.unpermute_rope(permute_rope(wk, heads), heads), wk)
