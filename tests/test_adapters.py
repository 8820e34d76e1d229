"""`surgery merge BASE --adapter DIR`: PEFT LoRA adapters merged into a base, checked against PEFT.

The models are transformers' own (a tiny GPT-2, whose Conv1D layers are fan_in_fan_out and whose
lm_head is tied to its embedding; a tiny Llama of nn.Linear) and torchvision's resnet18 (Conv2d);
the adapters are made by PEFT's `get_peft_model` with every trainable tensor moved off its init
(B is zero at init: a merge of it would change nothing) and saved by PEFT's `save_pretrained`.
The reference is PEFT's own `merge_and_unload()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
import transformers
from conftest import assert_clean_error, run_cli, run_subprocess
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgery
from surgery import open_checkpoint

TOLERANCE = 1e-6
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 99, 0, 3, 64, 12]])
GPT2 = {
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "vocab_size": 100,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
# lora_bias adds to a base bias: the tiny Llama's projections have one.
LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "attention_bias": True,
    "mlp_bias": True,
}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- models and adapters, made by transformers and PEFT ----------------------------------------------
def gpt2(n_embd: int = 32) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, "n_embd": n_embd})).eval()


def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def resnet18(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(state)
    return model.eval()


@contextmanager
def quiet() -> Iterator[None]:
    """Without PEFT's and transformers' warnings about what the tiny models do on purpose
    ("fan_in_fan_out is set to False" for an embedding; a 1-D lora_B.bias "not gathered")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def trained(model: torch.nn.Module, config, seed: int) -> PeftModel:
    """`get_peft_model`, then every trainable tensor (A, B, modules_to_save, trained biases) moved
    off its init, as training would: each adapter changes what it targets."""
    torch.manual_seed(seed)
    with quiet():
        peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save(peft_model: PeftModel, folder: Path, **kwargs) -> Path:
    with quiet():
        peft_model.save_pretrained(folder, **kwargs)
    return folder


def merged_by_peft(peft_model: PeftModel, **kwargs) -> torch.nn.Module:
    with quiet():
        return peft_model.merge_and_unload(**kwargs).eval()


@dataclass(frozen=True)
class Saved:
    """A base checkpoint, adapters PEFT saved for it, and what PEFT's merge of each makes."""

    base: Path
    state: dict[str, torch.Tensor]  # the base's state_dict
    adapters: dict[str, Path]  # name -> the folder PEFT's save_pretrained wrote
    merged: dict[str, dict[str, torch.Tensor]]  # name -> PEFT's merge_and_unload(), as a state_dict
    logits: dict[str, torch.Tensor]  # name -> the merged model's logits for TOKENS


@pytest.fixture(scope="module")
def gpt2_saved(tmp_path_factory) -> Saved:
    """A tiny GPT-2 (torch.save: lm_head tied to wte) and two adapters on its Conv1D layers and
    embedding: `full` with modules_to_save, trained biases and per-module ranks and alphas;
    `plain` of low-rank factors only (also saved as adapter_model.bin, as `bin`)."""
    folder = tmp_path_factory.mktemp("gpt2")
    base = folder / "base.pt"
    torch.save(gpt2().state_dict(), base)
    configs = {
        "full": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "wte"],
            fan_in_fan_out=True,
            modules_to_save=["ln_f"],
            bias="lora_only",
            rank_pattern={"h.1.attn.c_attn": 2},
            alpha_pattern={"c_proj": 3},
        ),
        "plain": LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True),
    }
    adapters, merged, logits = {}, {}, {}
    for seed, (name, config) in enumerate(configs.items(), 1):
        peft_model = trained(gpt2(), config, seed)
        adapters[name] = save(peft_model, folder / name)
        if name == "plain":
            adapters["bin"] = save(peft_model, folder / "bin", safe_serialization=False)
        model = merged_by_peft(peft_model)
        merged[name] = state_of(model)
        with torch.no_grad():
            logits[name] = model(TOKENS).logits
    return Saved(base, state_of(gpt2()), adapters, merged, logits)


@pytest.fixture(scope="module")
def llama_saved(tmp_path_factory) -> Saved:
    """A tiny Llama (safetensors) and adapters on its nn.Linear layers: `rslora` (use_rslora,
    lora_bias) and `second` (other targets, another rank), and `embedding`; `both` is PEFT's
    merge of the two loaded into one model, `weighted` 1 x rslora + 0.5 x second, from PEFT's
    merges of each."""
    folder = tmp_path_factory.mktemp("llama")
    state = state_of(llama())
    base = folder / "model.safetensors"
    save_file(state, base)
    configs = {
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, target_modules=LLAMA_LINEAR),
        "second": LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
        # PEFT saves the embedding it targets whole beside its factors (save_embedding_layers)
        "embedding": LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    }
    adapters, merged = {}, {}
    for seed, (name, config) in enumerate(configs.items(), 3):
        peft_model = trained(llama(), config, seed)
        adapters[name] = save(peft_model, folder / name)
        merged[name] = state_of(merged_by_peft(peft_model))
    with quiet():
        both = PeftModel.from_pretrained(llama(), adapters["rslora"], adapter_name="rslora")
        both.load_adapter(adapters["second"], adapter_name="second")
    merged["both"] = state_of(merged_by_peft(both, adapter_names=["rslora", "second"]))
    merged["weighted"] = {
        k: state[k].double()
        + 1.0 * (merged["rslora"][k].double() - state[k].double())
        + 0.5 * (merged["second"][k].double() - state[k].double())
        for k in state
    }
    return Saved(base, state, adapters, merged, {})


@pytest.fixture(scope="module")
def resnet_saved(seeded_resnet18, tmp_path_factory) -> Saved:
    """The session's resnet18 and an adapter on Conv2d layers of 7x7, 3x3 and 1x1 kernels (every
    `conv1`, a downsample, one conv2)."""
    folder = tmp_path_factory.mktemp("resnet")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["conv1", "layer2.0.downsample.0", "layer4.1.conv2"]
    )
    peft_model = trained(resnet18(seeded_resnet18.state), config, 5)
    adapter = save(peft_model, folder / "conv")
    merged = state_of(merged_by_peft(peft_model))
    return Saved(seeded_resnet18.plain, seeded_resnet18.state, {"conv": adapter}, {"conv": merged}, {})


# -- checks -------------------------------------------------------------------------------------------
def read(path: Path) -> dict[str, torch.Tensor]:
    """What an output holds, read by surgery (any format, tied names restored)."""
    ckpt = open_checkpoint(path)
    return {t.name: ckpt.tensor(t.name).clone() for t in ckpt.tensors}


def assert_matches(out: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance=TOLERANCE):
    """The same names, each tensor of the reference's dtype (unless float64) and within `tolerance`."""
    assert sorted(out) == sorted(reference)
    worst = {k: (out[k].double() - reference[k].double()).abs().max().item() for k in reference}
    assert max(worst.values()) <= tolerance, {k: d for k, d in worst.items() if d > tolerance}
    for k, tensor in reference.items():
        assert tensor.dtype == torch.float64 or out[k].dtype == tensor.dtype, k


def within_one_ulp(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """|out - reference| at most one unit in the last place of out's dtype, at the reference's magnitude."""
    finfo = torch.finfo(out.dtype)
    scale = torch.exp2(torch.floor(torch.log2(reference.abs().clamp(min=finfo.tiny))))
    return bool(((out.double() - reference).abs() <= finfo.eps * scale).all())


def changed(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in base if not torch.equal(merged[k], base[k])}


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def refused(tmp_path: Path, args: list, where: object, contains: str, code: int, *, read: list[Path]) -> str:
    """`surgery merge ARGS -o OUT` refused with one line, OUT's folder left empty, the inputs untouched."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = {p: digest(p) for p in read}
    run = run_cli("merge", *args, "-o", out_dir / "merged.safetensors")
    line = assert_clean_error(run, where, contains=contains, code=code)
    assert list(out_dir.iterdir()) == []
    assert {p: digest(p) for p in read} == before
    return line


# == GPT-2: Conv1D (fan_in_fan_out), a tied embedding, modules_to_save, trained biases ================
def test_gpt2_adapter_merged_by_the_cli_equals_peft_and_lm_head_stays_tied(gpt2_saved, tmp_path):
    out = tmp_path / "merged.pt"
    run = run_cli("merge", gpt2_saved.base, "--adapter", gpt2_saved.adapters["full"], "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    reference = gpt2_saved.merged["full"]
    assert len(changed(reference, gpt2_saved.state)) == 16  # 6 Conv1D, wte, lm_head; 8 replaced
    merged = torch.load(out, weights_only=True)
    assert_matches(merged, reference)
    wte, lm_head = merged["transformer.wte.weight"], merged["lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == lm_head.untyped_storage().data_ptr()
    assert json.loads(run.stdout)["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    model = gpt2()
    model.load_state_dict(merged)
    with torch.no_grad():
        assert (model(TOKENS).logits - gpt2_saved.logits["full"]).abs().max() <= 1e-5


@pytest.mark.slow  # a process of its own, as a pipeline runs it
def test_gpt2_adapter_merged_by_a_process_into_safetensors_equals_peft(gpt2_saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    run = run_subprocess(
        "merge", gpt2_saved.base, "--adapter", gpt2_saved.adapters["full"], "-o", out, "--verify", "--json"
    )
    assert run.exit_code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert report["verified"] == len(gpt2_saved.state)
    with safe_open(out, "pt") as f:
        stored = set(f.keys())
    assert "lm_head.weight" not in stored  # one tensor for the two names
    assert_matches(read(out), gpt2_saved.merged["full"])


# == Llama: nn.Linear, use_rslora, lora_bias ============================================================
def test_llama_adapter_with_rslora_and_lora_bias_merged_by_the_library_equals_peft(llama_saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = surgery.merge(llama_saved.base, out, adapters=[llama_saved.adapters["rslora"]])
    reference = llama_saved.merged["rslora"]
    assert {k for k in changed(reference, llama_saved.state) if k.endswith(".bias")}  # lora_bias did
    assert report.written and report.adapters[0].layouts == {"linear": 14, "bias": 14}
    assert_matches(load_file(out), reference)


# == several adapters ==================================================================================
def test_two_adapters_with_weights_add_each_delta_times_its_weight(llama_saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    adapters = llama_saved.adapters
    run = run_cli(
        "merge",
        llama_saved.base,
        "--adapter",
        adapters["rslora"],
        "--adapter",
        adapters["second"],
        "--weights",
        "1,0.5",
        "-o",
        out,
    )
    assert run.exit_code == 0, run.stderr
    assert_matches(load_file(out), llama_saved.merged["weighted"])


def test_two_adapters_without_weights_equal_peft_merging_both(llama_saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    adapters = llama_saved.adapters
    run = run_cli(
        "merge", llama_saved.base, "--adapter", adapters["rslora"], "--adapter", adapters["second"], "-o", out
    )
    assert run.exit_code == 0, run.stderr
    assert_matches(load_file(out), llama_saved.merged["both"])


def test_an_adapter_on_the_embedding_with_peft_s_copy_of_it_equals_peft(llama_saved, tmp_path):
    """PEFT saves an embedding it targets whole beside its factors (`save_embedding_layers`):
    the copy is the base's, and the delta adds to it."""
    adapter = llama_saved.adapters["embedding"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
    out = tmp_path / "merged.safetensors"
    run = run_cli("merge", llama_saved.base, "--adapter", adapter, "-o", out)
    assert run.exit_code == 0, run.stderr
    assert_matches(load_file(out), llama_saved.merged["embedding"])


def test_an_adapter_on_a_tied_embedding_changes_the_tied_lm_head_too(tmp_path):
    def tied() -> transformers.LlamaForCausalLM:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True)
        ).eval()

    base, adapter, out = tmp_path / "tied.pt", tmp_path / "adapter", tmp_path / "merged.safetensors"
    torch.save(tied().state_dict(), base)
    peft_model = trained(tied(), LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]), 8)
    save(peft_model, adapter)
    reference = state_of(merged_by_peft(peft_model))
    run = run_cli("merge", base, "--adapter", adapter, "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert_matches(read(out), reference)


# == resnet18: Conv2d ===================================================================================
def test_conv2d_adapter_of_7x7_3x3_and_1x1_kernels_equals_peft(resnet_saved, tmp_path):
    out = tmp_path / "merged.pt"
    run = run_cli("merge", resnet_saved.base, "--adapter", resnet_saved.adapters["conv"], "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    reference = resnet_saved.merged["conv"]
    kernels = {tuple(reference[k].shape[2:]) for k in changed(reference, resnet_saved.state)}
    assert kernels == {(7, 7), (3, 3), (1, 1)}
    assert json.loads(run.stdout)["adapters"][0]["changed"] == {"conv": 11}
    assert_matches(torch.load(out, weights_only=True), reference)


# == --unmerge ==========================================================================================
def test_unmerge_takes_the_adapter_back_out(gpt2_saved, tmp_path):
    merged, back = tmp_path / "merged.safetensors", tmp_path / "back.pt"
    adapter = gpt2_saved.adapters["plain"]
    assert run_cli("merge", gpt2_saved.base, "--adapter", adapter, "-o", merged).exit_code == 0
    assert_matches(read(merged), gpt2_saved.merged["plain"])
    run = run_cli("merge", merged, "--adapter", adapter, "--unmerge", "-o", back)
    assert run.exit_code == 0, run.stderr
    assert_matches(torch.load(back, weights_only=True), gpt2_saved.state)


def test_unmerge_of_an_adapter_with_modules_to_save_is_refused(gpt2_saved, tmp_path):
    adapter = gpt2_saved.adapters["full"]
    args = [gpt2_saved.base, "--adapter", adapter, "--unmerge"]
    line = refused(tmp_path, args, adapter, "cannot be unmerged", 1, read=[gpt2_saved.base, adapter])
    assert "replaces 8 tensors whole" in line and "modules_to_save" in line


# == adapters that do not belong to the base ============================================================
def test_an_adapter_for_another_model_lists_what_matches_nothing(gpt2_saved, llama_saved, tmp_path):
    adapter = gpt2_saved.adapters["plain"]
    line = refused(
        tmp_path,
        [llama_saved.base, "--adapter", adapter],
        adapter,
        "match nothing in the base",
        1,
        read=[llama_saved.base, adapter],
    )
    assert "5 tensors match nothing in the base: transformer.h.0.attn.c_attn.weight;" in line


def test_an_adapter_for_another_size_does_not_fit(gpt2_saved, tmp_path):
    wider = tmp_path / "in" / "gpt2-64.pt"
    wider.parent.mkdir()
    torch.save(gpt2(n_embd=64).state_dict(), wider)
    adapter = gpt2_saved.adapters["plain"]
    line = refused(tmp_path, [wider, "--adapter", adapter], adapter, "does not fit", 1, read=[wider, adapter])
    assert (
        "lora_B [96, 2]) make [32, 96] as fan_in_fan_out, the base's transformer.h.0.attn.c_attn.weight is [64, 192]"
        in line
    )


# == names ==============================================================================================
@pytest.mark.parametrize("saved_from", ["GPT2Model", "DataParallel"])
def test_adapter_names_are_aligned_with_a_base_of_other_prefixes_and_said_so(
    gpt2_saved, tmp_path, saved_from
):
    reference = gpt2_saved.merged["full"]
    if saved_from == "GPT2Model":  # the model inside GPT2LMHeadModel: no `transformer.`, no lm_head
        state, step = gpt2().transformer.state_dict(), "stripped 'transformer.'"
        expected = {k.removeprefix("transformer."): v for k, v in reference.items() if k != "lm_head.weight"}
    else:
        state, step = {"module." + k: v for k, v in gpt2().state_dict().items()}, "added 'module.'"
        expected = {"module." + k: v for k, v in reference.items()}
    base, out = tmp_path / "base.pt", tmp_path / "merged.safetensors"
    torch.save(state, base)
    run = run_cli("merge", base, "--adapter", gpt2_saved.adapters["full"], "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["adapters"][0]["steps"] == [f"adapter names: {step} to match the base"]
    assert_matches(read(out), expected)


# == dtypes =============================================================================================
def test_a_bf16_base_stays_bf16_and_dtype_fp32_casts(llama_saved, tmp_path):
    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in llama_saved.state.items()}, bf16)
    adapter = llama_saved.adapters["rslora"]
    delta = {k: llama_saved.merged["rslora"][k].double() - v.double() for k, v in llama_saved.state.items()}
    reference = {k: v.to(torch.bfloat16).double() + delta[k] for k, v in llama_saved.state.items()}
    kept, cast = tmp_path / "kept.safetensors", tmp_path / "cast.safetensors"
    assert run_cli("merge", bf16, "--adapter", adapter, "-o", kept).exit_code == 0
    assert run_cli("merge", bf16, "--adapter", adapter, "--dtype", "fp32", "-o", cast).exit_code == 0
    out = load_file(kept)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert all(within_one_ulp(out[k], r) for k, r in reference.items())
    out = load_file(cast)
    assert {t.dtype for t in out.values()} == {torch.float32}
    assert_matches(out, reference)


# == adapter_model.bin ==================================================================================
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_adapter_saved_as_bin_merges_as_its_safetensors_does(gpt2_saved, tmp_path):
    assert (gpt2_saved.adapters["bin"] / "adapter_model.bin").is_file()
    out = tmp_path / "merged.pt"
    run = run_cli("merge", gpt2_saved.base, "--adapter", gpt2_saved.adapters["bin"], "-o", out)
    assert run.exit_code == 0, run.stderr
    assert_matches(torch.load(out, weights_only=True), gpt2_saved.merged["plain"])


def test_a_malicious_adapter_bin_is_refused_and_never_run(gpt2_saved, tmp_path):
    marker = tmp_path / "CANARY"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(gpt2_saved.adapters["plain"] / "adapter_config.json", evil)
    tensors = load_file(gpt2_saved.adapters["plain"] / "adapter_model.safetensors")
    torch.save({**tensors, "hook": _Payload(marker)}, evil / "adapter_model.bin")
    args = [gpt2_saved.base, "--adapter", evil]
    refused(tmp_path, args, evil / "adapter_model.bin", "not safe", 1, read=[gpt2_saved.base, evil])
    out = tmp_path / "trusted.pt"
    run = run_cli("merge", *args, "-o", out, "--trust")  # its tensors read, the object never built
    assert run.exit_code == 0, run.stderr
    assert_matches(torch.load(out, weights_only=True), gpt2_saved.merged["plain"])
    assert not marker.exists()


@pytest.fixture
def adapter_copy(gpt2_saved, tmp_path) -> Path:
    """The `plain` adapter's folder, copied to be spoilt."""
    return Path(shutil.copytree(gpt2_saved.adapters["plain"], tmp_path / "in" / "adapter"))


# == bad input ==========================================================================================
def test_a_folder_without_adapter_config_json(gpt2_saved, adapter_copy, tmp_path):
    (adapter_copy / "adapter_config.json").unlink()
    args = [gpt2_saved.base, "--adapter", adapter_copy]
    refused(
        tmp_path, args, adapter_copy, "holds no adapter_config.json", 1, read=[gpt2_saved.base, adapter_copy]
    )


def test_a_config_that_is_not_json(gpt2_saved, adapter_copy, tmp_path):
    config = adapter_copy / "adapter_config.json"
    config.write_text('{"peft_type": "LORA", "r": 8,')
    args = [gpt2_saved.base, "--adapter", adapter_copy]
    refused(tmp_path, args, config, "not a readable JSON config", 1, read=[gpt2_saved.base, adapter_copy])


def test_an_ia3_adapter(llama_saved, tmp_path):
    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    ia3 = save(trained(llama(), config, 6), tmp_path / "in" / "ia3")
    args = [llama_saved.base, "--adapter", ia3]
    where = ia3 / "adapter_config.json"
    refused(tmp_path, args, where, "peft_type is 'IA3': surgery merges LoRA adapters only", 1, read=[ia3])


def test_a_dora_adapter(llama_saved, tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    dora = save(trained(llama(), config, 7), tmp_path / "in" / "dora")
    args = [llama_saved.base, "--adapter", dora]
    refused(tmp_path, args, dora / "adapter_config.json", "a DoRA adapter (use_dora)", 1, read=[dora])


def test_a_missing_adapter_folder(gpt2_saved, tmp_path):
    missing = tmp_path / "in" / "no-such-adapter"
    args = [gpt2_saved.base, "--adapter", missing]
    refused(tmp_path, args, missing, "no such adapter folder", 1, read=[gpt2_saved.base])


def test_an_adapter_with_two_inputs(gpt2_saved, tmp_path):
    other = tmp_path / "in" / "other.pt"
    other.parent.mkdir()
    shutil.copy(gpt2_saved.base, other)
    args = [gpt2_saved.base, other, "--adapter", gpt2_saved.adapters["plain"]]
    refused(
        tmp_path, args, "INPUTS", "merges adapters into one checkpoint, the base: 2 given", 2, read=[other]
    )


def test_weights_not_one_per_adapter(gpt2_saved, tmp_path):
    args = [gpt2_saved.base, "--adapter", gpt2_saved.adapters["plain"], "--weights", "1,0.5"]
    refused(tmp_path, args, "--weights", "2 weights for 1 adapter", 2, read=[gpt2_saved.base])


def test_another_method_with_an_adapter(gpt2_saved, tmp_path):
    args = [gpt2_saved.base, "--adapter", gpt2_saved.adapters["plain"], "--method", "ties"]
    refused(tmp_path, args, "--method", "drop --method ties", 2, read=[gpt2_saved.base])


def test_unmerge_without_an_adapter(gpt2_saved, tmp_path):
    refused(
        tmp_path,
        [gpt2_saved.base, "--unmerge"],
        "--unmerge",
        "name them with --adapter",
        2,
        read=[gpt2_saved.base],
    )


@pytest.mark.parametrize("force", [False, True])
def test_an_output_equal_to_the_base(gpt2_saved, tmp_path, force):
    base = Path(shutil.copy(gpt2_saved.base, tmp_path / "base.pt"))
    before = digest(base)
    run = run_cli("merge", base, "--adapter", gpt2_saved.adapters["plain"], "-o", base, *["--force"] * force)
    assert_clean_error(run, base, contains="the output is an input of this run", code=2)
    assert digest(base) == before and sorted(p.name for p in tmp_path.iterdir()) == ["base.pt"]


# == what a merge says it did, and what it wrote down ==================================================
def test_a_dry_run_writes_nothing_and_says_what_each_adapter_does(gpt2_saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    run = run_cli(
        "merge", gpt2_saved.base, "--adapter", gpt2_saved.adapters["full"], "-o", out, "--dry-run", "--json"
    )
    assert run.exit_code == 0, run.stderr
    assert list(tmp_path.iterdir()) == []
    report = json.loads(run.stdout)
    assert report["written"] is False
    [adapter] = report["adapters"]
    assert adapter["changed"] == {"fan_in_fan_out": 6, "embedding": 1}
    assert adapter["rank_pattern"] == {"h.1.attn.c_attn": 2} and adapter["alpha_pattern"] == {"c_proj": 3}
    reference = gpt2_saved.merged["full"]
    replaced = {k for k in changed(reference, gpt2_saved.state) if k.endswith("bias") or ".ln_f." in k}
    assert set(report["replaced"]) == replaced and len(replaced) == 8
    assert report["unchanged"] == len(gpt2_saved.state) - len(changed(reference, gpt2_saved.state))


def test_the_output_names_the_base_and_the_adapter_files_with_their_sha256(gpt2_saved, tmp_path):
    out = tmp_path / "merged.safetensors"
    adapter = gpt2_saved.adapters["plain"]
    assert (
        run_cli("merge", gpt2_saved.base, "--adapter", adapter, "--weights", "0.5", "-o", out).exit_code == 0
    )
    metadata = json.loads(run_cli("inspect", out, "--json").stdout)["metadata"]["metadata"]
    assert json.loads(metadata["surgery.merge"]) == {"method": "lora", "weights": [0.5]}
    files = {Path(f["path"]): f["sha256"] for f in json.loads(metadata["surgery.source_files"])}
    read_files = [gpt2_saved.base, adapter / "adapter_model.safetensors", adapter / "adapter_config.json"]
    assert files == {p.resolve(): digest(p) for p in read_files}
    roles = [(i["path"], i["role"]) for i in json.loads(metadata["surgery.inputs"])]
    assert roles[0] == (str(gpt2_saved.base), "base") and roles[1][1] == "adapter"


# == memory =============================================================================================
class _Wide(torch.nn.Module):
    """An embedding and a linear layer whose deltas are two pieces of merge's each."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1024, 512)
        self.fc = torch.nn.Linear(512, 1024)


def test_a_delta_is_made_a_piece_at_a_time_never_whole(tmp_path, monkeypatch):
    """Memory follows a piece of each tensor, not the layer: no piece of a delta, in either
    layout, is more than a piece of merge's."""
    import surgery.commands.merge as merging

    torch.manual_seed(0)
    model = _Wide()
    base, out = tmp_path / "wide.safetensors", tmp_path / "merged.safetensors"
    save_file(state_of(model), base)
    peft_model = trained(model, LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "fc"]), 9)
    adapter = save(peft_model, tmp_path / "adapter")
    made: list[int] = []
    lora_delta = merging.lora_delta

    def counted(*args):
        for piece in lora_delta(*args):
            made.append(piece.numel())
            yield piece

    monkeypatch.setattr(merging, "lora_delta", counted)
    assert run_cli("merge", base, "--adapter", adapter, "-o", out).exit_code == 0
    assert sum(made) == 2 * 1024 * 512 and max(made) <= merging.PIECE
    assert_matches(load_file(out), state_of(merged_by_peft(peft_model)))
