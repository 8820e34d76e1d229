"""`surgery convert` and `surgery.convert()`, end to end, on real files.

Every source is written by torch.save (zip and legacy) or safetensors' own save_file,
every output is read back with torch's or safetensors' own readers (and torch's
`dcp_to_torch_save` for DCP folders), and compared tensor by tensor with the original:
values, dtype and shape, bit for bit. Then bad input: every refusal is one
`error: <where>: ...` line, the right exit code, no traceback, nothing written and
the input untouched.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_clean_error, run_cli, run_subprocess, write_big_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgery

HAS_DCP_READER = importlib.util.find_spec("surgery.formats.dcp") is not None
needs_dcp_reader = pytest.mark.skipif(
    not HAS_DCP_READER, reason="surgery.formats.dcp (the DCP reader) not there yet"
)


# -- helpers ------------------------------------------------------------------
def convert(*args: object):
    return run_cli("convert", *args)


def convert_json(*args: object) -> dict:
    run = run_cli("convert", *args, "--json")
    assert run.exit_code == 0, run
    return json.loads(run.stdout)  # exactly one JSON document, nothing else on stdout


def assert_same_tensors(got: dict, expected: dict) -> None:
    """Same names, dtypes, shapes and values (bit for bit, NaN included)."""
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        a, b = got[name].contiguous(), tensor.contiguous()
        if a.dtype.is_floating_point or a.dtype.is_complex:
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name
        else:
            assert torch.equal(a, b), name


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def load_sharded(folder: Path) -> tuple[dict, dict]:
    """A sharded folder the way transformers reads it: the index, then each shard with its own loader."""
    indexes = list(folder.glob("*.index.json"))
    assert len(indexes) == 1, os.listdir(folder)
    index = json.loads(indexes[0].read_text())
    out: dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        path = folder / shard
        part = load_file(path) if shard.endswith(".safetensors") else torch.load(path, weights_only=True)
        for name in part:
            assert index["weight_map"][name] == shard, name
            assert name not in out, name
        out.update(part)
    return index, out


def load_dcp(folder: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{folder.name}.from_dcp.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=True)


def load_output(out: Path, kind: str, tmp: Path) -> dict:
    if kind == "safetensors":
        return load_file(out)
    if kind == "torch":
        return torch.load(out, weights_only=True)
    if kind.startswith("sharded"):
        return load_sharded(out)[1]
    assert kind == "dcp"
    return load_dcp(out, tmp)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file (hidden ones too) under the folders, with its sha256; folders as 'dir'."""
    out = {}
    for folder in folders:
        if not folder.exists():
            continue
        for root, dirs, files in os.walk(folder):
            for d in dirs:
                out[os.path.join(root, d)] = "dir"
            for f in files:
                out[os.path.join(root, f)] = sha(Path(root) / f)
    return out


def no_temp_left(folder: Path) -> None:
    assert [n for n in os.listdir(folder) if n.endswith((".tmp", ".old")) or n.startswith(".")] == []


def write_sharded_safetensors(folder: Path, sd: dict, per_shard: int) -> Path:
    """A transformers-style sharded folder, written by safetensors itself."""
    folder.mkdir()
    names = list(sd)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in group}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": sum(nbytes(t) for t in sd.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_sharded_bin(folder: Path, sd: dict, per_shard: int) -> Path:
    folder.mkdir()
    names = list(sd)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save({n: sd[n] for n in group}, folder / shard)
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": sum(nbytes(t) for t in sd.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def expected_shards(sd: dict, shard_size: int) -> int:
    """How many shards a greedy, in-order split into at most `shard_size` bytes makes."""
    count, size = 1, 0
    for t in sd.values():
        if size and size + nbytes(t) > shard_size:
            count, size = count + 1, 0
        size += nbytes(t)
    return count


# -- the sources: a seeded resnet18 in every layout ----------------------------
@pytest.fixture(scope="module")
def resnet(tmp_path_factory, seeded_resnet18):
    """(folder of the sharded layouts, {kind: path}, the plain state_dict)."""
    sd = seeded_resnet18.state
    folder = tmp_path_factory.mktemp("resnet")
    paths = {
        "zip": seeded_resnet18.imagenet,
        "legacy": seeded_resnet18.legacy,
        "safetensors": seeded_resnet18.safetensors,
    }
    paths["sharded_safetensors"] = write_sharded_safetensors(folder / "sharded_st", sd, per_shard=40)
    paths["sharded_bin"] = write_sharded_bin(folder / "sharded_bin", sd, per_shard=40)
    paths["index"] = paths["sharded_safetensors"] / "model.safetensors.index.json"
    return folder, paths, sd


def strip_args(kind: str) -> tuple[str, ...]:
    return ("--strip-prefix", "module.") if kind == "zip" else ()


# -- round trips -------------------------------------------------------------
@pytest.mark.parametrize(
    "source", ["zip", "legacy", "safetensors", "sharded_safetensors", "sharded_bin", "index"]
)
def test_every_source_to_safetensors_is_bit_identical(resnet, source, tmp_path):
    _, paths, sd = resnet
    before = snapshot(paths[source] if paths[source].is_dir() else paths[source].parent)
    out = tmp_path / "model.safetensors"
    report = convert_json(paths[source], "-o", out, *strip_args(source))
    assert report["written"] is True and report["output_format"] == "safetensors"
    assert report["tensors"] == len(sd)
    assert report["bytes"] == sum(nbytes(t) for t in sd.values())
    got = load_file(out)
    if source in ("zip", "legacy"):
        assert list(got) == list(sd)  # torch's order kept (safetensors' save_file sorts its own)
    assert_same_tensors(got, sd)
    import torchvision

    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(got, strict=True)
    assert snapshot(paths[source] if paths[source].is_dir() else paths[source].parent) == before
    no_temp_left(tmp_path)


@pytest.mark.parametrize(
    "kind,name,extra",
    [
        ("safetensors", "out.safetensors", ()),
        ("torch", "out.pt", ()),
        ("torch", "out.bin", ()),
        ("sharded-safetensors", "shards", ("--shard-size", "10MB")),
        ("sharded-torch", "shards_bin", ("--shard-size", "10MB", "--format", "torch")),
        ("sharded-torch", "out.bin", ("--shard-size", "10MB")),
    ],
)
def test_zip_source_to_every_output(resnet, tmp_path, kind, name, extra):
    _, paths, sd = resnet
    out = tmp_path / name
    report = convert_json(paths["zip"], "-o", out, "--strip-prefix", "module.", *extra)
    assert report["output_format"] == kind
    assert report["raw_copied"] == len(sd)  # no cast: every tensor copied as it lies
    assert_same_tensors(load_output(out, kind, tmp_path), sd)
    no_temp_left(tmp_path)


@pytest.mark.parametrize("shard_size", [5_000_000, 20_000_000, 10**12])
def test_sharded_safetensors_layout(resnet, tmp_path, shard_size):
    _, paths, sd = resnet
    out = tmp_path / "sharded"
    report = surgery.convert(paths["safetensors"], out, shard_size=shard_size)
    index, got = load_sharded(out)
    with open(paths["safetensors"], "rb") as f:  # the source's order: its data offsets
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    ordered = {k: sd[k] for k in sorted(header, key=lambda k: header[k]["data_offsets"][0])}
    n = expected_shards(ordered, shard_size)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted([*names, "model.safetensors.index.json"])
    assert list(report.shards) == names
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    for shard in names:  # at most shard_size bytes of data, unless one tensor is bigger on its own
        with safe_open(out / shard, "pt") as f:
            held = list(f.keys())
            size = sum(nbytes(f.get_tensor(k)) for k in held)
        assert size <= shard_size or len(held) == 1
    assert_same_tensors(got, sd)


def test_sharded_torch_layout(resnet, tmp_path):
    _, paths, sd = resnet
    out = tmp_path / "sharded_bin"
    surgery.convert(paths["zip"], out, strip_prefix=["module."], shard_size="10MB", format="torch")
    index, got = load_sharded(out)
    n = expected_shards(sd, 10_000_000)
    names = [f"pytorch_model-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted([*names, "pytorch_model.bin.index.json"])
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in sd.values())
    assert_same_tensors(got, sd)


def test_sharded_torch_report_names_the_shards(resnet, tmp_path):
    _, paths, sd = resnet
    out = tmp_path / "sharded_bin"
    report = surgery.convert(paths["zip"], out, strip_prefix=["module."], shard_size="10MB", format="torch")
    assert list(report.shards) == sorted(p.name for p in out.glob("pytorch_model-*.bin"))


def test_sizes_in_units(resnet, tmp_path):
    _, paths, sd = resnet
    for text, size in (("10MB", 10**7), ("10MiB", 10 << 20), ("0.01GB", 10**7), ("1e7", 10**7)):
        report = surgery.convert(paths["safetensors"], tmp_path / text, shard_size=text, dry_run=True)
        assert report.options.shard_size == size, text
        assert report.written is False


@needs_dcp_reader
def test_dcp_round_trip(resnet, tmp_path):
    _, paths, sd = resnet
    out = tmp_path / "dcp"
    report = surgery.convert(paths["zip"], out, strip_prefix=["module."], format="dcp", verify=True)
    assert report.output_format == "dcp" and report.verified == len(sd)
    assert (out / ".metadata").is_file() and (out / "surgery.json").is_file()
    assert_same_tensors(load_dcp(out, tmp_path), sd)  # torch's own reader
    back = tmp_path / "back.safetensors"
    surgery.convert(out, back)  # and back, through surgery's DCP reader
    assert_same_tensors(load_file(back), sd)
    no_temp_left(tmp_path)


@needs_dcp_reader
def test_dcp_written_by_torch_converts(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(3)
    sd = {"a.weight": torch.randn(7, 5), "a.bias": torch.randn(7), "steps": torch.tensor(4)}
    folder = tmp_path / "by_torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=folder)
    out = tmp_path / "x.safetensors"
    run = convert(folder, "-o", out)
    assert run.exit_code == 0, run
    assert_same_tensors(load_file(out), sd)


def test_fixture_sources(tmp_path):
    """Every fixture the README shows converts to safetensors and back to what torch loads."""
    for source, args in (
        (FIXTURES / "imagenet_example.pth.tar", ("--strip-prefix", "module.")),
        (FIXTURES / "legacy.pth", ()),
        (FIXTURES / "sharded_bin", ()),
        (FIXTURES / "sharded_safetensors", ()),
        (FIXTURES / "lightning.ckpt", ()),
        (FIXTURES / "tiny.safetensors", ()),
    ):
        out = tmp_path / f"{source.name}.safetensors"
        run = convert(source, "-o", out, *args)
        assert run.exit_code == 0, (source, run)
        ckpt = surgery.open_checkpoint(source)
        expected = {k.removeprefix("module."): v for k, v in ckpt.state_dict().items()}
        assert_same_tensors(load_file(out), expected)


# -- raw copies and casts ---------------------------------------------------
def test_views_offsets_and_transposes_are_written_as_values(tmp_path):
    torch.manual_seed(1)
    base = torch.randn(6, 4)
    sd = {
        "t": base.t(),  # non-contiguous
        "col": base[:, 1],  # strided
        "tail": base[2:],  # contiguous, at an offset in a shared storage
        "whole": base,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    src = tmp_path / "views.pt"
    torch.save(sd, src)
    for out in (tmp_path / "v.safetensors", tmp_path / "v.pt"):
        report = surgery.convert(src, out, verify=True)
        assert report.verified == len(sd)
        got = load_file(out) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
        assert_same_tensors(got, {k: v.contiguous() for k, v in sd.items()})
        assert report.raw < len(sd)  # the strided views were rebuilt, not copied


def test_dtype_bf16_casts_floating_only(resnet, tmp_path):
    _, paths, sd = resnet
    out = tmp_path / "bf16.safetensors"
    report = convert_json(paths["zip"], "-o", out, "--strip-prefix", "module.", "--dtype", "bf16")
    floating = [k for k, v in sd.items() if v.is_floating_point()]
    integers = [k for k in sd if k not in floating]
    assert integers and all(k.endswith("num_batches_tracked") for k in integers)
    assert report["cast"] == {"float32 -> bfloat16": len(floating)}
    assert report["raw_copied"] == len(integers)  # only the untouched int64 buffers are raw copies
    got = load_file(out)
    for k in floating:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], sd[k].to(torch.bfloat16)), k
    for k in integers:
        assert got[k].dtype == torch.int64 and torch.equal(got[k], sd[k])


def test_dtype_fp16_on_mixed_dtypes_leaves_bool_int_and_fp8(tmp_path):
    sd = {
        "w": torch.randn(4, 4, dtype=torch.float64),
        "h": torch.randn(3, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int32),
        "q": torch.randn(4).to(torch.float8_e4m3fn),
    }
    src = tmp_path / "mixed.pt"
    torch.save(sd, src)
    out = tmp_path / "mixed16.safetensors"
    report = surgery.convert(src, out, dtype="fp16", verify=True)
    assert report.cast == {"float64 -> float16": 1}
    got = load_file(out)
    assert got["w"].dtype == torch.float16 and torch.equal(got["w"], sd["w"].half())
    assert_same_tensors(
        {k: got[k] for k in ("h", "mask", "ids", "q")}, {k: sd[k] for k in ("h", "mask", "ids", "q")}
    )


def test_dtypes_fixture_to_torch_and_safetensors(tmp_path):
    """fp8, uint16 (no storage class: torch.save path), bool, empty and transposed tensors."""
    expected = surgery.open_checkpoint(FIXTURES / "dtypes.pth").state_dict()
    for out in (tmp_path / "d.safetensors", tmp_path / "d.pt"):
        report = surgery.convert(FIXTURES / "dtypes.pth", out, verify=True)
        assert report.verified == len(expected)
        got = load_file(out) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
        assert_same_tensors(got, {k: v.contiguous() for k, v in expected.items()})


def test_complex_goes_to_torch_and_is_refused_by_safetensors(tmp_path):
    sd = {"z": torch.randn(3, dtype=torch.complex128), "w": torch.randn(2)}
    src = tmp_path / "complex.pt"
    torch.save(sd, src)
    out = tmp_path / "c.pt"
    surgery.convert(src, out, verify=True)
    assert_same_tensors(torch.load(out, weights_only=True), sd)
    before = snapshot(tmp_path)
    run = convert(src, "-o", tmp_path / "c.safetensors")
    assert_clean_error(run, tmp_path / "c.safetensors", contains="safetensors cannot store complex128")
    assert "hint: " in run.stderr
    assert snapshot(tmp_path) == before


# -- key rules ---------------------------------------------------------------
def test_rename_include_exclude_add_prefix(resnet, tmp_path):
    """strip -> add prefix -> rename -> include/exclude, globs over the final names."""
    import re

    _, paths, sd = resnet
    out = tmp_path / "renamed.safetensors"
    report = convert_json(
        paths["zip"],
        "-o",
        out,
        "--strip-prefix",
        "module.",
        "--add-prefix",
        "backbone.",
        "--rename",
        r"^backbone\.layer(\d)=backbone.stage\1",
        "--include",
        "backbone.stage*",
        "--include",
        "backbone.conv1.*",
        "--exclude",
        "*.num_batches_tracked",
    )
    expected = {}
    for k, v in sd.items():
        new = re.sub(r"^layer(\d)", r"stage\1", k)
        if (new.startswith("stage") or new.startswith("conv1.")) and not new.endswith("num_batches_tracked"):
            expected["backbone." + new] = v
    got = load_file(out)
    assert list(got) == list(expected)
    assert_same_tensors(got, expected)
    assert set(report["left_out"]) == {"module." + k for k in sd} - {
        "module." + re.sub(r"^backbone\.stage(\d)", r"layer\1", k).removeprefix("backbone.") for k in expected
    }
    assert len(report["steps"]) == 4


def test_rename_then_prefix_documented_order(tmp_path):
    """strip -> add prefix -> rename -> include/exclude (keys.pipeline's order)."""
    sd = {"module.a.w": torch.ones(2), "module.b.w": torch.zeros(2), "module.c.w": torch.arange(3)}
    src = tmp_path / "s.pt"
    torch.save(sd, src)
    out = tmp_path / "o.safetensors"
    report = surgery.convert(
        src,
        out,
        strip_prefix=["module."],
        add_prefix="net.",
        rename=[r"^net\.a\.=net.alpha."],
        include=["net.alpha.*", "net.c.*"],
    )
    got = load_file(out)
    assert_same_tensors(got, {"net.alpha.w": sd["module.a.w"], "net.c.w": sd["module.c.w"]})
    assert report.left_out == ("module.b.w",)


def test_rename_collision_names_both_keys(resnet, tmp_path):
    _, paths, _ = resnet
    out = tmp_path / "x.safetensors"
    run = convert(paths["zip"], "-o", out, "--rename", r"layer1\.\d+=layer1")
    line = assert_clean_error(run, "--rename", code=2)
    assert "'module.layer1.0." in line and "'module.layer1.1." in line
    assert not out.exists()
    no_temp_left(tmp_path)


def test_bad_rename_regex_is_a_usage_error(resnet, tmp_path):
    _, paths, _ = resnet
    run = convert(paths["zip"], "-o", tmp_path / "x.safetensors", "--rename", "(unclosed=x")
    assert_clean_error(run, "--rename", code=2)


def test_include_nothing_is_refused(resnet, tmp_path):
    _, paths, _ = resnet
    run = convert(paths["zip"], "-o", tmp_path / "x.safetensors", "--include", "nothing.*")
    assert_clean_error(run, paths["zip"], contains="no tensors left", code=2)
    assert os.listdir(tmp_path) == []


def test_key_picks_the_ema_state_dict(tmp_path):
    torch.manual_seed(5)
    model = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    ema = {"w": torch.randn(3, 3), "b": torch.randn(3)}
    src = tmp_path / "ema.pth"
    torch.save({"state_dict": model, "state_dict_ema": ema, "epoch": 7}, src)
    out = tmp_path / "ema.safetensors"
    report = convert_json(src, "-o", out, "--key", "state_dict_ema")
    assert report["container"] == ["state_dict_ema"]
    assert_same_tensors(load_file(out), ema)
    run = convert(FIXTURES / "ema.pth", "-o", tmp_path / "fx.safetensors", "--key", "model_ema")
    assert run.exit_code == 0, run
    expected = surgery.open_checkpoint(FIXTURES / "ema.pth", key="model_ema").state_dict()
    assert_same_tensors(load_file(tmp_path / "fx.safetensors"), expected)
    run = convert(src, "-o", tmp_path / "none.safetensors", "--key", "nope")
    assert_clean_error(run, src, contains="no entry 'nope'", code=2)
    assert "state_dict_ema" in run.stderr  # the hint lists the state_dicts there are
    assert not (tmp_path / "none.safetensors").exists()


# -- tied weights -------------------------------------------------------------
class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.block = torch.nn.Linear(6, 6)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.embed.weight


@pytest.fixture
def tied(tmp_path):
    torch.manual_seed(7)
    model = TiedLM()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    src = tmp_path / "tied.pth"
    torch.save(sd, src)
    return src, {k: v.clone() for k, v in sd.items()}


def test_tied_weights_to_safetensors_stored_once(tied, tmp_path):
    src, sd = tied
    out = tmp_path / "tied.safetensors"
    report = convert_json(src, "-o", out, "--verify")
    assert report["aliases"] == {"lm_head.weight": "embed.weight"}
    assert report["verified"] == len(sd)
    assert report["tensors"] == len(sd)
    with safe_open(out, "pt") as f:
        assert sorted(f.keys()) == ["block.bias", "block.weight", "embed.weight"]
        meta = f.metadata()
    assert json.loads(meta["surgery.aliases"]) == {"lm_head.weight": "embed.weight"}
    ckpt = surgery.open_checkpoint(out)
    assert ckpt.restored == {"lm_head.weight": "embed.weight"}
    assert any(f.severity == "notice" and "surgery.aliases" in f.message for f in ckpt.findings)
    back = ckpt.state_dict()
    assert_same_tensors(back, sd)
    assert back["lm_head.weight"].data_ptr() == back["embed.weight"].data_ptr()
    model = TiedLM()
    model.load_state_dict(back, strict=True)
    assert model.lm_head.weight is model.embed.weight


def test_tied_weights_to_torch_share_storage(tied, tmp_path):
    src, sd = tied
    out = tmp_path / "tied.pt"
    surgery.convert(src, out, verify=True)
    got = torch.load(out, weights_only=True)
    assert_same_tensors(got, sd)
    assert (
        got["lm_head.weight"].untyped_storage().data_ptr() == got["embed.weight"].untyped_storage().data_ptr()
    )
    # and a safetensors file with the alias in its metadata converts back to a tied torch file
    st = tmp_path / "tied.safetensors"
    surgery.convert(src, st)
    again = tmp_path / "again.pt"
    surgery.convert(st, again)
    got = torch.load(again, weights_only=True)
    assert_same_tensors(got, sd)
    assert got["lm_head.weight"].data_ptr() == got["embed.weight"].data_ptr()


def test_tied_weights_sharded_safetensors(tied, tmp_path):
    src, sd = tied
    out = tmp_path / "sharded"
    surgery.convert(src, out, shard_size=300, verify=True)
    index, got = load_sharded(out)
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads(index["metadata"]["surgery.aliases"]) == {"lm_head.weight": "embed.weight"}
    back = surgery.open_checkpoint(out).state_dict()
    assert_same_tensors(back, sd)


def test_tied_weights_renamed_and_half_excluded(tied, tmp_path):
    src, sd = tied
    out = tmp_path / "renamed.safetensors"
    report = surgery.convert(src, out, rename=[r"^embed\.=tok."])
    assert report.aliases == {"lm_head.weight": "tok.weight"}
    back = surgery.open_checkpoint(out).state_dict()
    assert torch.equal(back["lm_head.weight"], sd["embed.weight"])
    # the stored name left out: the alias is written as a tensor of its own
    out2 = tmp_path / "head_only.safetensors"
    report = surgery.convert(src, out2, exclude=["embed.*"])
    assert report.aliases == {}
    got = load_file(out2)
    assert sorted(got) == ["block.bias", "block.weight", "lm_head.weight"]
    assert torch.equal(got["lm_head.weight"], sd["lm_head.weight"])


def test_tied_fixture(tmp_path):
    out = tmp_path / "t.safetensors"
    report = surgery.convert(FIXTURES / "tied.pth", out, verify=True)
    assert report.aliases
    expected = surgery.open_checkpoint(FIXTURES / "tied.pth").state_dict()
    assert_same_tensors(surgery.open_checkpoint(out).state_dict(), expected)


# -- format choice -------------------------------------------------------------
def test_format_safetensors_wins_over_the_file_name(tied, tmp_path):
    src, sd = tied
    out = tmp_path / "model.bin"
    report = surgery.convert(src, out, format="safetensors")
    assert report.output_format == "safetensors"
    assert out.read_bytes()[:2] != b"PK"
    assert_same_tensors(surgery.open_checkpoint(out).state_dict(), sd)


def test_format_torch_wins_over_the_file_name(tied, tmp_path):
    src, sd = tied
    out = tmp_path / "x.safetensors"
    report = surgery.convert(src, out, format="torch")
    assert report.output_format == "torch"
    assert out.read_bytes()[:2] == b"PK"  # torch 2.14's torch.load also reads safetensors: check the bytes
    with open(out, "rb") as f:  # torch.load picks its safetensors reader by this name: give it the bytes
        got = torch.load(f, weights_only=True)
    assert_same_tensors(got, sd)


def test_output_permissions_follow_the_umask(resnet, tmp_path):
    _, paths, _ = resnet
    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "m.safetensors"
    surgery.convert(paths["safetensors"], out)
    folder = tmp_path / "sharded"
    surgery.convert(paths["safetensors"], folder, shard_size="20MB")
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


# -- report, verify, dry run, JSON, provenance --------------------------------
def test_dry_run_writes_nothing(resnet, tmp_path):
    _, paths, sd = resnet
    for out, extra in ((tmp_path / "d.safetensors", ()), (tmp_path / "d_sharded", ("--shard-size", "5MB"))):
        report = convert_json(paths["zip"], "-o", out, "--dry-run", "--strip-prefix", "module.", *extra)
        assert report["written"] is False
        assert report["tensors"] == len(sd)
        assert report["bytes"] == sum(nbytes(t) for t in sd.values())
    assert os.listdir(tmp_path) == []
    run = convert(paths["zip"], "-o", tmp_path / "d.safetensors", "--dry-run")
    assert run.exit_code == 0 and "would write" in run.stdout
    assert os.listdir(tmp_path) == []


def test_verify_counts_every_tensor(resnet, tmp_path):
    _, paths, sd = resnet
    for out, extra in (
        (tmp_path / "v.safetensors", ()),
        (tmp_path / "v.pt", ("--dtype", "fp16", "--allow-lossy-cast")),  # a few weights flush to zero
        (tmp_path / "v_sharded", ("--shard-size", "10MB", "--dtype", "bf16")),
    ):
        report = convert_json(paths["legacy"], "-o", out, "--verify", *extra)
        assert report["verified"] == len(sd), out
    run = convert(paths["safetensors"], "-o", tmp_path / "plain.safetensors", "--verify")
    assert run.exit_code == 0 and f"{len(sd)} tensors equal" in run.stdout
    assert surgery.convert(paths["safetensors"], tmp_path / "nv.safetensors").verified is None


def test_verify_failure_leaves_nothing(resnet, tmp_path, monkeypatch):
    """A re-read that does not match: the output is never put in place."""
    from surgery.commands import convert as converting

    _, paths, _ = resnet
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr("surgery.commands.diff.same_tensor", lambda *a, **k: False)
    for out, extra in ((out_dir / "v.safetensors", {}), (out_dir / "sh", {"shard_size": "10MB"})):
        with pytest.raises(surgery.SurgeryError, match="verify: tensor"):
            converting.convert(paths["safetensors"], out, verify=True, **extra)
    assert os.listdir(out_dir) == []


def test_json_is_one_document_and_subprocess_is_quiet(resnet, tmp_path):
    _, paths, sd = resnet
    out = tmp_path / "sub.safetensors"
    run = run_subprocess("convert", paths["zip"], "-o", out, "--strip-prefix", "module.", "--json")
    assert run.exit_code == 0, run
    assert run.stderr == ""  # no progress bar in a pipe
    doc = json.loads(run.stdout)
    assert doc["output"] == str(out) and doc["written"] is True
    assert_same_tensors(load_file(out), sd)
    run = run_subprocess("convert", paths["zip"], "-o", tmp_path / "plain.pt")
    assert run.exit_code == 0 and run.stderr == "", run
    assert run.stdout.startswith("  summary  wrote ")


def test_provenance_metadata(resnet, tmp_path):
    _, paths, _ = resnet
    out = tmp_path / "p.safetensors"
    surgery.convert(paths["zip"], out, strip_prefix=["module."], dtype="bf16")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # what transformers' from_pretrained requires
    assert meta["surgery.source"] == str(paths["zip"])
    assert meta["surgery.container"] == "state_dict"
    rules = json.loads(meta["surgery.rules"])
    assert rules["strip_prefix"] == ["module."] and rules["dtype"] == "bfloat16"
    files = json.loads(meta["surgery.source_files"])
    assert files == [{"path": str(paths["zip"].resolve()), "bytes": paths["zip"].stat().st_size}]
    assert meta["surgery.version"] == surgery.__version__
    # torch outputs carry it in a member torch ignores
    pt = tmp_path / "p.pt"
    surgery.convert(paths["zip"], pt, strip_prefix=["module."])
    import zipfile

    with zipfile.ZipFile(pt) as zf:
        member = [n for n in zf.namelist() if n.endswith(".data/surgery.json")]
        assert member and json.loads(zf.read(member[0]))["surgery.source"] == str(paths["zip"])


def test_report_summary_and_fields(resnet, tmp_path):
    _, paths, sd = resnet
    report = surgery.convert(paths["zip"], tmp_path / "r.safetensors", strip_prefix=["module."])
    assert isinstance(report, surgery.ConvertReport)
    assert report.source_format == "torch-zip" and report.container == ("state_dict",)
    assert report.raw == len(sd) and report.written
    assert report.summary().startswith(f"wrote {len(sd)} tensors")
    assert f"{len(sd)} copied as raw bytes" in report.summary()
    assert json.loads(json.dumps(report.to_json()))["tensors"] == len(sd)


# -- property: any small state_dict survives the trip ---------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]  # fmt: skip
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def _make(dtype: torch.dtype, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=gen, dtype=dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,5}){0,2}", fullmatch=True),
        st.tuples(st.sampled_from(range(len(DTYPES))), SHAPES),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
    transpose=st.booleans(),
)
def test_property_any_state_dict_converts_to_the_same(tmp_path_factory, specs, seed, transpose):
    gen = torch.Generator().manual_seed(seed)
    sd = {name: _make(DTYPES[i], shape, gen) for name, (i, shape) in specs.items()}
    if transpose:
        sd = {k: (v.t() if v.dim() == 2 else v) for k, v in sd.items()}
    folder = tmp_path_factory.mktemp("prop")
    src = folder / "src.pt"
    torch.save(sd, src)
    out = folder / "out.safetensors"
    report = surgery.convert(src, out, verify=True)
    assert report.verified == len(sd)
    assert surgery.diff(src, out).same
    assert_same_tensors(load_file(out), {k: v.contiguous() for k, v in sd.items()})


# -- memory: a big file streams, torch is never imported ------------------------
@pytest.mark.slow
def test_big_file_streams_without_torch(tmp_path):
    src = tmp_path / "big.safetensors"
    write_big_safetensors(src, tensors=6, mib_each=50, block=os.urandom(1 << 20))  # 300 MiB
    out = tmp_path / "sharded"
    code = (
        "import json, sys, surgery\n"
        f"r = surgery.convert({str(src)!r}, {str(out)!r}, shard_size='110MB', verify=True)\n"
        "print(json.dumps({'raw': r.raw, 'verified': r.verified, 'shards': len(r.shards),\n"
        "  'torch': 'torch' in sys.modules}))\n"
    )
    # ru_maxrss survives fork + exec: a child of this (torch-heavy) process would inherit its peak.
    # So a small wrapper starts the conversion and reports its children's peak.
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-c', sys.argv[1]], capture_output=True, text=True)\n"
        "assert p.returncode == 0, p.stderr\n"
        "doc = json.loads(p.stdout)\n"
        "doc['maxrss_kib'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps(doc))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["torch"] is False
    assert got["raw"] == 6 and got["verified"] == 6 and got["shards"] == 3
    assert got["maxrss_kib"] < 150 * 1024, got  # the file is 300 MiB: never loaded whole
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 300 << 20
    # the shards hold the source's bytes: compare the data regions directly
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        data = f.read(50 << 20)  # first tensor
    with open(out / "model-00001-of-00003.safetensors", "rb") as f:
        m = int.from_bytes(f.read(8), "little")
        f.seek(8 + m)
        assert f.read(50 << 20) == data


def test_torch_file_to_safetensors_without_torch(tmp_path):
    code = (
        "import json, sys, surgery\n"
        f"r = surgery.convert({str(FIXTURES / 'imagenet_example.pth.tar')!r}, {str(tmp_path / 'o.safetensors')!r},"
        " strip_prefix=['module.'], verify=True)\n"
        "print(json.dumps({'raw': r.raw, 'tensors': r.tensors, 'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"raw": 14, "tensors": 14, "torch": False}


# -- bad input -----------------------------------------------------------------
class Case:
    """A source in its own folder and an output folder; `unchanged()` checks both are as they were."""

    def __init__(self, tmp_path: Path, source: Path):
        self.src_dir, self.out_dir = tmp_path / "in", tmp_path / "out"
        self.src_dir.mkdir()
        self.out_dir.mkdir()
        if source.is_dir():
            self.src = self.src_dir / source.name
            shutil.copytree(source, self.src)
        else:
            self.src = self.src_dir / source.name
            shutil.copyfile(source, self.src)
        self.out = self.out_dir / "out.safetensors"
        self.before = snapshot(self.src_dir, self.out_dir)

    def unchanged(self) -> None:
        assert snapshot(self.src_dir, self.out_dir) == self.before


@pytest.fixture
def case(tmp_path):
    return Case(tmp_path, FIXTURES / "imagenet_example.pth.tar")


def test_existing_output_file_needs_force(case):
    case.out.write_bytes(b"old")
    case.before = snapshot(case.src_dir, case.out_dir)
    run = convert(case.src, "-o", case.out)
    assert_clean_error(run, case.out, contains="the output exists", code=2)
    assert "--force" in run.stderr
    case.unchanged()
    run = convert(case.src, "-o", case.out, "--force")
    assert run.exit_code == 0, run
    assert len(load_file(case.out)) == 14
    assert sorted(os.listdir(case.out_dir)) == ["out.safetensors"]


def test_existing_output_folder(case):
    out = case.out_dir / "sharded"
    out.mkdir()
    run = convert(case.src, "-o", out, "--shard-size", "3KB")  # an empty folder is fine
    assert run.exit_code == 0, run
    before = snapshot(case.src_dir, case.out_dir)
    run = convert(case.src, "-o", out, "--shard-size", "2KB")
    assert_clean_error(run, out, contains="not empty", code=2)
    assert snapshot(case.src_dir, case.out_dir) == before
    run = convert(case.src, "-o", out, "--shard-size", "2KB", "--force")
    assert run.exit_code == 0, run
    index, got = load_sharded(out)
    assert len(got) == 14 and len(set(index["weight_map"].values())) > 2
    no_temp_left(case.out_dir)
    (out / "notes.txt").write_text("mine")
    before = snapshot(case.src_dir, case.out_dir)
    run = convert(case.src, "-o", out, "--shard-size", "2KB", "--force")
    assert_clean_error(run, out, contains="notes.txt", code=2)
    assert snapshot(case.src_dir, case.out_dir) == before


def test_output_folder_given_for_a_file_and_file_for_a_folder(case):
    run = convert(case.src, "-o", case.out_dir)
    assert_clean_error(run, case.out_dir, contains="folder", code=2)
    case.out.write_bytes(b"x")
    case.before = snapshot(case.src_dir, case.out_dir)
    run = convert(case.src, "-o", case.out, "--shard-size", "1MB", "--force")
    assert_clean_error(run, case.out, contains="not a folder", code=2)
    case.unchanged()


def test_output_is_the_input(case):
    for extra in ((), ("--force",)):
        run = convert(case.src, "-o", case.src, *extra)
        assert_clean_error(run, case.src, contains="input", code=2)
    link = case.out_dir / "link.pth"
    os.symlink(case.src, link)
    case.before = snapshot(case.src_dir, case.out_dir)
    run = convert(case.src, "-o", link, "--force")
    assert_clean_error(run, link, contains="input", code=2)
    case.unchanged()


def test_output_folder_is_the_source_folder(tmp_path):
    case = Case(tmp_path, FIXTURES / "sharded_safetensors")
    for extra in ((), ("--force",)):
        run = convert(case.src, "-o", case.src, "--shard-size", "1KB", *extra)
        assert_clean_error(run, case.src, code=2)
        run = convert(
            case.src / "model.safetensors.index.json", "-o", case.src, "--shard-size", "1KB", *extra
        )
        assert_clean_error(run, case.src, code=2)
    # a single output file over a shard
    shard = case.src / "model-00001-of-00002.safetensors"
    run = convert(case.src, "-o", shard, "--force")
    assert_clean_error(run, shard, contains="input", code=2)
    case.unchanged()


def test_missing_destination_folder(case):
    for out, extra in (
        (case.out_dir / "no" / "x.safetensors", ()),
        (case.out_dir / "no" / "sh", ("--shard-size", "1KB")),
    ):
        run = convert(case.src, "-o", out, *extra)
        assert_clean_error(run, out, contains="does not exist", code=2)
    case.unchanged()


def test_missing_source(tmp_path):
    run = convert(tmp_path / "nope.pth", "-o", tmp_path / "x.safetensors")
    assert_clean_error(run, tmp_path / "nope.pth", code=1)
    assert os.listdir(tmp_path) == []


def test_shard_missing_from_index(tmp_path):
    case = Case(tmp_path, FIXTURES / "sharded_safetensors")
    (case.src / "model-00002-of-00002.safetensors").unlink()
    case.before = snapshot(case.src_dir, case.out_dir)
    run = convert(case.src, "-o", case.out)
    assert_clean_error(run, case.src / "model.safetensors.index.json", contains="missing", code=1)
    case.unchanged()


def test_two_shards_holding_one_name(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, folder / "s1.safetensors")
    save_file({"a": torch.full((3,), 7.0), "c": torch.ones(1)}, folder / "s2.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(folder)
    out = tmp_path / "o.safetensors"
    run = convert(folder, "-o", out)
    assert_clean_error(run, folder / "model.safetensors.index.json", contains="'a' is in both", code=1)
    assert not out.exists()
    assert snapshot(folder) == before


def test_index_pointing_outside_its_folder(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    save_file({"a": torch.ones(3)}, tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../outside.safetensors"}})
    )
    run = convert(folder, "-o", tmp_path / "o.safetensors")
    assert_clean_error(run, folder / "model.safetensors.index.json", contains="outside", code=1)
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_safetensors_source(tmp_path):
    src = tmp_path / "in" / "trunc.safetensors"
    src.parent.mkdir()
    data = (FIXTURES / "tiny.safetensors").read_bytes()
    src.write_bytes(data[: len(data) - 1000])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(src.parent)
    for out in (out_dir / "o.safetensors", out_dir / "o.pt", out_dir / "sh"):
        extra = ("--shard-size", "1KB") if out.name == "sh" else ()
        run = convert(src, "-o", out, *extra)
        assert_clean_error(run, src, contains="past the end", code=1)
    assert os.listdir(out_dir) == []
    assert snapshot(src.parent) == before


def test_source_truncated_after_opening(tmp_path, monkeypatch):
    """The file shrinks between the header read and the copy: an error, nothing left."""
    src = tmp_path / "s.safetensors"
    shutil.copyfile(FIXTURES / "tiny.safetensors", src)
    from surgery.formats import checkpoint

    real = checkpoint.open_trusted

    def shrinking(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        with open(src, "r+b") as f:
            f.truncate(src.stat().st_size - 2000)
        return ckpt

    monkeypatch.setattr("surgery.commands.convert.open_trusted", shrinking)
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    with pytest.raises(surgery.SurgeryError, match="truncated|ends"):
        surgery.convert(src, out)
    assert os.listdir(out.parent) == []


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_source_needs_trust_and_is_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    torch.manual_seed(9)
    sd = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    src = tmp_path / "in" / "evil.pth"
    src.parent.mkdir()
    torch.save({"weights": sd, "hook": _Payload(marker)}, src)
    before = snapshot(src.parent)
    out = tmp_path / "out.safetensors"
    run = convert(src, "-o", out)
    assert_clean_error(run, src, contains="refused", code=1)
    assert "--trust" in run.stderr
    assert not out.exists()
    run = convert(src, "-o", out, "--trust")
    assert run.exit_code == 0, run
    assert_same_tensors(load_file(out), sd)
    run = run_subprocess("convert", src, "-o", tmp_path / "sub.pt", "--trust")
    assert run.exit_code == 0, run
    assert_same_tensors(torch.load(tmp_path / "sub.pt", weights_only=True), sd)
    assert not marker.exists()  # the pickle's os.system was never called
    assert snapshot(src.parent) == before


def test_unsafe_fixture(tmp_path):
    out = tmp_path / "p.safetensors"
    run = convert(FIXTURES / "payload_os_system.pth", "-o", out)
    assert_clean_error(run, FIXTURES / "payload_os_system.pth", contains="os.system", code=1)
    assert not out.exists()
    assert convert(FIXTURES / "payload_os_system.pth", "-o", out, "--trust").exit_code == 0
    assert len(load_file(out)) == 14


def test_source_without_a_state_dict(tmp_path):
    src = save_path = tmp_path / "epoch.pt"
    torch.save({"epoch": 3, "lr": 0.1}, save_path)
    run = convert(src, "-o", tmp_path / "o.safetensors")
    assert_clean_error(run, src, contains="no state_dict to convert", code=1)
    assert sorted(os.listdir(tmp_path)) == ["epoch.pt"]


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("hello\n")
    run = convert(src, "-o", tmp_path / "o.safetensors")
    assert_clean_error(run, src, code=1)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize(
    "args,where",
    [
        (("--dtype", "int8"), "--dtype"),
        (("--dtype", ""), "--dtype"),
        (("--format", "onnx"), "--format"),
        (("--shard-size", "abc"), "--shard-size"),
        (("--shard-size", "0"), "--shard-size"),
        (("--shard-size", "-1GB"), "--shard-size"),
        (("--shard-size", "1XB"), "--shard-size"),
        (("--shard-size", "inf"), "--shard-size"),
        (("--shard-size", "nan"), "--shard-size"),
        (("--shard-size", "0.1"), "--shard-size"),
        (("--shard-size", "1GB", "--format", "dcp"), "--shard-size"),
    ],
)
def test_bad_options_are_usage_errors(case, args, where):
    run = convert(case.src, "-o", case.out_dir / "x", *args)
    assert_clean_error(run, where, code=2)
    case.unchanged()


def test_bad_options_through_the_library(tmp_path):
    for kwargs in (
        {"dtype": "int8"},
        {"format": "onnx"},
        {"shard_size": 0},
        {"shard_size": -5},
        {"shard_size": "x"},
    ):
        with pytest.raises(surgery.UsageError):
            surgery.convert(FIXTURES / "tiny.safetensors", tmp_path / "x.safetensors", **kwargs)
    assert os.listdir(tmp_path) == []


# -- the disk fills up --------------------------------------------------------
LIMITED = """
import resource, signal, subprocess, sys
limit = int(sys.argv[1])
def pre():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
p = subprocess.run([sys.executable, "-m", "surgery", *sys.argv[2:]], preexec_fn=pre, capture_output=True, text=True)
sys.stdout.write(p.stdout)
sys.stderr.write(p.stderr)
sys.exit(p.returncode)
"""


@pytest.fixture(scope="module")
def two_mib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_mib")
    torch.manual_seed(2)
    src = folder / "big.pt"
    torch.save({f"w{i}": torch.randn(256, 256) for i in range(8)}, src)  # 8 x 256 KiB
    return src


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,extra",
    [
        ("o.safetensors", ()),
        ("o.safetensors", ("--dtype", "fp16")),
        ("o.pt", ()),
        ("sharded", ("--shard-size", "1MB")),
        ("sharded_bin", ("--shard-size", "1MB", "--format", "torch")),
        ("dcp", ("--format", "dcp")),
    ],
)
def test_disk_full_mid_write(two_mib, tmp_path, name, extra):
    """RLIMIT_FSIZE makes writes past 600 KB fail with EFBIG, as a full disk would (SIGXFSZ ignored)."""
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    src = src_dir / "big.pt"
    shutil.copyfile(two_mib, src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    digest = sha(src)
    limit = "600000"
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, limit, "convert", src, "-o", out_dir / name, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    from conftest import Run

    run = Run(proc.returncode, proc.stdout, proc.stderr)
    assert_clean_error(run, out_dir / name, contains="cannot write", code=1)
    assert "too large" in run.stderr.lower() or "space" in run.stderr.lower()
    assert os.listdir(out_dir) == []  # no output, no temporary file or folder
    assert sha(src) == digest and os.listdir(src_dir) == ["big.pt"]


@pytest.mark.parametrize("fail", ["copy_file_range", "fsync"])
def test_write_failure_in_process(two_mib, tmp_path, monkeypatch, fail):
    """ENOSPC from the kernel copy (and its sendfile fallback), or from the closing fsync: one clean
    error, nothing left."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail == "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", no_space, raising=False)
        monkeypatch.setattr(os, "sendfile", no_space)
        cases = [("o.safetensors", ()), ("sh", ("--shard-size", "1MB"))]
    else:
        monkeypatch.setattr(os, "fsync", no_space)
        cases = [("o.safetensors", ()), ("o.pt", ("--dtype", "fp16")), ("sh", ("--shard-size", "1MB"))]
    for name, extra in cases:
        run = convert(two_mib, "-o", out_dir / name, *extra)
        assert_clean_error(run, out_dir / name, contains="No space left", code=1)
        assert os.listdir(out_dir) == [], name


def test_interrupted_write_leaves_nothing(two_mib, tmp_path, monkeypatch):
    """Any exception mid-write (here a KeyboardInterrupt after the first tensor): no temp file."""
    from surgery.writers import copy as writer

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = {"n": 0}
    real = writer.Writeback.__call__

    def interrupt(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(writer.Writeback, "__call__", interrupt)
    for out in (out_dir / "o.safetensors", out_dir / "sh"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            surgery.convert(two_mib, out, shard_size="1MB" if out.name == "sh" else None)
        assert os.listdir(out_dir) == []


def test_a_big_tensor_is_cast_in_pieces_bit_identical_to_torch(tmp_path):
    torch.manual_seed(1)
    big = torch.randn(5_000_003)  # not a multiple of the piece size
    big[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    save_file({"big": big, "i": torch.arange(3)}, tmp_path / "big.safetensors")
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / f"{dtype}.pt"
        # 1e-40 (and a few of the 5M normal values) flush to zero in fp16: allowed, and counted
        surgery.convert(tmp_path / "big.safetensors", out, dtype=dtype, verify=True, allow_lossy_cast=True)
        got = torch.load(out, weights_only=True)
        assert torch.equal(got["big"].view(torch.int16), big.to(torch_dtype).view(torch.int16))
        assert got["i"].dtype == torch.int64
