"""`surgery convert`: every output format read back by its own library, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from conftest import FIXTURES, run_cli, run_subprocess
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgery


@pytest.fixture(scope="module")
def resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture
def imagenet_example(tmp_path, resnet18):
    """The PyTorch ImageNet example's checkpoint: `module.` keys inside `state_dict`."""
    path = tmp_path / "checkpoint.pth.tar"
    state = {"module." + k: v for k, v in resnet18.items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state, "best_acc1": torch.tensor(1.5)}, path)
    return path


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name


def read_sharded(folder) -> dict[str, torch.Tensor]:
    """A sharded folder read as transformers reads it: the index, then each shard."""
    (index,) = folder.glob("*.index.json")
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        if shard.endswith(".safetensors"):
            part = load_file(folder / shard)
        else:
            part = torch.load(folder / shard, weights_only=True)
        assert all(weight_map[name] == shard for name in part)
        out.update(part)
    return out


def read_dcp(folder, tmp_path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, tmp_path / "from_dcp.pt")
    return torch.load(tmp_path / "from_dcp.pt", weights_only=True)


@pytest.mark.parametrize("output", ["out.safetensors", "out.pt", "shards", "shards.bin", "dcp"])
def test_every_output_is_read_back_bit_identical_by_its_own_reader(
    tmp_path, imagenet_example, resnet18, output
):
    out = tmp_path / output
    extra = {"shards": ["--shard-size", "8MB"], "shards.bin": ["--shard-size", "8MB", "--format", "torch"]}
    extra["dcp"] = ["--format", "dcp"]
    run = run_cli(
        "convert",
        imagenet_example,
        "-o",
        out,
        "--strip-prefix",
        "module.",
        "--verify",
        *extra.get(output, []),
    )
    assert run.exit_code == 0, run.stderr
    assert "re-read, 122 tensors equal to their source" in run.stdout
    if output == "out.safetensors":
        got = load_file(out)
    elif output == "out.pt":
        got = torch.load(out, weights_only=True)
        assert_same(torch.load(out, weights_only=True, mmap=True), resnet18)
    elif output == "dcp":
        got = read_dcp(out, tmp_path)
    else:
        got = read_sharded(out)
        assert len(list(out.glob("*.index.json"))) == 1
        for shard in (p for p in out.iterdir() if not p.name.endswith(".json")):
            part = (
                load_file(shard) if shard.suffix == ".safetensors" else torch.load(shard, weights_only=True)
            )
            assert len(part) == 1 or sum(v.numel() * v.element_size() for v in part.values()) <= 8_000_000
    assert_same(got, resnet18)
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(got, strict=True)


def test_sharded_index_is_the_layout_others_read(tmp_path, resnet18):
    save_file(resnet18, tmp_path / "model.safetensors")
    report = surgery.convert(tmp_path / "model.safetensors", tmp_path / "shards", shard_size="10MB")
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in resnet18.values())
    assert sorted(set(index["weight_map"].values())) == list(report.shards)
    assert report.shards[0] == f"model-00001-of-{len(report.shards):05d}.safetensors"
    for shard in report.shards:
        with safe_open(tmp_path / "shards" / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"  # transformers refuses shards without it
            assert sum(v.numel() * v.element_size() for v in map(f.get_tensor, f.keys())) <= 10_000_000 or (
                len(list(f.keys())) == 1
            )


@pytest.mark.parametrize("kind", ["legacy", "safetensors", "sharded", "index", "dcp", "bin"])
def test_every_source_kind_converts(tmp_path, resnet18, kind):
    if kind == "legacy":
        source = tmp_path / "legacy.pth"
        torch.save(resnet18, source, _use_new_zipfile_serialization=False)
    elif kind == "safetensors":
        source = tmp_path / "m.safetensors"
        save_file(resnet18, source)
    elif kind in ("sharded", "index"):
        save_file(resnet18, tmp_path / "m.safetensors")
        surgery.convert(tmp_path / "m.safetensors", tmp_path / "sharded", shard_size="5MB")
        source = tmp_path / "sharded"
        if kind == "index":
            source = source / "model.safetensors.index.json"
    elif kind == "bin":
        torch.save(resnet18, tmp_path / "m.pt")
        surgery.convert(tmp_path / "m.pt", tmp_path / "bins", shard_size="5MB", format="torch")
        source = tmp_path / "bins"
    else:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": resnet18, "epoch": 3}, checkpoint_id=tmp_path / "dcp", no_dist=True)
        source = tmp_path / "dcp"
    report = surgery.convert(source, tmp_path / "out.safetensors", verify=True)
    assert report.verified == 122
    assert_same(load_file(tmp_path / "out.safetensors"), resnet18)


def test_bytes_are_copied_without_torch_when_nothing_changes(tmp_path, resnet18):
    """Raw copies need no torch: checked in a fresh interpreter."""
    torch.save({"state_dict": resnet18}, tmp_path / "src.pth")
    code = (
        "import sys, surgery\n"
        f"r = surgery.convert({str(tmp_path / 'src.pth')!r}, {str(tmp_path / 'out.safetensors')!r}, verify=True)\n"
        "print(r.raw, r.verified, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["122", "122", "False"]
    assert_same(load_file(tmp_path / "out.safetensors"), resnet18)


def test_strided_and_shared_views_are_rebuilt_not_copied_raw(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"t": base.t(), "row": base[1], "base": base}
    torch.save(state, tmp_path / "views.pt")
    report = surgery.convert(tmp_path / "views.pt", tmp_path / "out.safetensors", verify=True)
    assert report.raw == 2  # `row` is contiguous inside the storage; `t` is not
    assert_same(load_file(tmp_path / "out.safetensors"), {k: v.contiguous() for k, v in state.items()})


def test_dtype_casts_floating_tensors_only(tmp_path, imagenet_example, resnet18):
    report = surgery.convert(
        imagenet_example, tmp_path / "bf16.safetensors", strip_prefix=["module."], dtype="bf16"
    )
    got = load_file(tmp_path / "bf16.safetensors")
    for name, value in resnet18.items():
        want = value.bfloat16() if value.is_floating_point() else value
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert report.cast == {"float32 -> bfloat16": 102}
    assert report.raw == 20  # the int64 num_batches_tracked buffers


def test_a_big_tensor_is_cast_in_pieces_bit_identical_to_torch(tmp_path):
    torch.manual_seed(1)
    big = torch.randn(5_000_003)  # not a multiple of the piece size
    big[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    save_file({"big": big, "i": torch.arange(3)}, tmp_path / "big.safetensors")
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / f"{dtype}.pt"
        surgery.convert(tmp_path / "big.safetensors", out, dtype=dtype, verify=True)
        got = torch.load(out, weights_only=True)
        assert torch.equal(got["big"].view(torch.int16), big.to(torch_dtype).view(torch.int16))
        assert got["i"].dtype == torch.int64


def test_key_rules_and_container(tmp_path):
    ema = FIXTURES / "ema.pth"
    ckpt = surgery.open_checkpoint(ema)
    keys = [c for c, _ in ckpt.containers]
    other = next(c for c in keys if c != ckpt.container)
    report = surgery.convert(
        ema,
        tmp_path / "ema.safetensors",
        key=".".join(other),
        rename=[r"^(.*)\.weight$=\1.w"],
        add_prefix="net.",
        exclude=["*num_batches_tracked"],
    )
    got = load_file(tmp_path / "ema.safetensors")
    source = surgery.open_checkpoint(ema, key=".".join(other))
    kept = [t.name for t in source.tensors if not t.name.endswith("num_batches_tracked")]
    assert sorted(got) == sorted(
        "net." + (n[: -len(".weight")] + ".w" if n.endswith(".weight") else n) for n in kept
    )
    assert report.container == other
    assert len(report.left_out) == len(source.tensors) - len(kept)
    for name in kept:
        new = "net." + (name[: -len(".weight")] + ".w" if name.endswith(".weight") else name)
        assert torch.equal(got[new], source.tensor(name))


def test_tied_weights_are_stored_once_and_come_back(tmp_path):
    report = surgery.convert(FIXTURES / "tied.pth", tmp_path / "tied.safetensors", verify=True)
    assert report.aliases == {"lm_head.weight": "embed.weight"}
    with safe_open(tmp_path / "tied.safetensors", "pt") as f:
        assert "lm_head.weight" not in list(f.keys())
        assert json.loads(f.metadata()["surgery.aliases"]) == {"lm_head.weight": "embed.weight"}
    back = surgery.open_checkpoint(tmp_path / "tied.safetensors")
    assert back.restored == {"lm_head.weight": "embed.weight"}
    sd = back.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    assert any("restored" in f.message for f in back.findings)
    surgery.convert(FIXTURES / "tied.pth", tmp_path / "tied.pt")
    again = torch.load(tmp_path / "tied.pt", weights_only=True)
    assert again["lm_head.weight"].data_ptr() == again["embed.weight"].data_ptr()


def test_dry_run_json_and_pipes(tmp_path, imagenet_example):
    out = tmp_path / "x.safetensors"
    run = run_cli("convert", imagenet_example, "-o", out, "--dry-run", "--json")
    assert run.exit_code == 0 and not out.exists()
    doc = json.loads(run.stdout)
    assert doc["written"] is False and doc["tensors"] == 122 and doc["container"] == ["state_dict"]
    run = run_subprocess("convert", imagenet_example, "-o", out, "--json")
    assert run.exit_code == 0 and run.stderr == ""  # no progress bar off a terminal
    assert json.loads(run.stdout)["raw_copied"] == 122
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_provenance_is_in_the_output(tmp_path, imagenet_example):
    surgery.convert(imagenet_example, tmp_path / "x.safetensors", strip_prefix=["module."])
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["surgery.source"] == str(imagenet_example)
    assert meta["surgery.container"] == "state_dict"
    assert json.loads(meta["surgery.rules"])["strip_prefix"] == ["module."]


state_dicts = st.dictionaries(
    st.text("abcxyz.", min_size=1, max_size=8).filter(lambda s: not s.startswith(".")),
    st.tuples(
        st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
        st.lists(st.integers(0, 4), max_size=3),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=25, deadline=None)
@given(state_dicts, st.sampled_from(["x.safetensors", "x.pt"]))
def test_any_state_dict_round_trips(tmp_path_factory, spec, name):
    tmp = tmp_path_factory.mktemp("prop")
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(shape, generator=gen) * 100).to(dtype) for k, (dtype, shape) in spec.items()}
    torch.save(state, tmp / "src.pt")
    report = surgery.convert(tmp / "src.pt", tmp / name, verify=True)
    assert report.verified == len(state)
    assert surgery.diff(tmp / "src.pt", tmp / name).same


def test_memory_follows_the_tensor_not_the_file(tmp_path):
    """300 MB into shards in a fresh process: far below the file's size, torch never imported."""
    torch.manual_seed(0)
    save_file({f"w{i}": torch.randn(1 << 20) for i in range(75)}, tmp_path / "big.safetensors")
    code = (
        "import re, sys, surgery\n"
        f"surgery.convert({str(tmp_path / 'big.safetensors')!r}, {str(tmp_path / 'shards')!r},"
        " shard_size='100MB', verify=True)\n"
        # VmHWM: this process's own peak (ru_maxrss would include the parent's, from before exec)
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print(int(hwm) // 1024, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak_mib, imported = out.split()
    assert int(peak_mib) < 100 and imported == "False", out
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 4  # 23 tensors of 4 MiB a shard
