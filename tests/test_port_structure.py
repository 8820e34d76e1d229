"""`surgery port` keeps to what the weights mean (issue 11, items 3 to 5):

- torch's own leniency and only it: a checkpoint saved before PyTorch 0.4.1 has no
  `*.num_batches_tracked`; torch's `load_state_dict(strict=True)` fills them, so does port;
- no scrambling: `--reshape` never loads a transposed pair (`[6, 4]` into `[4, 6]`);
- order that means structure: position matching compares both sides in the same kind of
  order (as saved, or the natural order of names when a file sorts its keys) and refuses a
  pairing that lines up only by permuting layers.

Real files written by torch.save and safetensors, real CLI runs, outputs read back with
torch's and safetensors' own loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

import surgery


def port(*args) -> object:
    return run_cli("port", *args)


def port_json(*args) -> tuple[object, dict]:
    run = run_cli("port", *args, "--json")
    assert run.stdout.startswith("{"), run
    return run, json.loads(run.stdout)


def without_counters(state: dict) -> dict:
    """A state_dict as saved before PyTorch 0.4.1: no BatchNorm counters, no `_metadata`."""
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


# == 3. torch's own leniency: num_batches_tracked =================================
@pytest.fixture(scope="module")
def old_resnet18(seeded_resnet18, tmp_path_factory):
    """resnet18 without its 20 counters, as a torch file and as a safetensors file."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("old_resnet18")
    state = without_counters(seeded_resnet18.state)
    torch.save(state, folder / "old.pth")
    save_file(state, folder / "old.safetensors")
    return folder, state


@pytest.mark.parametrize("name", ["old.pth", "old.safetensors"])
def test_missing_num_batches_tracked_is_filled_as_torch_does_under_strict(old_resnet18, tmp_path, name):
    import torch
    import torchvision

    folder, state = old_resnet18
    reference = torchvision.models.resnet18(weights=None)
    reference.load_state_dict(torch.load(folder / "old.pth", weights_only=True), strict=True)  # torch agrees
    out = tmp_path / "out.safetensors"
    run, doc = port_json(folder / name, "--to", "torchvision:resnet18", "-o", out, "--verify")
    assert run.exit_code == 0, run
    assert doc["summary"].startswith("loaded 102/122 tensors")
    assert "filled 20 num_batches_tracked as torch does" in doc["summary"]
    assert "missing 0" in doc["summary"]
    assert len(doc["filled"]) == 20 and doc["missing"] == []
    assert all(k.endswith(".num_batches_tracked") for k in doc["filled"])
    assert "filled 20 num_batches_tracked as torch does (the target's own value)" in doc["steps"]
    written = load_any(out)
    assert written.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(written[key], value), key  # counters 0 (long), as torch left them
    assert written["bn1.num_batches_tracked"].dtype == torch.int64


def test_filled_counters_keep_the_live_models_value_as_torch_keeps_it(old_resnet18):
    import torch
    import torchvision

    folder, _ = old_resnet18
    model, reference = torchvision.models.resnet18(weights=None), torchvision.models.resnet18(weights=None)
    for m in (model, reference):
        m.bn1.num_batches_tracked.fill_(7)
    reference.load_state_dict(torch.load(folder / "old.pth", weights_only=True), strict=True)
    report = surgery.port(folder / "old.pth", into=model, strict=True)
    assert report.plan.complete and len(report.plan.filled) == 20
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert int(model.bn1.num_batches_tracked) == 7


def test_only_the_counters_are_filled_a_missing_running_mean_still_fails(old_resnet18, tmp_path):
    import torch

    folder, state = old_resnet18
    src = tmp_path / "less.pth"
    torch.save({k: v for k, v in state.items() if k != "layer1.0.bn1.running_mean"}, src)
    run, doc = port_json(src, "--to", "torchvision:resnet18", "-o", tmp_path / "out.pt")
    assert run.exit_code == 1
    assert doc["missing"] == ["layer1.0.bn1.running_mean"]
    assert len(doc["filled"]) == 20
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_counters_deleted_from_a_version_2_state_dict_are_refused_as_torch_refuses(tmp_path, legacy):
    """torch.save kept the state_dict's `_metadata` (BatchNorm version 2): the counters were saved,
    then deleted in place. torch's strict load refuses; so does port, and says they are missing."""
    import torch
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key in [k for k in state if k.endswith(".num_batches_tracked")]:
        del state[key]
    assert state._metadata["bn1"]["version"] == 2
    src = tmp_path / "deleted.pth"
    torch.save(state, src, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(RuntimeError, match="Missing key"):
        torchvision.models.resnet18(weights=None).load_state_dict(torch.load(src, weights_only=True))
    out = tmp_path / "out.pt"
    run, doc = port_json(src, "--to", "torchvision:resnet18", "-o", out)
    assert run.exit_code == 1, run
    assert doc["filled"] == [] and len(doc["missing"]) == 20
    assert not out.exists()


def test_counters_of_a_state_dict_saved_as_version_1_are_filled_as_torch_fills_them(tmp_path):
    """What PyTorch 0.4.0 wrote: `_metadata` with BatchNorm at version 1, no counters."""
    import torch
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key in [k for k in state if k.endswith(".num_batches_tracked")]:
        del state[key]
        state._metadata[key.rpartition(".")[0]]["version"] = 1
    src = tmp_path / "v1.pth"
    torch.save(state, src)
    torchvision.models.resnet18(weights=None).load_state_dict(
        torch.load(src, weights_only=True)
    )  # torch agrees
    run, doc = port_json(src, "--to", "torchvision:resnet18", "--dry-run")
    assert run.exit_code == 0, run
    assert len(doc["filled"]) == 20 and doc["missing"] == []


# == 4. --reshape refuses a transpose ==============================================
@pytest.fixture(scope="module")
def transposed_template(seeded_resnet18, tmp_path_factory):
    """resnet18 as a template target whose fc is stored transposed ([512, 1000], a transpose
    is meant) and whose first 1x1 downsample conv is stored as a Linear ([128, 64], a reshape)."""
    from safetensors.torch import save_file

    state = dict(seeded_resnet18.state)
    state["fc.weight"] = state["fc.weight"].t().contiguous() * 0
    state["layer2.0.downsample.0.weight"] = state["layer2.0.downsample.0.weight"].reshape(128, 64) * 0
    path = tmp_path_factory.mktemp("transposed") / "template.safetensors"
    save_file(state, path)
    return path


def test_reshape_refuses_a_transposed_pair_and_a_strict_port_fails(
    seeded_resnet18, transposed_template, tmp_path
):
    out = tmp_path / "out.safetensors"
    run, doc = port_json(seeded_resnet18.plain, "--to", transposed_template, "--reshape", "-o", out)
    assert run.exit_code == 1, run
    assert not out.exists()
    (mismatch,) = doc["mismatched"]
    assert mismatch["target"] == "fc.weight"
    assert mismatch["source_shape"] == [1000, 512] and mismatch["target_shape"] == [512, 1000]
    assert "transpose rule is needed" in mismatch["reason"] and "scramble" in mismatch["reason"]
    assert any(s.startswith("fc.weight: source [1000, 512] against target [512, 1000]") for s in doc["steps"])
    reshaped = [m for m in doc["matched"] if "reshaped_from" in m]
    assert reshaped == [
        {
            "source": "layer2.0.downsample.0.weight",
            "target": "layer2.0.downsample.0.weight",
            "shape": [128, 64],
            "how": "exact",
            "reshaped_from": [128, 64, 1, 1],
        }
    ]


def test_reshape_without_strict_loads_the_rest_and_leaves_the_transposed_slot_alone(
    seeded_resnet18, transposed_template, tmp_path
):
    import torch

    out = tmp_path / "out.safetensors"
    run = port(
        seeded_resnet18.plain, "--to", transposed_template, "--reshape", "--strict", "false", "-o", out
    )
    assert run.exit_code == 0, run
    written, state = load_any(out), seeded_resnet18.state
    assert torch.equal(written["fc.weight"], torch.zeros(512, 1000))  # the template's, never scrambled
    assert torch.equal(
        written["layer2.0.downsample.0.weight"], state["layer2.0.downsample.0.weight"].reshape(128, 64)
    )
    assert "mismatched 1: fc.weight" in run.stdout


# == 5. order that means structure =================================================
def layered(names, seed: int = 0) -> dict:
    """One [4, 4] tensor per name: every position has the same shape, only the order can pair them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(4, 4, generator=generator) for name in names}


def test_order_pairs_layers_by_number_against_a_target_sorted_as_strings(tmp_path):
    """The issue's case: a safetensors template stores `blocks.10` before `blocks.2`."""
    import torch
    from safetensors.torch import save_file

    template = tmp_path / "template.safetensors"
    save_file(layered([f"blocks.{i}.weight" for i in range(12)], seed=1), template)
    source = layered([f"block{i:02d}.weight" for i in range(12)])
    src = tmp_path / "source.pth"
    torch.save(source, src)
    out = tmp_path / "out.safetensors"
    run, doc = port_json(src, "--to", template, "--match", "order", "-o", out)
    assert run.exit_code == 0, run
    pairs = {m["source"]: m["target"] for m in doc["matched"]}
    assert pairs == {f"block{i:02d}.weight": f"blocks.{i}.weight" for i in range(12)}
    assert "--match order: 12 by position (both sides in the natural order of their names)" in doc["steps"]
    written = load_any(out)
    for i in range(12):
        assert torch.equal(written[f"blocks.{i}.weight"], source[f"block{i:02d}.weight"])


@pytest.mark.parametrize("mode", ["order", "auto"])
def test_order_refuses_layers_that_line_up_only_permuted(tmp_path, mode):
    """A torch file saved with its keys sorted as strings (`block10` before `block2`), against a
    template saved in layer order: equal shapes everywhere, but the pairing permutes layers."""
    import torch

    template = tmp_path / "template.pth"
    torch.save(layered([f"blocks.{i}.weight" for i in range(12)], seed=1), template)
    src = tmp_path / "source.pth"
    torch.save(layered(sorted(f"block{i}.weight" for i in range(12))), src)
    out = tmp_path / "out.safetensors"
    run = port(src, "--to", template, "--match", mode, "-o", out)
    assert run.exit_code == 1, run
    assert not out.exists()
    if mode == "order":
        message = "permuting layers: block9.weight -> blocks.11.weight but block10.weight -> blocks.2.weight"
        assert_clean_error(run, src, contains=message, code=1)
    else:  # auto pairs nothing by position, so a strict port misses every key
        assert "missing 12" in run.stderr


@pytest.fixture(scope="module")
def vit_like(tmp_path_factory):
    """A small torchvision VisionTransformer (12 layers), saved as .pth (registration order) and as
    .safetensors (keys sorted as strings), and a template of the same shapes under other names
    (`encoder.layers.encoder_layer_<i>.` -> `encoder.layers.<i>.`, `self_attention` -> `self_attn`)
    written as safetensors: names whose natural order is the source's."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=12, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    state = model.state_dict()
    folder = tmp_path_factory.mktemp("vit_like")
    torch.save(state, folder / "vit.pth")
    save_file(state, folder / "vit.safetensors")

    def renamed(key: str) -> str:
        return key.replace("layers.encoder_layer_", "layers.").replace("self_attention.", "self_attn.")

    save_file({renamed(k): torch.zeros_like(v) for k, v in state.items()}, folder / "template.safetensors")
    return folder, state, renamed


@pytest.mark.parametrize("mode", ["order", "auto"])
def test_the_same_vit_weights_port_alike_from_pth_and_safetensors(vit_like, tmp_path, mode):
    import torch

    folder, state, renamed = vit_like
    plans = []
    for name in ("vit.pth", "vit.safetensors"):
        out = tmp_path / f"{name}.out.safetensors"
        run, doc = port_json(
            folder / name, "--to", folder / "template.safetensors", "--match", mode, "-o", out
        )
        assert run.exit_code == 0, (name, run)
        plans.append(sorted((m["source"], m["target"]) for m in doc["matched"]))
        written = load_any(out)
        for key, value in state.items():
            assert torch.equal(written[renamed(key)], value), (name, key)
    assert plans[0] == plans[1]
    assert plans[0] == sorted((k, renamed(k)) for k in state)


def load_any(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)
