"""`torchrun --nproc-per-node 2 -m surgery convert`: each rank writes its share of the output.

Real process groups: torchrun (torch.distributed.run) starts two ranks that talk over gloo on the
CPU, as a user runs it; the outputs are compared byte for byte with the single-process run, and
read back with torch.distributed.checkpoint on one rank and on two.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.commands.ranks import balance

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: object, cwd: Path, ranks: int = 2, module: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N [-m surgery] ARGS`, this checkout's surgery."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += ["-m", "surgery"] if module else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def surgery_errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    "sizes, world, owner",
    [([5, 1, 4, 3], 2, [0, 0, 1, 1]), ([1, 1, 1], 4, [0, 1, 2]), ([], 2, []), ([7], 3, [0])],
)
def test_balance_gives_the_largest_parts_first_to_the_least_loaded_rank(sizes, world, owner):
    assert balance(sizes, world) == owner


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A checkpoint of 24 tensors of uneven sizes (so the shards are uneven too)."""
    folder = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(0)
    tensors = {f"block{i}.weight": torch.randn(64 * (1 + i % 5), 256) for i in range(20)}
    tensors |= {f"block{i}.bias": torch.randn(64) for i in range(3)}
    tensors["steps"] = torch.tensor(7)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.mark.slow
def test_two_ranks_write_the_same_shards_as_one_process(source, tmp_path):
    """Safetensors shards (torch shards take the same path; their archives hold a random id)."""
    extra: list[str] = []
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    one = subprocess.run(
        [sys.executable, "-m", "surgery", "convert", source, "-o", single, "--shard-size", "200KB", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert one.returncode == 0, one.stderr
    two = torchrun("convert", source, "-o", ranked, "--shard-size", "200KB", "--verify", *extra, cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("summary") == 1 and "by 2 ranks" in two.stdout  # one report, rank 0's
    files = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in ranked.iterdir()) == files and len(files) > 4
    for name in files:
        assert (single / name).read_bytes() == (ranked / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked", "single"]  # no temporary left


LOAD = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
if len(sys.argv) > 3:
    dist.init_process_group("gloo")
source = load_file(sys.argv[1])
state = {k: torch.zeros_like(v) for k, v in source.items()}
dcp.load(state, checkpoint_id=sys.argv[2])
assert all(torch.equal(state[k], source[k]) for k in source), "differs"
rank = dist.get_rank() if dist.is_initialized() else "alone"
open(f"{sys.argv[2]}.equal.{rank}", "w").close()  # a file each: the ranks' prints interleave
if dist.is_initialized():
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_dcp_folder_written_by_two_ranks_loads_on_one_rank_and_on_two(source, tmp_path):
    out = tmp_path / "dcp"
    proc = torchrun("convert", source, "-o", out, "--format", "dcp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "surgery.json",
    ]
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOAD))
    alone = subprocess.run([sys.executable, script, source, out], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    both = torchrun(script, source, out, "group", cwd=tmp_path, module=False)
    assert both.returncode == 0, both.stderr
    said = sorted(p.name for p in tmp_path.iterdir() if ".equal." in p.name)
    assert said == ["dcp.equal.0", "dcp.equal.1", "dcp.equal.alone"]


@pytest.fixture(scope="module")
def broken_on_rank_1(tmp_path_factory) -> Path:
    """A torch file whose 6th storage is deflated, then damaged: readable headers, a tensor that
    fails only when read. With one tensor per shard, the balance gives it to rank 1."""
    folder = tmp_path_factory.mktemp("broken")
    torch.manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(256, 256) for i in range(8)}, folder / "good.pt")
    bad = folder / "bad.pt"
    with zipfile.ZipFile(folder / "good.pt") as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("/data/5"):
                deflated = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(deflated, zin.read(info))
            else:
                zout.writestr(info, zin.read(info))
    raw = bytearray(bad.read_bytes())
    with zipfile.ZipFile(bad) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/5"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 100 : start + 200] = bytes(b ^ 0x55 for b in raw[start + 100 : start + 200])
    bad.write_bytes(bytes(raw))
    assert balance([256 * 256 * 4] * 8, 2)[5] == 1
    return bad


@pytest.mark.slow
def test_a_failure_on_one_rank_fails_every_rank_and_leaves_nothing(broken_on_rank_1, tmp_path):
    out = tmp_path / "out"
    proc = torchrun("convert", broken_on_rank_1, "-o", out, "--format", "dcp", cwd=tmp_path)
    assert proc.returncode != 0
    errors = surgery_errors(proc)
    assert len(errors) == 2, proc.stderr  # one line from each rank, the same
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"error: {broken_on_rank_1}: member ") and errors[0].endswith("(rank 1)")
    assert not re.search(r'File "[^"]*/surgery/', proc.stderr)  # torchrun's report only, no traceback of ours
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


@pytest.mark.slow
def test_a_single_file_output_is_written_by_rank_zero(source, tmp_path):
    out = tmp_path / "one.safetensors"
    proc = torchrun("convert", source, "-o", out, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('"surgery_json"') == 1
    from safetensors.torch import load_file

    written, expected = load_file(str(out)), load_file(str(source))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_port_under_torchrun_is_one_port_by_rank_zero(source, tmp_path):
    out = tmp_path / "ported.safetensors"
    proc = torchrun("port", source, "--to", source, "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("summary") == 1 and "loaded 24/24 tensors" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ported.safetensors"]


@pytest.mark.slow
def test_port_into_a_hugging_face_folder_shares_its_shards(source, tmp_path):
    """`port --format hf` under torchrun: the shards shared out, the same files as one process."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Net"], "model_type": "net"}')
    (folder / "model.safetensors").write_bytes(source.read_bytes())
    args = ["port", folder, "--to", folder, "--format", "hf", "--shard-size", "200KB"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [sys.executable, "-m", "surgery", *map(str, args), "-o", tmp_path / "single"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "-o", tmp_path / "ranked", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("summary") == 1
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "ranked").iterdir()) == files and len(files) > 4
    for name in files:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "ranked" / name).read_bytes(), name
