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
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
LAYERS, WIDTH = 8, 1024  # 8 x 4 MiB weights: 32 MiB of float32

RANK = """
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

dist.init_process_group("gloo")
results = {{}}
expected = surgery.open_checkpoint(sys.argv[1]).state_dict()
for source in sys.argv[1:]:
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
surgery.port(sys.argv[1], into=model)
results["grew_kib"] = peak_kib() - before
with open(__file__ + f".{{dist.get_rank()}}.json", "w") as f:  # a file each: prints interleave
    json.dump({{"rank": dist.get_rank(), **results}}, f)
dist.destroy_process_group()
"""


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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--format", "dcp"], ["--shard-size", "10MB"]):
        out = folder / ("dcp" if "dcp" in args else "shards")
        subprocess.run(
            [sys.executable, "-m", "surgery", "convert", folder / "model.safetensors", "-o", out, *args],
            check=True,
            capture_output=True,
            env=env,
        )
    return [folder / "model.safetensors", folder / "model.pt", folder / "dcp", folder / "shards"]


@pytest.mark.slow
def test_two_ranks_each_load_their_own_block_from_every_format(sources, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK.format(width=WIDTH, layers=LAYERS)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, *sources], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank.py.*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    total = sum(p.numel() for p in torch.load(sources[1], weights_only=True).values())
    for rank in ranks:
        for source in map(str, sources):
            assert rank[source]["equal"], (rank["rank"], source)
            assert rank[source]["summary"].startswith("loaded 18/18 tensors (100.0% of parameters)")
            assert rank[source]["local"] < 0.6 * total  # a block, not the model
        model_kib = 4 * total // 1024
        largest_kib = 4 * WIDTH * WIDTH // 1024
        assert rank["grew_kib"] < model_kib / 2 + 2 * largest_kib, rank  # its half, plus a tensor's rows


READY = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import surgery

def shard(model):
    for block in (model.layer1, model.layer2, model.layer3, model.layer4):
        fully_shard(block)
    fully_shard(model)

dist.init_process_group("gloo")
whole = surgery.load_ready(sys.argv[1])
sharded = surgery.load_ready(sys.argv[1], shard=shard)
expected = whole.model.state_dict()
got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.model.state_dict().items()}
frozen = sorted(n for n, p in sharded.model.named_parameters() if not p.requires_grad)
groups = [(g.get("name"), g.get("lr"), len(g["params"])) for g in sharded.param_groups]
with open(__file__ + f".{dist.get_rank()}.json", "w") as f:  # a file each: prints interleave
    json.dump({
    "rank": dist.get_rank(),
    "equal": sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected),
    "frozen": frozen == sorted(n for n, p in whole.model.named_parameters() if not p.requires_grad),
    "groups": groups == [(g.get("name"), g.get("lr"), len(g["params"])) for g in whole.param_groups],
    "some_frozen": bool(frozen),
    }, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_load_ready_shards_a_fine_tune_ready_file_across_ranks(seeded_resnet18, tmp_path):
    ready = tmp_path / "ready.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = [sys.executable, "-m", "surgery", "port", seeded_resnet18.plain, "--to", "torchvision:resnet18"]
    port += [
        "--num-classes",
        "10",
        "--freeze",
        "layer1.*",
        "--lr",
        "fc.*=0.01",
        "-o",
        ready,
        "--strict",
        "false",
    ]
    made = subprocess.run(port, capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    script = tmp_path / "ready.py"
    script.write_text(textwrap.dedent(READY))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        script,
        ready,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("ready.py.*.json"))]
    assert len(ranks) == 2
    assert all(r["equal"] and r["frozen"] and r["groups"] and r["some_frozen"] for r in ranks), ranks
