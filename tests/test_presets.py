"""The presets end to end, through the real CLI: seeded checkpoints of one implementation,
saved as their users hold them (torch.save, safetensors, save_pretrained), ported with
`surgery port --preset` into another implementation, with `--check` running both models.

Every port that passes is also proved outside surgery: the output loaded into a fresh model
of the target's library (seeded otherwise, so that equal outputs are the port's doing) gives
the source model's outputs. Wrong rules must be caught by `--check`, naming the module.
Models are tiny and perturbed off their init (`test_impls.perturbed`): torchvision's ViT head
starts at zero, and a model whose outputs are all zero passes any check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import ROOT, SavedResnet18, assert_clean_error, run_cli, run_subprocess
from safetensors.torch import load_file, save_file
from test_impls import (
    GPT,
    LLAMA,
    TIMM_VIT,
    TV_VIT,
    hf_gpt2,
    images,
    meta_llama,
    nanogpt,
    outputs,
    timm_vit,
    tokens,
    tv_vit,
)
from torch import nn

from surgery.commands.maps import PRESETS as PRESET_FOLDER
from surgery.commands.maps import preset_names, read_preset
from tests.impls import llama_config

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported (inside the builders)


def spec(base: str, **kwargs: object) -> str:
    return base + "?" + "&".join(f"{k}={v}" for k, v in kwargs.items())


TV_VIT_SPEC = spec("torchvision.models:VisionTransformer", **TV_VIT, num_classes=10)
TIMM_VIT_SPEC = spec("timm:vit_base_patch16_224", **TIMM_VIT, num_classes=10)
NANOGPT_SPEC = spec("tests.impls:NanoGPT", **GPT)
META_LLAMA_SPEC = spec("tests.impls:MetaLlama", **LLAMA)  # n_heads=4, n_kv_heads=2
# The presets the issue asks for, one a direction.
DIRECTIONS = {
    "torchvision-vit-to-timm",
    "timm-vit-to-torchvision",
    "gpt2-hf-to-nanogpt",
    "llama-meta-to-hf",
    "llama-hf-to-meta",
    "torchvision-resnet-to-timm",
    "timm-resnet-to-torchvision",
}


# -- the checkpoints, saved once a module ---------------------------------------------------
@dataclass(frozen=True)
class Vits:
    torchvision: nn.Module
    timm: nn.Module
    torchvision_file: Path  # torch.save(state_dict), as torchvision's weights are
    timm_file: Path  # safetensors, as timm's weights on the Hub are


@dataclass(frozen=True)
class Gpt2:
    model: nn.Module
    folder: Path  # save_pretrained: config.json and model.safetensors, the tied lm_head stored once
    torch_file: Path  # torch.save(model.state_dict()): lm_head.weight and wte in one storage


@dataclass(frozen=True)
class Llama:
    model: nn.Module
    consolidated: Path  # Meta's consolidated.00.pth: torch.save(state_dict)
    config: Path  # a folder with the LlamaConfig of the same network


@pytest.fixture(scope="module")
def vits(tmp_path_factory: pytest.TempPathFactory) -> Vits:
    folder = tmp_path_factory.mktemp("vit")
    saved = Vits(tv_vit(0), timm_vit(0), folder / "vit_tiny.pth", folder / "model.safetensors")
    torch.save(saved.torchvision.state_dict(), saved.torchvision_file)
    save_file(saved.timm.state_dict(), saved.timm_file)
    return saved


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Gpt2:
    folder = tmp_path_factory.mktemp("gpt2")
    saved = Gpt2(hf_gpt2(0), folder / "gpt2-tiny", folder / "pytorch_model.pth")
    saved.model.save_pretrained(saved.folder)
    torch.save(saved.model.state_dict(), saved.torch_file)
    return saved


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Llama:
    folder = tmp_path_factory.mktemp("llama")
    saved = Llama(meta_llama(0), folder / "consolidated.00.pth", folder / "hf-config")
    torch.save(saved.model.state_dict(), saved.consolidated)
    llama_config(**LLAMA).save_pretrained(saved.config)
    return saved


def gpt2_spec(gpt2: Gpt2) -> str:
    return f"hf:GPT2LMHeadModel?config={gpt2.folder}"


def hf_llama_spec(llama: Llama) -> str:
    return f"hf:LlamaForCausalLM?config={llama.config}"


# -- helpers --------------------------------------------------------------------------------
def port_args(source: Path, to: str, rules: str | Path, check: str | None = None) -> list[object]:
    """`SOURCE --to TO` with a preset (by name) or a rule file (a path), and `--check --from CHECK`."""
    how = ["--map", rules] if isinstance(rules, Path) else ["--preset", rules]
    return [source, "--to", to, *how, *(["--check", "--from", check] if check else [])]


def port(*args: object) -> dict:
    """`surgery port ARGS --json` that must succeed: its report."""
    run = run_cli("port", *args, "--json")
    assert run.exit_code == 0, run.stderr
    return json.loads(run.stdout)


def assert_check_passed(report: dict) -> None:
    check = report["check"]
    assert check["passed"], check["summary"]
    assert check["max_abs"] <= 1e-5 and check["compared"] > 0, check["summary"]


def assert_ported(into: nn.Module, reference: nn.Module, state: dict, probe: torch.Tensor) -> None:
    """`state` loaded into `into` (strictly, as a user loads it) makes it compute what
    `reference` computes, within 1e-5; it did not before."""
    expected = outputs(reference, probe)
    assert (outputs(into, probe) - expected).abs().max() > 1e-2
    into.load_state_dict(state)
    torch.testing.assert_close(outputs(into, probe), expected, atol=1e-5, rtol=0)


def assert_nothing_written(run: object, out: Path) -> None:
    """No output, and no temporary file of one left beside it."""
    left = [
        p.name
        for p in out.parent.iterdir()
        if p.name in (out.name, f".{out.name}") or p.name.startswith(f".{out.name}.")
    ]
    assert left == [], run


# -- ViT --------------------------------------------------------------------------------------
def test_torchvision_vit_into_timm_vit_passes_the_check_and_timm_computes_the_same(
    vits: Vits, tmp_path: Path
) -> None:
    out = tmp_path / "timm_vit.safetensors"
    report = port(
        *port_args(vits.torchvision_file, TIMM_VIT_SPEC, "torchvision-vit-to-timm", TV_VIT_SPEC), "-o", out
    )
    assert_check_passed(report)
    assert report["check"]["probe"]["shape"] == [2, 3, 32, 32]
    assert_ported(timm_vit(1), vits.torchvision, load_file(out), images())


def test_timm_vit_into_torchvision_vit_passes_the_check_and_torchvision_computes_the_same(
    vits: Vits, tmp_path: Path
) -> None:
    out = tmp_path / "tv_vit.pth"
    report = port(
        *port_args(vits.timm_file, TV_VIT_SPEC, "timm-vit-to-torchvision", TIMM_VIT_SPEC), "-o", out
    )
    assert_check_passed(report)
    assert_ported(tv_vit(1), vits.timm, torch.load(out, weights_only=True), images())


def test_torchvision_vit_to_timm_and_back_is_bit_identical(vits: Vits, tmp_path: Path) -> None:
    there, back = tmp_path / "timm.safetensors", tmp_path / "back.safetensors"
    port(*port_args(vits.torchvision_file, TIMM_VIT_SPEC, "torchvision-vit-to-timm"), "-o", there)
    port(*port_args(there, TV_VIT_SPEC, "timm-vit-to-torchvision"), "-o", back)
    original, returned = vits.torchvision.state_dict(), load_file(back)
    assert returned.keys() == original.keys()
    assert all(torch.equal(returned[k], v) for k, v in original.items())


@pytest.mark.slow
def test_torchvision_vit_into_timm_vit_checked_in_a_process_of_its_own(vits: Vits, tmp_path: Path) -> None:
    out = tmp_path / "timm_vit.safetensors"
    args = port_args(vits.torchvision_file, TIMM_VIT_SPEC, "torchvision-vit-to-timm", TV_VIT_SPEC)
    run = run_subprocess("port", *args, "-o", out, cwd=ROOT)
    assert run.exit_code == 0, run.stderr
    assert "outputs equal within atol 1e-05" in run.stdout
    assert_ported(timm_vit(1), vits.torchvision, load_file(out), images())


# -- GPT-2 -> nanoGPT -------------------------------------------------------------------------
def test_gpt2_folder_into_nanogpt_passes_the_check_and_nanogpt_gives_the_same_logits(
    gpt2: Gpt2, tmp_path: Path
) -> None:
    out = tmp_path / "nanogpt.safetensors"
    report = port(*port_args(gpt2.folder, NANOGPT_SPEC, "gpt2-hf-to-nanogpt", f"hf:{gpt2.folder}"), "-o", out)
    assert_check_passed(report)
    assert report["check"]["probe"]["kind"] == "tokens"
    transposed = {
        d["to"][0] for d in report["derived"] if d["ops"] == [{"op": "transpose", "dim0": 0, "dim1": 1}]
    }
    assert len(transposed) == 4 * GPT["n_layer"]
    assert_ported(nanogpt(1), gpt2.model, load_file(out), tokens())


def test_gpt2_state_dict_file_into_nanogpt_keeps_lm_head_tied_and_gives_the_same_logits(
    gpt2: Gpt2, tmp_path: Path
) -> None:
    out = tmp_path / "nanogpt.pt"
    report = port(*port_args(gpt2.torch_file, NANOGPT_SPEC, "gpt2-hf-to-nanogpt", gpt2_spec(gpt2)), "-o", out)
    assert_check_passed(report)
    state = torch.load(out, weights_only=True)
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    nano = nanogpt(1)
    assert_ported(nano, gpt2.model, state, tokens())
    assert nano.lm_head.weight is nano.transformer.wte.weight


def test_gpt2_checkpoint_of_older_transformers_with_mask_buffers_passes_the_check(
    gpt2: Gpt2, tmp_path: Path
) -> None:
    """Older transformers saved each block's causal mask (`attn.bias`) and `attn.masked_bias`:
    the preset drops them, and the check loads the source into today's GPT2LMHeadModel,
    which has neither, without refusing them as unexpected."""
    state = gpt2.model.state_dict()
    for n in range(GPT["n_layer"]):
        state[f"transformer.h.{n}.attn.bias"] = torch.ones(1, 1, 32, 32).tril().bool()
        state[f"transformer.h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
    source, out = tmp_path / "old_gpt2.bin", tmp_path / "nanogpt.safetensors"
    torch.save(state, source)
    report = port(*port_args(source, NANOGPT_SPEC, "gpt2-hf-to-nanogpt", gpt2_spec(gpt2)), "-o", out)
    assert_check_passed(report)
    assert len(report["unused"]) == 2 * GPT["n_layer"]


# -- Meta Llama <-> Hugging Face Llama ---------------------------------------------------------
@pytest.fixture(scope="module")
def llama_in_hf(llama: Llama, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The Meta checkpoint ported into LlamaForCausalLM with the preset and --check: the
    report and the output, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("llama-hf") / "model.safetensors"
    report = port(
        *port_args(llama.consolidated, hf_llama_spec(llama), "llama-meta-to-hf", META_LLAMA_SPEC), "-o", out
    )
    return report, out


def test_meta_llama_into_hf_llama_passes_the_check_and_transformers_gives_the_same_logits(
    llama: Llama, llama_in_hf: tuple[dict, Path]
) -> None:
    from transformers import LlamaForCausalLM

    report, out = llama_in_hf
    assert_check_passed(report)
    heads = {d["to"][0].split(".")[-2]: d["ops"][0]["heads"] for d in report["derived"] if d["ops"]}
    assert heads == {"q_proj": LLAMA["n_heads"], "k_proj": LLAMA["n_kv_heads"]}  # grouped-query
    torch.manual_seed(1)
    assert_ported(LlamaForCausalLM(llama_config(**LLAMA)).eval(), llama.model, load_file(out), tokens())


def test_meta_llama_into_an_hf_folder_that_from_pretrained_loads(llama: Llama, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    out = tmp_path / "llama-hf"
    args = port_args(llama.consolidated, hf_llama_spec(llama), "llama-meta-to-hf", META_LLAMA_SPEC)
    report = port(*args, "--format", "hf", "-o", out)
    assert_check_passed(report)
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(outputs(loaded, tokens()), outputs(llama.model, tokens()), atol=1e-5, rtol=0)


def test_hf_llama_back_into_meta_llama_is_bit_identical_and_passes_the_check(
    llama: Llama, llama_in_hf: tuple[dict, Path], tmp_path: Path
) -> None:
    _, hf_file = llama_in_hf
    back = tmp_path / "consolidated.00.pth"
    report = port(*port_args(hf_file, META_LLAMA_SPEC, "llama-hf-to-meta", hf_llama_spec(llama)), "-o", back)
    assert_check_passed(report)
    original, returned = llama.model.state_dict(), torch.load(back, weights_only=True)
    assert list(returned) == list(original)
    assert all(torch.equal(returned[k], v) for k, v in original.items())


def test_llama1_checkpoint_with_rope_freqs_passes_the_check(llama: Llama, tmp_path: Path) -> None:
    """Llama 1's consolidated files hold `rope.freqs`, which Meta's model computes instead:
    the preset drops it, and the check's own load of the source does not refuse it."""
    source, out = tmp_path / "consolidated.00.pth", tmp_path / "model.safetensors"
    torch.save(llama.model.state_dict() | {"rope.freqs": torch.rand(4)}, source)
    report = port(*port_args(source, hf_llama_spec(llama), "llama-meta-to-hf", META_LLAMA_SPEC), "-o", out)
    assert_check_passed(report)
    assert report["unused"] == ["rope.freqs"]


# -- wrong rules, caught by --check -----------------------------------------------------------
def preset_text(name: str) -> str:
    return (PRESET_FOLDER / f"{name}.toml").read_text(encoding="utf-8")


def rule_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_llama_without_the_rotary_permutation_loads_silently_but_fails_the_check_at_layer_0(
    llama: Llama, tmp_path: Path
) -> None:
    lines = preset_text("llama-meta-to-hf").splitlines(keepends=True)
    kept = [line for line in lines if "permute_rope" not in line]
    assert len(lines) - len(kept) == 2  # wq's and wk's
    rules = rule_file(tmp_path, "".join(kept))
    unchecked = port_args(llama.consolidated, hf_llama_spec(llama), rules)
    silent = run_cli("port", *unchecked, "-o", tmp_path / "unchecked.safetensors")
    assert silent.exit_code == 0, silent.stderr  # every key loads: nothing says it is wrong
    out = tmp_path / "checked.safetensors"
    run = run_cli(
        "port", *port_args(llama.consolidated, hf_llama_spec(llama), rules, META_LLAMA_SPEC), "-o", out
    )
    # q_proj and k_proj compute what wq and wk do (unpermuted): attention goes wrong after them
    divergence = "first divergence at model.layers.0.self_attn.o_proj"
    assert_clean_error(run, llama.consolidated, code=1, contains=divergence)
    assert_nothing_written(run, out)


def test_llama_with_wk_permuted_by_the_query_head_count_fails_the_check(llama: Llama, tmp_path: Path) -> None:
    text = preset_text("llama-meta-to-hf")
    assert text.count('heads = "{num_key_value_heads}"') == 1
    rules = rule_file(
        tmp_path, text.replace('heads = "{num_key_value_heads}"', 'heads = "{num_attention_heads}"')
    )
    out = tmp_path / "model.safetensors"
    run = run_cli(
        "port", *port_args(llama.consolidated, hf_llama_spec(llama), rules, META_LLAMA_SPEC), "-o", out
    )
    assert_clean_error(
        run, llama.consolidated, code=1, contains="first divergence at model.layers.0.self_attn."
    )
    assert_nothing_written(run, out)


def test_vit_with_qkv_rows_in_k_q_v_order_fails_the_check_at_block_0(vits: Vits, tmp_path: Path) -> None:
    """A fused projection cut in the wrong order: the rule format has no op that reorders a
    list of tensors (split + cat keeps q, k, v), so the rows are picked in k, q, v order."""
    dim = TV_VIT["hidden_dim"]
    k_q_v = [*range(dim, 2 * dim), *range(dim), *range(2 * dim, 3 * dim)]
    text = preset_text("torchvision-vit-to-timm")
    for part in ("weight", "bias"):
        line = f'to   = "blocks.{{n}}.attn.qkv.{part}"\n'
        assert text.count(line) == 1
        text = text.replace(line, f'{line}ops  = [{{ op = "select_rows", index = {k_q_v} }}]\n')
    out = tmp_path / "timm_vit.safetensors"
    args = port_args(vits.torchvision_file, TIMM_VIT_SPEC, rule_file(tmp_path, text), TV_VIT_SPEC)
    run = run_cli("port", *args, "-o", out)
    assert_clean_error(run, vits.torchvision_file, code=1, contains="first divergence at blocks.0.")
    assert_nothing_written(run, out)


@pytest.mark.slow
def test_a_wrong_rule_fails_the_check_in_a_process_of_its_own(llama: Llama, tmp_path: Path) -> None:
    kept = [line for line in preset_text("llama-meta-to-hf").splitlines(True) if "permute_rope" not in line]
    out = tmp_path / "model.safetensors"
    rules = rule_file(tmp_path, "".join(kept))
    args = port_args(llama.consolidated, hf_llama_spec(llama), rules, META_LLAMA_SPEC)
    run = run_subprocess("port", *args, "-o", out, cwd=ROOT)
    assert_clean_error(run, llama.consolidated, code=1, contains="model.layers.0.self_attn.o_proj")
    assert_nothing_written(run, out)


# -- ResNet: the presets without rules ----------------------------------------------------------
@pytest.fixture(scope="module")
def timm_resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm_resnet18") / "model.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def test_torchvision_resnet18_into_timm_passes_the_check(
    seeded_resnet18: SavedResnet18, tmp_path: Path
) -> None:
    out = tmp_path / "timm_resnet18.safetensors"
    args = port_args(
        seeded_resnet18.plain, "timm:resnet18", "torchvision-resnet-to-timm", "torchvision:resnet18"
    )
    report = port(*args, "-o", out)
    assert_check_passed(report)
    assert report["derived"] == [] and len(report["matched"]) == 122
    written = load_file(out)
    assert all(torch.equal(written[k], v) for k, v in seeded_resnet18.state.items())


def test_timm_resnet18_into_torchvision_passes_the_check(timm_resnet18_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "resnet18.pth"
    args = port_args(
        timm_resnet18_file, "torchvision:resnet18", "timm-resnet-to-torchvision", "timm:resnet18"
    )
    report = port(*args, "-o", out)
    assert_check_passed(report)
    written, saved = torch.load(out, weights_only=True), load_file(timm_resnet18_file)
    assert all(torch.equal(written[k], v) for k, v in saved.items())
    torchvision.models.resnet18().load_state_dict(written)


# -- surgery presets ------------------------------------------------------------------------------
def test_surgery_presets_lists_every_preset_with_its_description_and_versions() -> None:
    run = run_cli("presets")
    assert run.exit_code == 0, run.stderr
    assert set(preset_names()) == DIRECTIONS
    lines = run.stdout.splitlines()
    assert len(lines) == len(DIRECTIONS)
    for name, line in zip(sorted(DIRECTIONS), lines, strict=True):
        preset = read_preset(name)
        assert line.split()[0] == name
        assert preset.description in line
        assert all(f"{library} {version}" in line for library, version in preset.verified)


def test_surgery_presets_json_lists_them() -> None:
    run = run_cli("presets", "--json")
    assert run.exit_code == 0, run.stderr
    listed = json.loads(run.stdout)["presets"]
    assert [p["name"] for p in listed] == sorted(DIRECTIONS)
    for p in listed:
        preset = read_preset(p["name"])
        assert p["description"] == preset.description and p["rules"] == len(preset.rules)
        assert p["verified"] == dict(preset.verified)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_each_preset_parses_and_says_what_it_was_verified_against(name: str) -> None:
    preset = read_preset(name)
    assert preset.origin == f"preset {name}"
    assert preset.description.strip() and "\n" not in preset.description
    libraries = dict(preset.verified)
    assert "torch" in libraries and len(libraries) >= 2
    assert bool(preset.rules) == ("resnet" not in name)  # resnets share every key


# -- --check refused -------------------------------------------------------------------------------
SOURCE = "SOURCE"  # stands for the source file, which the tests' folder decides


@pytest.mark.parametrize(
    ("extra", "where", "contains", "code"),
    [
        pytest.param(["--check"], "--check", "name it with --from", 2, id="no-from"),
        pytest.param(["--from", TV_VIT_SPEC], "--from", "pass --check", 2, id="from-without-check"),
        pytest.param(
            ["--check", "--from", SOURCE], SOURCE, "--from names a template", 2, id="from-a-template"
        ),
        pytest.param(
            ["--probe-shape", "2,x"], "--probe-shape", "not a shape", 2, id="probe-shape-not-numbers"
        ),
        pytest.param(
            ["--probe-shape", "0,3,32,32"], "--probe-shape", "not a shape", 2, id="probe-shape-zero"
        ),
        pytest.param(
            ["--probe-shape", "2,16"],
            "source model VisionTransformer",
            "fails on images float32 [2, 16]",
            2,
            id="probe-shape-the-model-cannot-take",
        ),
        pytest.param(["--atol", "-1"], "--atol", "not a tolerance", 2, id="negative-atol"),
    ],
)
def test_check_refused_in_one_line_with_nothing_written(
    vits: Vits, tmp_path: Path, extra: list[str], where: str, contains: str, code: int
) -> None:
    source, out = vits.torchvision_file, tmp_path / "out.safetensors"
    check = None if "--check" in extra or "--from" in extra else TV_VIT_SPEC
    args = [str(source) if a == SOURCE else a for a in extra]
    run = run_cli(
        "port", *port_args(source, TIMM_VIT_SPEC, "torchvision-vit-to-timm", check), *args, "-o", out
    )
    assert_clean_error(run, source if where == SOURCE else where, contains=contains, code=code)
    assert_nothing_written(run, out)


def test_check_from_a_model_the_source_does_not_load_into_names_both(vits: Vits, tmp_path: Path) -> None:
    deeper = spec("torchvision.models:VisionTransformer", **(TV_VIT | {"num_layers": 3}), num_classes=10)
    out = tmp_path / "out.safetensors"
    args = port_args(vits.torchvision_file, TIMM_VIT_SPEC, "torchvision-vit-to-timm", deeper)
    run = run_cli("port", *args, "-o", out)
    loads = f"the source does not load into --from {deeper}"
    error = assert_clean_error(run, vits.torchvision_file, code=1, contains=loads)
    assert "missing 12: encoder.layers.encoder_layer_2." in error
    assert_nothing_written(run, out)
