"""`surgery extract`: a fine-tune's changes as a PEFT LoRA adapter that PEFT itself loads.

The fine-tunes are made here: a tiny Llama (nn.Linear), GPT-2 (Conv1D, fan_in_fan_out) and a
torchvision resnet18 (Conv2d) whose weights change by known low-rank or full-rank amounts; the
adapters are loaded with `peft.PeftModel.from_pretrained` and compared by their logits.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, write_torch_zip
from safetensors import safe_open

import surgery

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

warnings.filterwarnings("ignore", module="peft")


def low_rank_tune(model: torch.nn.Module, *, rank: int | None, seed: int = 1) -> torch.nn.Module:
    """A copy whose linear/conv weights moved by a change of the given rank (full when None),
    whose norms and embeddings moved too."""
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                rows, cols = p.shape[0], p[0].numel()
                if rank is None:
                    change = torch.randn(rows, cols)
                else:
                    change = torch.randn(rows, rank) @ torch.randn(rank, cols)
                p.add_(0.01 * change.reshape(p.shape))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return tuned


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("llama")
    base = llama()
    tuned = low_rank_tune(base, rank=2)
    torch.save(base.state_dict(), folder / "base.pt")
    torch.save(tuned.state_dict(), folder / "tuned.pt")
    return folder / "base.pt", folder / "tuned.pt", base, tuned


def peft_logits(base: torch.nn.Module, adapter: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.arange(12).reshape(1, 12) % 100


def test_a_low_rank_fine_tune_comes_back_exactly_through_peft_and_through_merge(llama_pair, tmp_path):
    base_file, tuned_file, base, tuned = llama_pair
    out = tmp_path / "adapter"
    run = run_cli("extract", tuned_file, "--base", base_file, "--rank", "4", "-o", out)
    assert run.exit_code == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "model.embed_tokens" in config["modules_to_save"]  # embeddings: whole, never guessed factors
    with torch.no_grad():
        expected = tuned(TOKENS).logits
    assert torch.allclose(peft_logits(base, out, TOKENS), expected, atol=1e-5)
    merged = tmp_path / "merged.safetensors"
    assert run_cli("merge", base_file, "--adapter", out, "-o", merged).exit_code == 0
    back = surgery.open_checkpoint(merged).state_dict()
    for name, value in tuned.state_dict().items():
        torch.testing.assert_close(back[name], value, atol=1e-5, rtol=0)


def test_the_report_gives_each_layers_eckart_young_error(llama_pair, tmp_path):
    """A full-rank change at rank 2: the error said is the tail of the singular values, and
    merged back, each layer is that far from the fine-tune."""
    base_file, _, base, _ = llama_pair
    tuned = low_rank_tune(base, rank=None, seed=3)
    tuned_file = tmp_path / "tuned.safetensors"
    surgery_state = {k: v.contiguous() for k, v in tuned.state_dict().items() if k != "lm_head.weight"}
    surgery_state["lm_head.weight"] = tuned.state_dict()["lm_head.weight"].clone()
    from safetensors.torch import save_file

    save_file(surgery_state, str(tuned_file))
    run = run_cli("extract", tuned_file, "--base", base_file, "--rank", "2", "-o", tmp_path / "a", "--json")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    name = "model.layers.1.mlp.down_proj.weight"
    change = (tuned.state_dict()[name] - base.state_dict()[name]).double()
    s = torch.linalg.svdvals(change)
    expected = float((s[2:].square().sum() / s.square().sum()).sqrt())
    assert doc["errors"][name] == pytest.approx(expected, abs=1e-5)
    assert 0.5 < expected < 1  # a full-rank change: rank 2 holds little of it
    merged = tmp_path / "merged.safetensors"
    assert run_cli("merge", base_file, "--adapter", tmp_path / "a", "-o", merged).exit_code == 0
    got = surgery.open_checkpoint(merged).tensor(name).double()
    left = float((got - tuned.state_dict()[name].double()).norm() / change.norm())
    assert left == pytest.approx(expected, abs=1e-4)


def test_gpt2_conv1d_weights_with_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    tuned = low_rank_tune(base, rank=1)
    tuned.lm_head.weight = tuned.transformer.wte.weight  # tied, as GPT-2 is
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "adapter"
    run = run_cli(
        "extract",
        tmp_path / "tuned.pt",
        "--base",
        tmp_path / "base.pt",
        "--rank",
        "2",
        "--fan-in-fan-out",
        "-o",
        out,
    )
    assert run.exit_code == 0, run.stderr
    config_doc = json.loads((out / "adapter_config.json").read_text())
    assert config_doc["fan_in_fan_out"] is True
    assert "transformer.h.0.attn.c_attn" in config_doc["target_modules"]
    with torch.no_grad():
        expected = tuned(TOKENS).logits
    assert torch.allclose(peft_logits(base, out, TOKENS), expected, atol=1e-5)


def test_conv_layers_of_a_resnet(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    tuned = low_rank_tune(base, rank=2)
    tuned.eval()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "adapter"
    run = run_cli(
        "extract", tmp_path / "tuned.pt", "--base", tmp_path / "base.pt", "--rank", "2", "-o", out, "--json"
    )
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["lora"]["layer1.0.conv1.weight"] == "conv" and doc["lora"]["fc.weight"] == "linear"
    assert "bn1" in doc["modules_to_save"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.model.layer1.0.conv1.lora_A.weight").get_shape() == [2, 64, 3, 3]
        assert f.get_slice("base_model.model.layer1.0.conv1.lora_B.weight").get_shape() == [64, 2, 1, 1]
    merged = tmp_path / "merged.pt"
    assert run_cli("merge", tmp_path / "base.pt", "--adapter", out, "-o", merged).exit_code == 0
    back = surgery.open_checkpoint(merged).state_dict()
    for name, value in tuned.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(back[name], value, atol=1e-5, rtol=0)
        else:
            assert torch.equal(back[name], value)


def test_dry_run_writes_nothing_and_says_what_it_would(llama_pair, tmp_path):
    base_file, tuned_file, _, _ = llama_pair
    out = tmp_path / "adapter"
    run = run_cli("extract", tuned_file, "--base", base_file, "--rank", "4", "-o", out, "--dry-run", "--json")
    assert run.exit_code == 0
    doc = json.loads(run.stdout)
    assert doc["written"] is False and doc["changed"] == doc["tensors"] and doc["bytes"] > 0
    assert not out.exists()


def test_the_library_call_and_the_adapters_provenance(llama_pair, tmp_path):
    base_file, tuned_file, _, _ = llama_pair
    report = surgery.extract(tuned_file, base_file, tmp_path / "a", rank=4)
    assert report.written and len(report.lora) == 15
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        sources = json.loads(f.metadata()["surgery.source_files"])
    assert {Path(s["path"]).name for s in sources} == {"base.pt", "tuned.pt"}
    assert all(len(s["sha256"]) == 64 for s in sources)


# == refusals ===========================================================================
def test_nothing_changed_is_an_error(llama_pair, tmp_path):
    base_file, _, _, _ = llama_pair
    out = tmp_path / "adapter"
    run = run_cli("extract", base_file, "--base", base_file, "--rank", "4", "-o", out)
    assert_clean_error(run, base_file, contains="nothing to extract", code=1)
    assert not out.exists()


def test_checkpoints_of_different_models_are_refused(llama_pair, tmp_path):
    base_file, _, _, _ = llama_pair
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    out = tmp_path / "adapter"
    run = run_cli("extract", other, "--base", base_file, "--rank", "4", "-o", out)
    assert_clean_error(run, other, contains="is not a fine-tune of", code=1)
    assert not out.exists()


class WithToken(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = torch.nn.Parameter(torch.zeros(4))
        self.fc = torch.nn.Linear(4, 4)


def test_a_changed_tensor_of_no_module_is_refused_unless_excluded(tmp_path):
    torch.manual_seed(0)
    base = WithToken()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.token.add_(1)
        tuned.fc.weight.add_(torch.ones(4, 1) @ torch.ones(1, 4))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "adapter"
    args = ("extract", tmp_path / "tuned.pt", "--base", tmp_path / "base.pt", "--rank", "1", "-o", out)
    assert_clean_error(run_cli(*args), "extract", contains="token (a tensor of no module)", code=1)
    assert not out.exists()
    assert run_cli(*args, "--exclude", "token").exit_code == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["fc"]


@pytest.mark.parametrize(
    "extra, flag",
    [(("--rank", "0"), "--rank"), ((), "--rank"), (("--rank", "2", "--dtype", "int8"), "--dtype")],
)
def test_bad_arguments_name_their_flag(llama_pair, tmp_path, extra, flag):
    base_file, tuned_file, _, _ = llama_pair
    run = run_cli("extract", tuned_file, "--base", base_file, "-o", tmp_path / "a", *extra)
    assert run.exit_code == 2
    assert "Traceback" not in run.stderr and (flag in run.stderr or "rank" in run.stderr.lower())
    assert not (tmp_path / "a").exists()


def test_an_output_folder_in_use_is_refused(llama_pair, tmp_path):
    base_file, tuned_file, _, _ = llama_pair
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = run_cli("extract", tuned_file, "--base", base_file, "--rank", "2", "-o", out)
    assert_clean_error(run, out, contains="not empty", code=2)
    assert (out / "notes.txt").read_text() == "mine"


class Payload:
    def __reduce__(self):
        return (os.system, ("touch CANARY",))


def test_an_unsafe_fine_tune_is_refused_and_never_run(llama_pair, tmp_path, monkeypatch):
    base_file, _, _, _ = llama_pair
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    write_torch_zip(evil, pickle.dumps({"w": Payload()}, protocol=2))
    run = run_cli("extract", evil, "--base", base_file, "--rank", "2", "-o", tmp_path / "a")
    assert_clean_error(run, evil, contains="not safe", code=1)
    assert not (tmp_path / "CANARY").exists() and not (tmp_path / "a").exists()
