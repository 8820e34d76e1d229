"""`surgery.port(source, into=model)` into a model sharded across ranks with FSDP2's
`fully_shard`: each rank reads only the rows of its own block of each tensor.

Two real ranks (torchrun, gloo on the CPU); every parameter, gathered, equals a plain load of
the source, from each format surgery writes; each rank's peak memory grows by its share of the
model, not by the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
LAYERS, WIDTH = 8, 1024  # 8 x 4 MiB weights: 32 MiB of float32

# Both checks in one torchrun launch (a launch costs each rank and the launcher an import of
# torch): each rank writes what it found under each check's name, even when a check raises.
RANKS = """
import json, resource, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
import surgery

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def build(meta):
    with torch.device("meta" if meta else "cpu"):
        model = nn.Sequential(*[nn.Linear({width}, {width}) for _ in range({layers})], nn.LayerNorm({width}))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    if meta:
        model.to_empty(device="cpu")  # each rank allocates its own block only
    return model

def every_format(sources):
    results = {{}}
    expected = surgery.open_checkpoint(sources[0]).state_dict()
    for source in sources:
        model = build(meta=False)
        report = surgery.port(source, into=model)
        full = {{k: v.full_tensor() for k, v in model.state_dict().items()}}
        local = sum(p.to_local().numel() for p in model.parameters())
        results[source] = {{
            "summary": report.summary(),
            "equal": sorted(full) == sorted(expected) and all(torch.equal(full[k], expected[k]) for k in expected),
            "local": local,
        }}
    model = build(meta=True)
    before = peak_kib()
    surgery.port(sources[0], into=model)
    results["grew_kib"] = peak_kib() - before
    return results

def shard(model):
    for block in (model.layer1, model.layer2, model.layer3, model.layer4):
        fully_shard(block)
    fully_shard(model)

def load_ready(ready):
    whole = surgery.load_ready(ready)
    sharded = surgery.load_ready(ready, shard=shard)
    expected = whole.model.state_dict()
    got = {{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.model.state_dict().items()}}
    frozen = sorted(n for n, p in sharded.model.named_parameters() if not p.requires_grad)
    groups = [(g.get("name"), g.get("lr"), len(g["params"])) for g in sharded.param_groups]
    return {{
        "equal": sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected),
        "frozen": frozen == sorted(n for n, p in whole.model.named_parameters() if not p.requires_grad),
        "groups": groups == [(g.get("name"), g.get("lr"), len(g["params"])) for g in whole.param_groups],
        "some_frozen": bool(frozen),
    }}

dist.init_process_group("gloo")
results = {{"rank": dist.get_rank()}}
try:
    results["every_format"] = every_format(sys.argv[2:])
    results["load_ready"] = load_ready(sys.argv[1])
finally:  # a file each: the ranks' prints interleave
    with open(__file__ + f".{{dist.get_rank()}}.json", "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
"""
CHECKS = ("every_format", "load_ready")


@dataclass(frozen=True)
class Launch:
    """What each rank of the one launch found, by check."""

    ranks: list[dict]
    returncode: int
    stderr: str

    def found(self, check: str) -> list[dict]:
        """Each rank's results of `check`: a check that raised (or never ran) fails here, by name."""
        assert sorted(r["rank"] for r in self.ranks) == [0, 1], self.stderr
        assert all(check in r for r in self.ranks), f"{check} did not finish:\n{self.stderr}"
        done = all(c in r for r in self.ranks for c in CHECKS)
        assert self.returncode == 0 or not done, f"the launch failed after every check:\n{self.stderr}"
        return [r[check] for r in self.ranks]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """One model's weights as safetensors, a torch file, and surgery's DCP and sharded outputs."""
    folder = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)], torch.nn.LayerNorm(WIDTH)
    )
    for p in model.parameters():
        torch.nn.init.normal_(p)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    torch.save(state, folder / "model.pt")
    for args in (["--format", "dcp"], ["--shard-size", "10MB"]):
        out = folder / ("dcp" if "dcp" in args else "shards")
        run = run_cli("convert", folder / "model.safetensors", "-o", out, *args)
        assert run.exit_code == 0, run.stderr
    return [folder / "model.safetensors", folder / "model.pt", folder / "dcp", folder / "shards"]


@pytest.fixture(scope="module")
def ready(seeded_resnet18, tmp_path_factory) -> Path:
    """A fine-tune-ready resnet18: 10 classes, layer1 frozen, the head's own learning rate."""
    ready = tmp_path_factory.mktemp("ready") / "ready.safetensors"
    port = ["port", seeded_resnet18.plain, "--to", "torchvision:resnet18", "--num-classes", "10"]
    port += ["--freeze", "layer1.*", "--lr", "fc.*=0.01", "-o", ready, "--strict", "false"]
    run = run_cli(*port)
    assert run.exit_code == 0, run.stderr
    return ready


@pytest.fixture(scope="module")
def launch(sources, ready, tmp_path_factory) -> Launch:
    folder = tmp_path_factory.mktemp("launch")
    script = folder / "ranks.py"
    script.write_text(textwrap.dedent(RANKS.format(width=WIDTH, layers=LAYERS)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, ready, *sources], capture_output=True, text=True, env=env, timeout=300)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("ranks.py.*.json"))]
    return Launch(ranks, proc.returncode, proc.stderr)


@pytest.mark.slow
def test_two_ranks_each_load_their_own_block_from_every_format(launch, sources):
    total = sum(p.numel() for p in torch.load(sources[1], weights_only=True).values())
    for rank, found in enumerate(launch.found("every_format")):
        for source in map(str, sources):
            assert found[source]["equal"], (rank, source)
            assert found[source]["summary"].startswith("loaded 18/18 tensors (100.0% of parameters)")
            assert found[source]["local"] < 0.6 * total  # a block, not the model
        model_kib = 4 * total // 1024
        largest_kib = 4 * WIDTH * WIDTH // 1024
        assert found["grew_kib"] < model_kib / 2 + 2 * largest_kib, (
            rank,
            found,
        )  # its half, plus a tensor's rows


@pytest.mark.slow
def test_load_ready_shards_a_fine_tune_ready_file_across_ranks(launch):
    found = launch.found("load_ready")
    assert all(r["equal"] and r["frozen"] and r["groups"] and r["some_frozen"] for r in found), found
