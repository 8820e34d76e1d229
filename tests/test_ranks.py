"""`torchrun --nproc-per-node 2 -m surgery convert`: each rank writes its share of the output.

Real process groups: torchrun (torch.distributed.run) starts two ranks that talk over gloo on the
CPU, as a user runs it; the outputs are compared byte for byte with the single-process run, and
read back with torch.distributed.checkpoint on one rank and on two.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

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
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    one = run_cli("convert", source, "-o", single, "--shard-size", "200KB")
    assert one.exit_code == 0, one.stderr
    two = torchrun("convert", source, "-o", ranked, "--shard-size", "200KB", "--verify", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("summary") == 1 and "by 2 ranks" in two.stdout  # one report, rank 0's
    files = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in ranked.iterdir()) == files and len(files) > 4
    for name in files:
        assert (single / name).read_bytes() == (ranked / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked", "single"]  # no temporary left


# The other commands share one launch (a launch costs the launcher and each rank an import of
# torch): each rank runs them in turn, in one process, as a script calling surgery's CLI does,
# and records each one's exit code, stdout and stderr by its name.
COMMANDS = """
import json, os, sys, traceback
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from surgery.cli import run

def surgery(args, log):
    # `surgery ARGS` on this rank, its stdout and stderr into files of its own
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        sys.argv = ["surgery", *args]
        try:
            run()
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    with open(log + ".out") as out, open(log + ".err") as err:
        return {"code": code, "stdout": out.read(), "stderr": err.read()}

def loads(source, folder):
    # the DCP folder read by torch's dcp.load in this group of two equals the source
    expected = load_file(source)
    state = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp.load(state, checkpoint_id=folder)
    return dist.get_world_size() == 2 and all(torch.equal(state[k], expected[k]) for k in expected)

at = sys.argv[1]  # the plan; each command sets sys.argv
plan = json.loads(open(at).read())
rank = int(os.environ["RANK"])
found = {}
try:
    for name, args in plan["commands"].items():
        found[name] = surgery(args, f"{at}.{name}.{rank}")
    found["loads"] = loads(*plan["loads"])
finally:  # a file each: the ranks' prints interleave
    with open(f"{at}.{rank}.json", "w") as f:
        json.dump(found, f)
"""
PLAN = {  # name -> surgery's arguments: {source}, {hf} and {out} (the command's own folder) filled in
    "dcp": ["convert", "{source}", "-o", "{out}/dcp", "--format", "dcp"],
    "single_file": ["convert", "{source}", "-o", "{out}/one.safetensors", "--json"],
    "port": ["port", "{source}", "--to", "{source}", "-o", "{out}/ported.safetensors"],
    "port_hf": [
        "port",
        "{hf}",
        "--to",
        "{hf}",
        "--format",
        "hf",
        "--shard-size",
        "200KB",
        "-o",
        "{out}/ranked",
    ],
}


@dataclass(frozen=True)
class Launch:
    """What each rank of the one launch found, by command."""

    folder: Path  # each command's own folder is folder / its name
    ranks: list[dict]
    returncode: int
    stderr: str

    def ran(self, name: str) -> list:
        """Each rank's record of `name`: one that raised or never ran fails here, by its name."""
        assert len(self.ranks) == 2, self.stderr
        assert all(name in r for r in self.ranks), f"{name} did not finish:\n{self.stderr}"
        every = all(n in r for r in self.ranks for n in (*PLAN, "loads"))
        assert self.returncode == 0 or not every, f"the launch failed after every command:\n{self.stderr}"
        return [r[name] for r in self.ranks]

    def surgery(self, name: str) -> dict:
        """The ranks' run of `name` as torchrun shows it: each exit code; stdout and stderr joined."""
        ranks = self.ran(name)
        return {
            "codes": [r["code"] for r in ranks],
            "stdout": "".join(r["stdout"] for r in ranks),
            "stderr": "".join(r["stderr"] for r in ranks),
        }


@pytest.fixture(scope="module")
def hf_folder(source, tmp_path_factory) -> Path:
    """A Hugging Face folder of the source: its config.json and model.safetensors."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Net"], "model_type": "net"}')
    (folder / "model.safetensors").write_bytes(source.read_bytes())
    return folder


@pytest.fixture(scope="module")
def launch(source, hf_folder, tmp_path_factory) -> Launch:
    folder = tmp_path_factory.mktemp("launch")
    commands = {}
    for name, args in PLAN.items():
        (folder / name).mkdir()
        commands[name] = [arg.format(source=source, hf=hf_folder, out=folder / name) for arg in args]
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"commands": commands, "loads": [str(source), str(folder / "dcp" / "dcp")]}))
    script = folder / "commands.py"
    script.write_text(textwrap.dedent(COMMANDS))
    proc = torchrun(script, plan, cwd=folder, module=False)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("plan.json.[01].json"))]
    return Launch(folder, ranks, proc.returncode, proc.stderr)


@pytest.mark.slow
def test_a_dcp_folder_written_by_two_ranks_loads_on_one_rank_and_on_two(launch, source):
    run = launch.surgery("dcp")
    assert run["codes"] == [0, 0], run["stderr"]
    out = launch.folder / "dcp" / "dcp"
    assert sorted(p.name for p in out.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "surgery.json",
    ]
    import torch.distributed.checkpoint as dcp

    expected = load_file(source)
    alone = {k: torch.zeros_like(v) for k, v in expected.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(alone, checkpoint_id=out)  # no process group: this one process reads every part
    assert all(torch.equal(alone[k], expected[k]) for k in expected)
    assert launch.ran("loads") == [True, True]  # and each of the two ranks, in their group


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
def test_a_single_file_output_is_written_by_rank_zero(launch, source):
    run = launch.surgery("single_file")
    assert run["codes"] == [0, 0], run["stderr"]
    assert run["stdout"].count('"surgery_json"') == 1
    written, expected = load_file(launch.folder / "single_file" / "one.safetensors"), load_file(source)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_port_under_torchrun_is_one_port_by_rank_zero(launch):
    run = launch.surgery("port")
    assert run["codes"] == [0, 0], run["stderr"]
    assert run["stdout"].count("summary") == 1 and "loaded 24/24 tensors" in run["stdout"]
    assert sorted(p.name for p in (launch.folder / "port").iterdir()) == ["ported.safetensors"]


@pytest.mark.slow
def test_port_into_a_hugging_face_folder_shares_its_shards(launch, hf_folder, tmp_path):
    """`port --format hf` under torchrun: the shards shared out, the same files as one process."""
    run = launch.surgery("port_hf")
    assert run["codes"] == [0, 0], run["stderr"]
    assert run["stdout"].count("summary") == 1
    single, ranked = tmp_path / "single", launch.folder / "port_hf" / "ranked"
    one = run_cli(
        "port", hf_folder, "--to", hf_folder, "--format", "hf", "--shard-size", "200KB", "-o", single
    )
    assert one.exit_code == 0, one.stderr
    files = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in ranked.iterdir()) == files and len(files) > 4
    for name in files:
        assert (single / name).read_bytes() == (ranked / name).read_bytes(), name
