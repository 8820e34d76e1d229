"""`surgery merge`: averages and merges of checkpoints in any formats, against references
written here from the definitions (model soups' average, task arithmetic, TIES, SLERP),
computed in float64 from the tensors the test itself saved.

Every input is a real file: torch.save (zip and legacy), safetensors' save_file, a sharded
safetensors folder with its index, and a torch.distributed.checkpoint folder from dcp.save.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, write_big_safetensors
from safetensors import safe_open
from safetensors.torch import save_file

import surgery
from surgery import MergeRequest, open_checkpoint


# -- inputs -------------------------------------------------------------------------------------
def small_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A conv, a BatchNorm (its num_batches_tracked told apart by seed) and a linear layer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g).to(dtype),
        "bn.weight": torch.rand(8, generator=g).to(dtype),
        "bn.bias": torch.randn(8, generator=g).to(dtype),
        "bn.running_mean": torch.randn(8, generator=g).to(dtype),
        "bn.running_var": torch.rand(8, generator=g).to(dtype) + 0.5,
        "bn.num_batches_tracked": torch.tensor(100 * seed + 7),
        "fc.weight": torch.randn(10, 32, generator=g).to(dtype),
        "fc.bias": torch.randn(10, generator=g).to(dtype),
    }


def save_zip(state: dict, path: Path, **beside) -> Path:
    torch.save({**beside, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return path


def save_legacy(state: dict, path: Path) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


def save_safetensors(state: dict, path: Path) -> Path:
    save_file(state, path)
    return path


def save_sharded(state: dict, folder: Path) -> Path:
    folder.mkdir()
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:]), 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def save_dcp(state: dict, folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "no process group: assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save({k: v.clone() for k, v in state.items()}, checkpoint_id=folder)
    return folder


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def read(path: Path) -> dict[str, torch.Tensor]:
    """What a merged output holds, read by surgery (any format, aliases restored)."""
    ckpt = open_checkpoint(path)
    return {t.name: ckpt.tensor(t.name).clone() for t in ckpt.tensors}


def within_one_ulp(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """|out - reference| at most one unit in the last place of out's dtype, at the reference's magnitude."""
    finfo = torch.finfo(out.dtype)
    scale = torch.exp2(torch.floor(torch.log2(reference.abs().clamp(min=finfo.tiny))))
    return bool(((out.double() - reference).abs() <= finfo.eps * scale).all())


def mean64(states: list[dict], name: str) -> torch.Tensor:
    return torch.stack([s[name].double() for s in states]).sum(0) / len(states)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[list[Path], list[dict]]:
    """Five checkpoints of one model in five formats; the zip one in a training container
    with `module.` keys; the newest (the last) a DCP folder."""
    folder = tmp_path_factory.mktemp("mixed")
    states = [small_state(seed) for seed in range(1, 6)]
    paths = [
        save_zip(states[0], folder / "a.pth.tar", epoch=1),
        save_legacy(states[1], folder / "b.pth"),
        save_safetensors(states[2], folder / "c.safetensors"),
        save_sharded(states[3], folder / "d"),
        save_dcp(states[4], folder / "e"),
    ]
    return paths, states


# -- means --------------------------------------------------------------------------------------
def test_mean_of_five_mixed_formats_within_one_ulp_of_a_float64_reference(mixed, tmp_path):
    paths, states = mixed
    before = [digest(p) for p in paths]
    out = tmp_path / "soup.safetensors"
    run = run_cli("merge", *paths, "-o", out, "--verify")
    assert run.exit_code == 0, run.stderr
    assert "12 merged" not in run.stdout and "7 merged, 1 kept from the last input" in run.stdout, run.stdout
    assert "stripped prefix 'module.'" in run.stdout
    merged = read(out)
    assert set(merged) == set(states[0])
    for name, tensor in merged.items():
        if name.endswith("num_batches_tracked"):
            continue
        assert tensor.dtype == torch.float32
        assert within_one_ulp(tensor, mean64(states, name)), name
    assert merged["bn.num_batches_tracked"].item() == 507  # the last input's (seed 5), never averaged
    assert [digest(p) for p in paths] == before


def test_the_output_names_every_input_file_with_its_sha256_and_the_method(mixed, tmp_path):
    paths, _ = mixed
    out = tmp_path / "soup.safetensors"
    assert run_cli("merge", *paths[:3], "-o", out).exit_code == 0
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    files = json.loads(meta["surgery.source_files"])
    assert [Path(f["path"]) for f in files] == [p.resolve() for p in paths[:3]]
    assert all(f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() for f in files)
    assert json.loads(meta["surgery.merge"]) == {"method": "mean"}
    inputs = json.loads(meta["surgery.inputs"])
    assert [(i["role"], i["container"], i["recorded"]) for i in inputs][0] == (
        "input",
        "state_dict",
        {"epoch": 1},
    )


def test_weighted_mean_normalises_the_weights(mixed, tmp_path):
    paths, states = mixed
    out = tmp_path / "weighted.pt"
    run = run_cli("merge", *paths[:3], "--weights", "1,1,2", "-o", out)  # --weights alone: weighted
    assert run.exit_code == 0, run.stderr
    assert "weights 0.25, 0.25, 0.5" in run.stdout
    merged = torch.load(out, weights_only=True)
    for name in ("conv.weight", "fc.bias"):
        reference = sum(w * s[name].double() for w, s in zip((1, 1, 2), states[:3], strict=True)) / 4
        assert within_one_ulp(merged[name], reference)


def test_bf16_inputs_stay_bf16_and_dtype_casts_them(tmp_path):
    states = [small_state(seed, torch.bfloat16) for seed in (1, 2, 3)]
    paths = [
        save_safetensors(states[0], tmp_path / "a.safetensors"),
        save_zip(states[1], tmp_path / "b.pt"),
        save_legacy(states[2], tmp_path / "c.pt"),
    ]
    out = tmp_path / "bf16.pt"
    assert run_cli("merge", *paths, "-o", out).exit_code == 0
    merged = torch.load(out, weights_only=True)
    assert merged["conv.weight"].dtype == torch.bfloat16
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            assert within_one_ulp(tensor, mean64(states, name)), name
    wide = tmp_path / "fp32.safetensors"
    run = run_cli("merge", *paths, "-o", wide, "--dtype", "fp32")
    assert "bfloat16 -> float32: 7 tensors" in run.stdout
    merged = read(wide)
    assert merged["conv.weight"].dtype == torch.float32
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    assert within_one_ulp(merged["fc.weight"], mean64(states, "fc.weight"))


def test_inputs_of_different_dtypes_are_written_as_the_first_ones_and_reported(tmp_path):
    a, b = small_state(1), small_state(2, torch.bfloat16)
    paths = [save_safetensors(a, tmp_path / "a.safetensors"), save_safetensors(b, tmp_path / "b.safetensors")]
    run = run_cli("merge", *paths, "-o", tmp_path / "out.safetensors")
    assert run.exit_code == 0, run.stderr
    assert "float32 vs bfloat16: 7 tensors" in run.stdout
    merged = read(tmp_path / "out.safetensors")
    assert merged["fc.weight"].dtype == torch.float32
    assert within_one_ulp(merged["fc.weight"], mean64([a, b], "fc.weight"))


# -- --last --------------------------------------------------------------------------------------
def test_last_takes_the_newest_by_recorded_epoch_and_their_integer_buffers(tmp_path):
    epochs = {"run_a.pt": 4, "run_b.pt": 1, "run_c.pt": 5, "run_d.pt": 2, "run_e.pt": 3}
    states = {name: small_state(epoch) for name, epoch in epochs.items()}
    paths = [save_zip(states[name], tmp_path / name, epoch=epoch) for name, epoch in epochs.items()]
    out = tmp_path / "averaged.safetensors"
    run = run_cli("merge", *paths, "--last", "3", "-o", out, "--json", "--strip-prefix", "module.")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    newest = ["run_e.pt", "run_a.pt", "run_c.pt"]  # epochs 3, 4, 5: oldest first
    assert [Path(i["path"]).name for i in doc["inputs"]] == newest
    assert [i["recorded"] for i in doc["inputs"]] == [{"epoch": 3}, {"epoch": 4}, {"epoch": 5}]
    assert doc["selection"]["by"] == "epoch"
    assert sorted(Path(p).name for p in doc["selection"]["left_out"]) == ["run_b.pt", "run_d.pt"]
    merged = read(out)
    assert merged["bn.num_batches_tracked"].item() == 507  # epoch 5's
    chosen = [states[name] for name in newest]
    assert within_one_ulp(merged["conv.weight"], mean64(chosen, "conv.weight"))


def test_last_without_recorded_steps_goes_by_name_in_natural_order(tmp_path):
    paths = [save_safetensors(small_state(n), tmp_path / f"checkpoint{n}.safetensors") for n in (10, 2, 9)]
    run = run_cli("merge", *paths, "--last", "2", "-o", tmp_path / "out.safetensors")
    assert run.exit_code == 0, run.stderr
    assert "the 2 newest of 3 by name" in run.stdout
    assert "left out  " + str(tmp_path / "checkpoint2.safetensors") in run.stdout
    merged = read(tmp_path / "out.safetensors")
    assert merged["bn.num_batches_tracked"].item() == 1007  # checkpoint10 is the newest


# -- tied weights ---------------------------------------------------------------------------------
class TiedLM(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(16, 4)
        self.block = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 16, bias=False)
        self.lm_head.weight = self.embed.weight


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> tuple[list[Path], list[dict]]:
    folder = tmp_path_factory.mktemp("tied")
    states = [TiedLM(seed).state_dict() for seed in (1, 2, 3)]
    paths = [folder / f"lm{i}.pt" for i in range(3)]
    for state, path in zip(states, paths, strict=True):
        torch.save(state, path)
    return paths, states


def test_tied_weights_stay_one_storage_in_a_torch_output(tied, tmp_path):
    paths, states = tied
    out = tmp_path / "lm.pt"
    run = run_cli("merge", *paths, "-o", out, "--verify")
    assert run.exit_code == 0, run.stderr
    assert "lm_head.weight = embed.weight" in run.stdout
    merged = torch.load(out, weights_only=True)
    assert (
        merged["lm_head.weight"].untyped_storage().data_ptr()
        == merged["embed.weight"].untyped_storage().data_ptr()
    )
    assert within_one_ulp(merged["lm_head.weight"], mean64(states, "embed.weight"))


def test_tied_weights_are_stored_once_in_safetensors_and_read_back_tied(tied, tmp_path):
    paths, states = tied
    out = tmp_path / "lm.safetensors"
    assert run_cli("merge", *paths, "-o", out).exit_code == 0
    with safe_open(out, "pt") as f:
        assert sorted(f.keys()) == ["block.bias", "block.weight", "embed.weight"]
        assert json.loads(f.metadata()["surgery.aliases"]) == {"lm_head.weight": "embed.weight"}
    ckpt = open_checkpoint(out)
    assert ckpt.aliases == {"lm_head.weight": "embed.weight"}
    assert within_one_ulp(ckpt.tensor("lm_head.weight"), mean64(states, "embed.weight"))
    again = tmp_path / "again.pt"  # a merge of merges keeps them tied
    assert run_cli("merge", out, paths[0], "-o", again).exit_code == 0
    merged = torch.load(again, weights_only=True)
    assert merged["lm_head.weight"].data_ptr() == merged["embed.weight"].data_ptr()


# -- task arithmetic, TIES, SLERP -------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and three fine-tunes of it (the base plus task vectors of mixed signs)."""
    folder = tmp_path_factory.mktemp("tasks")
    base = small_state(0)
    tuned = []
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        tuned.append(
            {
                k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + seed
                for k, v in base.items()
            }
        )
    base_path = save_safetensors(base, folder / "base.safetensors")
    paths = [
        save_zip(tuned[0], folder / "t1.pt"),
        save_safetensors(tuned[1], folder / "t2.safetensors"),
        save_legacy(tuned[2], folder / "t3.pt"),
    ]
    return base_path, paths, base, tuned


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors(finetuned, tmp_path):
    base_path, paths, base, tuned = finetuned
    out = tmp_path / "tasks.safetensors"
    run = run_cli(
        "merge", *paths, "--method", "task-arithmetic", "--base", base_path, "--scale", "0.7", "-o", out
    )
    assert run.exit_code == 0, run.stderr
    merged = read(out)
    for name in ("conv.weight", "fc.bias", "bn.running_var"):
        reference = base[name].double() + 0.7 * sum(t[name].double() - base[name].double() for t in tuned)
        assert within_one_ulp(merged[name], reference), name
    assert merged["bn.num_batches_tracked"].item() == tuned[2]["bn.num_batches_tracked"].item()


def ties_reference(
    base: torch.Tensor, tuned: list[torch.Tensor], density: float, scale: float
) -> torch.Tensor:
    """Yadav et al. 2023, as written: trim each task vector to its top-k% magnitudes, elect the
    sign of each parameter as that of the trimmed vectors' total mass, average the values that
    agree with it, scale, add to the base."""
    trimmed = []
    for t in tuned:
        tau = (t.double() - base.double()).flatten()
        k = int(density * tau.numel())
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[tau.abs().topk(k).indices] = True
        trimmed.append(torch.where(keep, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(0))
    elected[elected == 0] = 1
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    disjoint = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (base.double().flatten() + scale * disjoint).reshape(base.shape)


def test_ties_against_the_papers_definition(finetuned, tmp_path):
    base_path, paths, base, tuned = finetuned
    out = tmp_path / "ties.pt"
    run = run_cli(
        "merge",
        *paths,
        "--method",
        "ties",
        "--base",
        base_path,
        "--density",
        "0.3",
        "--scale",
        "1.5",
        "-o",
        out,
    )
    assert run.exit_code == 0, run.stderr
    merged = torch.load(out, weights_only=True)
    for name in ("conv.weight", "fc.weight", "bn.bias"):
        reference = ties_reference(base[name], [t[name] for t in tuned], 0.3, 1.5)
        assert within_one_ulp(merged[name], reference), name
        assert not within_one_ulp(
            merged[name], base[name].double() + 1.5 * mean64(tuned, name) - 1.5 * base[name].double()
        )


def test_ties_elects_signs_and_averages_only_the_agreeing_values(tmp_path):
    """By hand: task vectors [3, -1, 2], [1, 2, -4], [-2, 1, 1]; kept whole (density 1), the
    signs elected are +, +, -; the agreeing values average to 2, 1.5 and -4."""
    base = {"w": torch.zeros(3)}
    tasks = [[3.0, -1.0, 2.0], [1.0, 2.0, -4.0], [-2.0, 1.0, 1.0]]
    paths = [
        save_safetensors({"w": torch.tensor(t)}, tmp_path / f"t{i}.safetensors") for i, t in enumerate(tasks)
    ]
    base_path = save_safetensors(base, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    run = run_cli("merge", *paths, "--method", "ties", "--base", base_path, "--density", "1", "-o", out)
    assert run.exit_code == 0, run.stderr
    assert read(out)["w"].tolist() == [2.0, 1.5, -4.0]


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's slerp of the flattened tensors: sin((1-t)Ω)/sin Ω a + sin(tΩ)/sin Ω b."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    omega = torch.arccos(torch.dot(a64, b64) / (a64.norm() * b64.norm()))
    return ((torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)).reshape(
        a.shape
    )


def test_slerp_against_its_definition_and_lerp_when_colinear(tmp_path):
    a, b = small_state(1), small_state(2)
    b["fc.bias"] = 2 * a["fc.bias"]  # colinear: slerp is undefined, lerp is the limit
    paths = [save_safetensors(a, tmp_path / "a.safetensors"), save_legacy(b, tmp_path / "b.pt")]
    out = tmp_path / "slerp.safetensors"
    run = run_cli("merge", *paths, "--method", "slerp", "--t", "0.3", "-o", out)
    assert run.exit_code == 0, run.stderr
    merged = read(out)
    for name in ("conv.weight", "fc.weight"):
        assert within_one_ulp(merged[name], slerp_reference(a[name], b[name], 0.3)), name
        assert not within_one_ulp(merged[name], 0.7 * a[name].double() + 0.3 * b[name].double())
    assert within_one_ulp(merged["fc.bias"], 0.7 * a["fc.bias"].double() + 0.3 * b["fc.bias"].double())


def test_merge_pieces_equal_the_whole_tensor_merge():
    """Streaming cuts tensors into pieces at different places in each file: the result is the same."""
    from surgery.models.merges import MergeParams, merge_pieces, merge_tensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g, dtype=torch.float64)
    tuned = [base + torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(3)]
    params = MergeParams(scale=0.8, density=0.25, t=0.4)

    def stream(t: torch.Tensor, size: int):
        return lambda: iter(t.split(size))

    for method, inputs in (
        ("ties", tuned),
        ("task-arithmetic", tuned),
        ("mean", tuned),
        ("slerp", tuned[:2]),
    ):
        whole = merge_tensors(method, inputs, base, params)
        cut = torch.cat(
            list(
                merge_pieces(
                    method, [stream(t, 7 + 3 * i) for i, t in enumerate(inputs)], stream(base, 64), params
                )
            )
        )
        assert torch.equal(whole, cut), method


# -- --strict false, outputs ---------------------------------------------------------------------------
def test_strict_false_merges_the_common_keys_and_takes_the_rest_from_the_first_input(tmp_path):
    a, b = small_state(1), small_state(2)
    b.pop("fc.bias")
    b["fc.weight"] = torch.randn(2, 32)
    paths = [save_safetensors(a, tmp_path / "a.safetensors"), save_safetensors(b, tmp_path / "b.safetensors")]
    out = tmp_path / "out.safetensors"
    run = run_cli("merge", *paths, "--strict", "false", "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["not_merged"] == {
        "fc.weight": {"from": str(paths[0]), "why": "shapes differ"},
        "fc.bias": {"from": str(paths[0]), "why": f"not in {paths[1]}"},
    }
    merged = read(out)
    assert torch.equal(merged["fc.weight"], a["fc.weight"]) and torch.equal(merged["fc.bias"], a["fc.bias"])
    assert within_one_ulp(merged["conv.weight"], mean64([a, b], "conv.weight"))


def test_strict_false_takes_what_the_inputs_do_not_share_from_the_base(finetuned, tmp_path):
    base_path, paths, base, tuned = finetuned
    extra = {**tuned[0], "head.weight": torch.ones(2, 2)}
    changed = save_safetensors(extra, tmp_path / "t1.safetensors")
    out = tmp_path / "out.safetensors"
    args = ("--method", "task-arithmetic", "--base", base_path, "--strict", "false", "-o", out, "--json")
    run = run_cli("merge", changed, *paths[1:], *args)
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["not_merged"] == {
        "head.weight": {"from": str(changed), "why": f"not in {base_path}"}
    }
    assert torch.equal(read(out)["head.weight"], torch.ones(2, 2))


def test_a_sharded_output_and_a_recipe_file(mixed, tmp_path):
    paths, states = mixed
    recipe = tmp_path / "merge.toml"
    listed = ", ".join(json.dumps(str(p)) for p in paths[:2])
    recipe.write_text(
        f'inputs = [{listed}]\nout = "{tmp_path / "shards"}"\nshard_size = "2KB"\nweights = [3, 1]\n'
    )
    run = run_cli("merge", "--recipe", recipe, "--verify")
    assert run.exit_code == 0, run.stderr
    assert "(sharded-safetensors)" in run.stdout and "verified" in run.stdout
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 1
    merged = read(tmp_path / "shards")
    reference = (3 * states[0]["fc.weight"].double() + states[1]["fc.weight"].double()) / 4
    assert within_one_ulp(merged["fc.weight"], reference)


def test_dry_run_writes_nothing(mixed, tmp_path):
    paths, _ = mixed
    out = tmp_path / "soup.safetensors"
    run = run_cli("merge", *paths, "-o", out, "--dry-run")
    assert run.exit_code == 0, run.stderr
    assert "would write 8 tensors" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_json_document(mixed, tmp_path):
    paths, _ = mixed
    out = tmp_path / "soup.pt"
    run = run_cli("merge", *paths[:2], "-o", out, "--json")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["surgery_json"] == 1 and doc["written"] is True
    assert doc["method"] == {"method": "mean"}
    assert (doc["tensors"], doc["merged"], doc["output"], doc["output_format"]) == (8, 7, str(out), "torch")
    assert doc["kept"] == {"bn.num_batches_tracked": {"dtype": "int64", "from": str(paths[1])}}
    first = doc["inputs"][0]
    assert (first["role"], first["format"], first["container"]) == ("input", "torch-zip", ["state_dict"])
    assert first["steps"] == ["stripped prefix 'module.' from 8 keys"]
    assert first["files"] == [
        {"path": str(paths[0]), "sha256": hashlib.sha256(paths[0].read_bytes()).hexdigest()}
    ]


def test_the_library_call_and_its_report(mixed, tmp_path):
    paths, states = mixed
    report = surgery.merge(paths[:2], tmp_path / "soup.safetensors")
    assert report.written and report.merged == 7 and report.kept == {"bn.num_batches_tracked": "int64"}
    request = MergeRequest.from_fields(
        {"inputs": [str(p) for p in paths[:2]], "out": str(tmp_path / "b.pt"), "weights": "1,3"}
    )
    assert (request.method, request.weights) == ("weighted", (1.0, 3.0))
    assert surgery.merge_file(request).to_json()["method"] == {"method": "weighted", "weights": [1.0, 3.0]}


# -- bad input: one line, non-zero, nothing written, inputs untouched --------------------------------------
@pytest.fixture
def pair(tmp_path) -> list[Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    return [
        save_safetensors(small_state(1), folder / "a.safetensors"),
        save_zip(small_state(2), folder / "b.pt"),
    ]


def refused(args: list, inputs: list[Path], where: object, contains: str, code: int) -> None:
    out_dir = inputs[0].parent.parent / "out"
    out_dir.mkdir(exist_ok=True)
    before = {p: digest(p) for p in inputs}
    run = run_cli("merge", *args)
    assert_clean_error(run, where, contains=contains, code=code)
    assert list(out_dir.iterdir()) == []
    assert sorted(p.name for p in inputs[0].parent.iterdir()) == sorted(p.name for p in inputs)
    assert {p: digest(p) for p in inputs} == before


def test_fewer_than_two_inputs(pair):
    refused([pair[0], "-o", pair[0].parent.parent / "out" / "x.pt"], pair, "INPUTS", "at least two", 2)


def test_an_input_missing_a_key(pair, tmp_path):
    state = small_state(3)
    del state["fc.bias"]
    lacking = save_safetensors(state, pair[0].parent / "c.safetensors")
    out = tmp_path / "out" / "x.pt"
    refused([*pair, lacking, "-o", out], [*pair, lacking], lacking, "lacks 1 of its keys (fc.bias)", 1)


def test_shapes_that_differ(pair, tmp_path):
    state = small_state(3)
    state["fc.weight"] = torch.zeros(2, 32)
    other = save_legacy(state, pair[0].parent / "c.pt")
    refused(
        [*pair, other, "-o", tmp_path / "out" / "x.pt"],
        [*pair, other],
        other,
        "fc.weight [2, 32] vs [10, 32]",
        1,
    )


def test_a_corrupt_input(pair, tmp_path):
    damaged = pair[0].parent / "c.safetensors"
    damaged.write_bytes(pair[0].read_bytes()[:-100])
    refused([*pair, damaged, "-o", tmp_path / "out" / "x.pt"], [*pair, damaged], damaged, "", 1)


def test_the_output_equal_to_an_input(pair):
    refused([*pair, "-o", pair[1], "--force"], pair, pair[1], "is an input of this run", 2)


def test_an_output_equal_to_an_input_that_last_leaves_out(pair):
    """a.safetensors is the oldest by name: left out of the merge, still never written over."""
    newer = save_zip(small_state(3), pair[0].parent / "c.pt")
    args = [*pair, newer, "--last", "2", "-o", pair[0], "--force"]
    refused(args, [*pair, newer], pair[0], "is an input of this run", 2)


def test_a_wrong_number_of_weights(pair, tmp_path):
    refused(
        [*pair, "--weights", "1,2,3", "-o", tmp_path / "out" / "x.pt"],
        pair,
        "--weights",
        "3 weights for 2 inputs",
        2,
    )


def test_slerp_with_three_inputs(pair, tmp_path):
    third = save_safetensors(small_state(3), pair[0].parent / "c.safetensors")
    args = [*pair, third, "--method", "slerp", "-o", tmp_path / "out" / "x.pt"]
    refused(args, [*pair, third], "INPUTS", "slerp merges exactly 2 checkpoints, not 3", 2)


def test_ties_without_base(pair, tmp_path):
    refused([*pair, "--method", "ties", "-o", tmp_path / "out" / "x.pt"], pair, "--base", "ties needs", 2)


def test_a_parameter_of_another_method(pair, tmp_path):
    refused(
        [*pair, "--density", "0.5", "-o", tmp_path / "out" / "x.pt"],
        pair,
        "--density",
        "not of --method mean",
        2,
    )


def test_an_unsafe_input_is_refused_without_trust(pair, tmp_path):
    unsafe = pair[0].parent / "c.pth"
    unsafe.write_bytes((Path(__file__).parent.parent / "fixtures" / "payload_os_system.pth").read_bytes())
    refused([*pair, unsafe, "-o", tmp_path / "out" / "x.pt"], [*pair, unsafe], unsafe, "not safe to load", 1)


def test_views_that_repeat_their_bytes_are_refused_before_any_work(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i in range(2):
        paths.append(folder / f"x{i}.pt")
        torch.save({"w": torch.zeros(1).expand(1 << 30)}, paths[-1])  # 4 GiB viewed from 4 bytes
    refused([*paths, "-o", tmp_path / "out" / "x.pt"], paths, paths[0], "the output would be 4.0 GiB", 1)


def test_strict_must_be_true_or_false(pair, tmp_path):
    refused(
        [*pair, "--strict", "maybe", "-o", tmp_path / "out" / "x.pt"],
        pair,
        "--strict",
        "not true or false",
        2,
    )


def test_the_merge_is_exact_where_the_mean_is_representable():
    """Sanity of the helper the tests lean on: one ulp apart passes, two do not."""
    x = torch.tensor([1.0])
    assert within_one_ulp(torch.nextafter(x, torch.tensor([2.0])), x.double())
    assert not within_one_ulp(x + 2 * torch.finfo(torch.float32).eps, x.double())
    assert math.isclose(float(torch.finfo(torch.bfloat16).eps), 2**-7)


def test_tensors_larger_than_a_piece_cut_differently_in_each_file(tmp_path):
    """A tensor of more than one piece, stored plainly in one file and as a transposed view in
    another (read through torch, cut at other places): merged element for element."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1100, 1000, generator=g)
    b = torch.randn(1000, 1100, generator=g).t()  # not contiguous: no byte range to read
    paths = [save_safetensors({"w": a}, tmp_path / "a.safetensors"), tmp_path / "b.pt"]
    torch.save({"w": b}, paths[1])
    out = tmp_path / "out.safetensors"
    assert run_cli("merge", *paths, "-o", out).exit_code == 0
    assert torch.equal(read(out)["w"], ((a.double() + b.double()) / 2).float())


def test_bool_and_integer_tensors_are_the_last_inputs_never_averaged(tmp_path):
    states = [
        {
            **small_state(seed),
            "mask": torch.rand(16) > 0.5,
            "codes": torch.randint(-128, 127, (6,), dtype=torch.int8),
        }
        for seed in (1, 2, 3)
    ]
    paths = [save_safetensors(s, tmp_path / f"s{i}.safetensors") for i, s in enumerate(states)]
    run = run_cli("merge", *paths, "-o", tmp_path / "out.pt", "--json")
    assert run.exit_code == 0, run.stderr
    kept = json.loads(run.stdout)["kept"]
    assert {name: k["dtype"] for name, k in kept.items()} == {
        "bn.num_batches_tracked": "int64",
        "mask": "bool",
        "codes": "int8",
    }
    merged = torch.load(tmp_path / "out.pt", weights_only=True)
    for name in ("mask", "codes", "bn.num_batches_tracked"):
        assert torch.equal(merged[name], states[-1][name]), name


def test_key_picks_the_same_container_in_every_input_and_dcp_is_written(tmp_path):
    """`--key model_ema` merges the EMA weights of two training checkpoints, into a DCP folder."""
    states = [small_state(1), small_state(2)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"train{i}.pth")
        torch.save({"model": small_state(10 + i), "model_ema": state, "epoch": i}, paths[-1])
    out = tmp_path / "ema-dcp"
    run = run_cli("merge", *paths, "--key", "model_ema", "--format", "dcp", "-o", out, "--verify")
    assert run.exit_code == 0, run.stderr
    assert "train0.pth: model_ema (torch-zip)" in run.stdout
    merged = read(out)
    assert within_one_ulp(merged["fc.weight"], mean64(states, "fc.weight"))


@pytest.mark.slow  # a process of its own, to see what it imports
def test_a_dry_run_imports_no_torch(mixed):
    import subprocess
    import sys

    paths, _ = mixed
    code = (
        "import sys, surgery; "
        f"surgery.merge({[str(p) for p in paths]!r}, 'x.safetensors', dry_run=True); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_progress_counts_every_byte_written_once(tied, tmp_path):
    paths, _ = tied
    announced, ticks = [], []

    def start(tensors: int, total: int):
        announced.append((tensors, total))
        return ticks.append

    report = surgery.merge(paths, tmp_path / "lm.pt", progress=start)
    assert announced == [(4, report.bytes_out)]  # the tied name is one tensor's bytes
    assert sum(ticks) == report.bytes_out


# -- memory: inputs far larger than a few tensors merge in a few tensors' memory ----------
def finite_block(seed: int) -> bytes:
    """64 KiB of random float32 bits, every value finite (the exponent's top bit cleared: |x| < 2)."""
    import random

    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) & (0xBF if k % 4 == 3 else 0xFF) for k in range(1 << 16))


MEASURED = """
import json, resource, subprocess, sys
peaks = {}
for what, code in (("floor", sys.argv[1]), ("merge", sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    peaks[what] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(peaks))
"""


@pytest.mark.slow
def test_four_large_inputs_merge_in_the_memory_of_a_few_tensors(tmp_path):
    """Four inputs of 160 MiB (640 MiB in all, tensors of 40 MiB): the merge's peak memory above
    what importing torch and surgery costs stays under three of the largest tensors."""
    inputs = [tmp_path / f"in{i}.safetensors" for i in range(4)]
    for seed, path in enumerate(inputs):
        write_big_safetensors(path, tensors=4, mib_each=40, block=finite_block(seed))
    out = tmp_path / "mean.safetensors"
    floor = "import torch, surgery.commands.merge, surgery.formats.safetensors_file"
    merge = f"import surgery; surgery.merge({[str(p) for p in inputs]!r}, {str(out)!r})"
    # ru_maxrss of RUSAGE_CHILDREN is the largest child's: the floor runs first, so a larger
    # figure after the merge is the merge's own peak.
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED, floor, merge], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout)
    above = (peaks["merge"] - peaks["floor"]) * 1024
    assert above < 3 * (40 << 20), peaks  # inputs: 640 MiB; merged whole they would need all of it
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f, safe_open(str(inputs[0]), "pt") as first:
        assert f.get_slice("layer3.weight").get_shape() == first.get_slice("layer3.weight").get_shape()
        got = f.get_slice("layer3.weight")[:1000]
    expected = sum(safe_open(str(p), "pt").get_slice("layer3.weight")[:1000].double() for p in inputs) / 4
    assert torch.equal(got, expected.float())


# -- casts that lose values --------------------------------------------------------------
@pytest.fixture
def wide_values(tmp_path) -> tuple[Path, Path]:
    """Two float32 checkpoints whose mean overflows float16 (2e5) and flushes 1e-9 to zero."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.tensor([1e5, 2.0, 1e-9]), "b": torch.ones(2)}, str(a))
    save_file({"w": torch.tensor([3e5, 2.0, 1e-9]), "b": torch.ones(2)}, str(b))
    return a, b


def test_a_merge_cast_that_overflows_or_flushes_is_refused_with_the_report(wide_values, tmp_path):
    out = tmp_path / "half.safetensors"
    run = run_cli("merge", *wide_values, "--dtype", "fp16", "-o", out)
    assert_clean_error(run, out, contains="the cast float32 -> float16 loses values in w", code=1)
    assert "w: 1 overflow to inf, 1 flushed to zero" in run.stdout and "refused" in run.stdout
    assert not out.exists()
    doc = json.loads(run_cli("merge", *wide_values, "--dtype", "fp16", "-o", out, "--json").stdout)
    assert doc["lossy_cast"]["w"]["overflow"] == 1 and doc["written"] is False


def test_allow_lossy_cast_writes_it_and_says_so(wide_values, tmp_path):
    out = tmp_path / "half.safetensors"
    run = run_cli("merge", *wide_values, "--dtype", "fp16", "-o", out, "--allow-lossy-cast")
    assert run.exit_code == 0, run.stderr
    assert "lossy cast" in run.stdout
    with safe_open(str(out), "pt") as f:
        w = f.get_tensor("w")
    assert w.dtype == torch.float16 and torch.isinf(w[0]) and w[2] == 0


def test_a_merge_in_its_own_dtype_overflowing_is_refused_but_rounding_to_zero_is_not(tmp_path):
    """Task arithmetic can leave float16's range; a value below its smallest subnormal is rounding."""
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file({"w": torch.tensor([30000.0, 0.0], dtype=torch.float16)}, str(base))
    save_file({"w": torch.tensor([60000.0, 6e-8], dtype=torch.float16)}, str(tuned))
    out = tmp_path / "out.safetensors"
    run = run_cli("merge", tuned, "--base", base, "--method", "task-arithmetic", "--scale", "2", "-o", out)
    assert_clean_error(run, out, contains="1 overflow to inf", code=1)
    small = tmp_path / "small.safetensors"
    run = run_cli(
        "merge", tuned, "--base", base, "--method", "task-arithmetic", "--scale", "0.25", "-o", small
    )
    assert run.exit_code == 0, run.stdout + run.stderr  # 6e-8 / 4 rounds to 0 in float16: not counted


@pytest.mark.parametrize("seed", range(6))
def test_ties_threshold_from_streamed_passes_equals_kthvalue_of_the_whole(seed):
    """The histogram's bin holds the threshold exactly: ties, zero changes and pieces of any cut."""
    from surgery.models.merges import _threshold

    torch.manual_seed(seed)
    n = 1 + seed * 997
    base = torch.randn(n, dtype=torch.float64)
    tuned = base + (torch.randint(-3, 4, (n,)).double() if seed % 2 else torch.randn(n, dtype=torch.float64))
    for density in (0.0, 0.05, 0.2, 0.5, 1.0):
        change = (tuned - base).abs()
        keep = int(density * n)
        expected = math.inf if keep == 0 else float(change.kthvalue(n - keep + 1).values)

        def pieces(x: torch.Tensor):
            return lambda: iter(x[i : i + 333] for i in range(0, n, 333))

        assert _threshold(pieces(base), pieces(tuned), density) == expected
