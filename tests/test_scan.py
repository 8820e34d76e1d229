"""`surgery scan`: one verdict per checkpoint under many paths, for people and CI gates.

Real files (the fixtures, torch.save, safetensors, hostile pickles whose payload is proved
to run under plain pickle) through the library, the in-process CLI and a real process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from conftest import FIXTURES, ROOT, run_cli, run_subprocess, torch_save_bytes
from safetensors.torch import save_file

import surgery
from surgery.commands.scan import SARIF_RULES

STATE = {"conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2), "conv.bias": torch.ones(2)}


class RunsCommand:
    """Plain pickle calls os.system(command) when it loads this."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def payload_checkpoint(path: Path, marker: Path) -> Path:
    """A torch.save file whose pickle runs `touch marker` under torch.load(weights_only=False)."""
    path.write_bytes(torch_save_bytes({"state_dict": STATE, "hook": RunsCommand(f"touch {marker}")}))
    return path


def prove_payload_runs(path: Path, marker: Path) -> None:
    """torch.load(weights_only=False) runs it: the test would prove nothing otherwise."""
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def verdicts(report) -> dict[str, str]:
    return {r.path: r.verdict for r in report.results}


# -- the fixtures, as one folder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures_copy(tmp_path_factory) -> Path:
    """The fixtures as committed: other tests import make_fixtures, leaving a __pycache__ beside it."""
    copy = tmp_path_factory.mktemp("scan") / "fixtures"
    shutil.copytree(FIXTURES, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture(scope="module")
def fixtures_report(fixtures_copy):
    return surgery.scan([fixtures_copy])


def test_each_fixture_gets_its_verdict(fixtures_report):
    found = {Path(p).name: v for p, v in verdicts(fixtures_report).items()}
    assert found["payload_os_system.pth"] == "danger"
    assert found["full_model.pth"] == "unsafe"
    assert found["numpy_extras.pth"] == "unsafe"
    unsafe = {"payload_os_system.pth", "full_model.pth", "numpy_extras.pth"}
    assert {name for name, v in found.items() if v != "safe"} == unsafe
    assert fixtures_report.failed


def test_sharded_and_dcp_folders_are_one_checkpoint_each(fixtures_report, fixtures_copy):
    found = {Path(p).relative_to(fixtures_copy).as_posix() for p in verdicts(fixtures_report)}
    assert "sharded_safetensors/model.safetensors.index.json" in found
    assert "sharded_bin/pytorch_model.bin.index.json" in found
    assert "dcp_sharded" in found
    assert not [p for p in found if "-of-" in p or p.endswith((".distcp", ".metadata"))], found
    sharded = next(r for r in fixtures_report.results if r.path.endswith("model.safetensors.index.json"))
    assert sharded.format == "sharded" and sharded.tensors == 14 and len(sharded.files) == 3


def test_files_that_are_not_checkpoints_are_skipped_and_counted(fixtures_report):
    assert [Path(s.path).name for s in fixtures_report.skipped] == ["make_fixtures.py"]
    assert "1 file skipped (not checkpoints)" in fixtures_report.summary()


def test_the_worst_finding_is_on_the_checkpoints_line(fixtures_copy):
    run = run_cli("scan", fixtures_copy)
    assert run.exit_code == 1, run
    line = next(line for line in run.stdout.splitlines() if "payload_os_system.pth" in line)
    assert line.startswith(
        f"  danger   {fixtures_copy}/payload_os_system.pth  torch-zip: global os.system (GLOBAL)"
    )
    assert "os.system('echo surgery-fixture-payload')" in line
    unsafe = next(line for line in run.stdout.splitlines() if "full_model.pth" in line)
    assert unsafe.startswith("  unsafe ") and unsafe.endswith("(and 6 more)")
    assert f"  safe     {fixtures_copy}/tied.pth  torch-zip, 4 tensors" in run.stdout.splitlines()
    summary = run.stdout.splitlines()[-1]
    assert summary.startswith("  summary  scanned 18 checkpoints in ")
    assert summary.endswith(": 1 danger, 2 unsafe, 15 safe; 1 file skipped (not checkpoints)")
    assert run.stderr == ""


def test_only_safe_checkpoints_exit_0(tmp_path):
    torch.save(STATE, tmp_path / "a.pt")
    save_file(STATE, tmp_path / "b.safetensors")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for run in (run_cli("scan", tmp_path), run_subprocess("scan", tmp_path)):
        assert run.exit_code == 0, run
        assert run.stdout.splitlines()[:2] == [
            f"  safe     {tmp_path}/a.pt  torch-zip, 2 tensors",
            f"  safe     {tmp_path}/b.safetensors  safetensors, 2 tensors",
        ]
        assert run.stdout.splitlines()[2].endswith(": 2 safe; 1 file skipped (not checkpoints)")


def test_a_payload_is_danger_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = payload_checkpoint(tmp_path / "model.pth", marker)
    prove_payload_runs(path, marker)
    for run in (run_cli("scan", path), run_subprocess("scan", path)):
        assert run.exit_code == 1
        assert run.stdout.startswith(f"  danger   {path}  torch-zip: global posix.system")
    assert surgery.scan([tmp_path]).results[0].verdict == "danger"
    assert not marker.exists()


def test_an_empty_folder_scans_nothing_and_passes(tmp_path):
    run = run_cli("scan", tmp_path)
    assert run.exit_code == 0
    assert run.stdout.startswith("  summary  scanned 0 checkpoints in ")


# -- what cannot be read is answered, never a crash ----------------------------------------------


def test_a_truncated_checkpoint_is_corrupt_and_fails(tmp_path):
    raw = torch_save_bytes(STATE)
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    torch.save(STATE, tmp_path / "whole.pt")
    run = run_cli("scan", tmp_path)
    assert run.exit_code == 1
    assert run.stdout.startswith(f"  corrupt  {tmp_path}/cut.pt  damaged or truncated zip archive")
    assert f"  safe     {tmp_path}/whole.pt  torch-zip, 2 tensors" in run.stdout


def test_a_payload_before_the_damage_still_decides_the_verdict(tmp_path):
    marker = tmp_path / "MARKER"
    body = pickle.dumps({"hook": RunsCommand(f"touch {marker}"), "w": [1.0] * 50}, protocol=2)
    (tmp_path / "cut.pkl").write_bytes(body[:-20])
    result = surgery.scan([tmp_path / "cut.pkl"]).results[0]
    assert result.verdict == "danger"
    assert "broken pickle" in result.error
    assert not marker.exists()


def test_a_missing_path_and_a_missing_shard_are_errors(tmp_path):
    save_file(STATE, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"conv.weight": "model-00001-of-00002.safetensors", "x": "gone.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    run = run_cli("scan", tmp_path, tmp_path / "nowhere.pt")
    assert run.exit_code == 1
    lines = run.stdout.splitlines()
    assert f"  error    {tmp_path}/nowhere.pt  no such file or folder" in lines
    assert (
        f"  error    {tmp_path}/model.safetensors.index.json  the index names shard 'gone.safetensors', which is missing"
        in lines
    )


def test_a_fifo_is_skipped_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.pt")
    torch.save(STATE, tmp_path / "a.pt")
    run = run_subprocess("scan", tmp_path, tmp_path / "pipe.pt")  # would block forever if opened
    assert run.exit_code == 0, run
    assert f"  skipped  {tmp_path}/pipe.pt  not a regular file (a FIFO)" in run.stdout.splitlines()
    assert "; 2 files skipped" in run.stdout  # the named one and the one in the folder, once each


def test_a_named_file_that_is_not_a_checkpoint_says_why(tmp_path):
    (tmp_path / "model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    run = run_cli("scan", tmp_path / "model.bin")
    assert run.exit_code == 0
    assert run.stdout.splitlines()[0] == (
        f"  skipped  {tmp_path}/model.bin  a Git LFS pointer, not the weights: run `git lfs pull` to fetch the file"
    )


def test_control_characters_in_names_are_printed_escaped(tmp_path):
    torch.save(STATE, tmp_path / "evil\x1b[31m.pt")
    run = run_cli("scan", tmp_path)
    assert "\x1b" not in run.stdout
    assert f"  safe     {tmp_path}/evil\\x1b[31m.pt  torch-zip, 2 tensors" in run.stdout


# -- symlinks and the Hugging Face Hub cache -----------------------------------------------------


def hub_repo(cache: Path, name: str, files: dict[str, bytes]) -> Path:
    """`models--org--name` as huggingface_hub lays it out: blobs named by hash, a snapshot of
    relative symlinks into them, refs/main naming the snapshot."""
    import hashlib

    repo = cache / f"models--{name.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for filename, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / filename).symlink_to(f"../../blobs/{blob}")
    return repo


def safetensors_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save(state)


def test_the_hub_cache_is_scanned_once_per_blob_under_its_snapshot_name(tmp_path):
    cache = tmp_path / "hub"
    weights = safetensors_bytes(STATE)
    hub_repo(cache, "org/one", {"model.safetensors": weights, "config.json": b'{"hidden": 8}'})
    marker = tmp_path / "MARKER"
    hub_repo(
        cache, "org/two", {"pytorch_model.bin": payload_checkpoint(tmp_path / "p.bin", marker).read_bytes()}
    )
    report = surgery.scan([cache])
    snapshot = "snapshots/" + "0" * 40
    assert verdicts(report) == {
        f"{cache}/models--org--one/{snapshot}/model.safetensors": "safe",
        f"{cache}/models--org--two/{snapshot}/pytorch_model.bin": "danger",
    }
    assert sorted(Path(s.path).name for s in report.skipped) == ["config.json", "main", "main"]
    assert not marker.exists()


def test_a_snapshot_folder_follows_its_links_into_the_repos_blobs(tmp_path):
    repo = hub_repo(tmp_path / "hub", "org/one", {"model.safetensors": safetensors_bytes(STATE)})
    snapshot = repo / "snapshots" / ("0" * 40)
    report = surgery.scan([snapshot])
    assert verdicts(report) == {f"{snapshot}/model.safetensors": "safe"}


def test_a_sharded_checkpoint_in_the_hub_cache_is_one_checkpoint(tmp_path):
    shards = {
        "model-00001-of-00002.safetensors": safetensors_bytes({"conv.weight": STATE["conv.weight"]}),
        "model-00002-of-00002.safetensors": safetensors_bytes({"conv.bias": STATE["conv.bias"]}),
    }
    weight_map = {
        "conv.weight": "model-00001-of-00002.safetensors",
        "conv.bias": "model-00002-of-00002.safetensors",
    }
    files = {**shards, "model.safetensors.index.json": json.dumps({"weight_map": weight_map}).encode()}
    repo = hub_repo(tmp_path / "hub", "org/sharded", files)
    report = surgery.scan([tmp_path / "hub"])
    index = f"{repo}/snapshots/{'0' * 40}/model.safetensors.index.json"
    assert verdicts(report) == {index: "safe"}


def test_symlinks_leaving_the_folder_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "MARKER"
    payload_checkpoint(outside / "evil.pt", marker)
    scanned = tmp_path / "scanned"
    scanned.mkdir()
    torch.save(STATE, scanned / "a.pt")
    (scanned / "link.pt").symlink_to(outside / "evil.pt")
    (scanned / "folder").symlink_to(outside)
    report = surgery.scan([scanned])
    assert verdicts(report) == {f"{scanned}/a.pt": "safe"}
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons == {
        "link.pt": "a symlink leaving the scanned folder: not followed",
        "folder": "a symlink to a folder outside the scanned folder",
    }
    assert not report.failed


def test_the_same_file_reached_twice_is_scanned_once(tmp_path):
    torch.save(STATE, tmp_path / "a.pt")
    os.link(tmp_path / "a.pt", tmp_path / "hardlink.pt")
    (tmp_path / "alias.pt").symlink_to("a.pt")
    report = surgery.scan([tmp_path, tmp_path / "a.pt"])
    assert verdicts(report) == {f"{tmp_path}/a.pt": "safe"}  # the name given on the command line


def test_a_dcp_folder_that_cannot_be_read_is_one_error_not_its_files(tmp_path):
    dcp = tmp_path / "step_10"
    shutil.copytree(FIXTURES / "dcp_sharded", dcp)
    (dcp / ".metadata").write_bytes(b"\x80\x02}q\x00.")  # a pickle, but no DCP metadata
    report = surgery.scan([tmp_path])
    assert [(r.path, r.verdict) for r in report.results] == [(str(dcp), "corrupt")]


# -- --json and --sarif -------------------------------------------------------------------------


def test_json_is_one_document_with_every_verdict(fixtures_copy):
    run = run_cli("scan", fixtures_copy, "--json")
    assert run.exit_code == 1
    doc = json.loads(run.stdout)
    assert doc["surgery_json"] == 1
    assert doc["counts"] == {"danger": 1, "unsafe": 2, "corrupt": 0, "error": 0, "safe": 15}
    assert doc["failed"] is True
    danger = next(c for c in doc["checkpoints"] if c["verdict"] == "danger")
    assert danger["format"] == "torch-zip" and danger["tensors"] == 14
    assert danger["findings"][0]["severity"] == "danger"
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["make_fixtures.py"]


GITHUB_LEVELS = {"error", "warning", "note", "none"}


def check_sarif_for_github(doc: dict) -> None:
    """The properties GitHub code scanning requires of an uploaded SARIF file, checked by hand
    (docs.github.com, "SARIF support for code scanning")."""
    assert doc["version"] == "2.1.0"
    assert doc["$schema"].endswith("sarif-2.1.0.json")
    assert isinstance(doc["runs"], list) and doc["runs"]
    for run in doc["runs"]:
        driver = run["tool"]["driver"]
        assert isinstance(driver["name"], str) and driver["name"]
        rules = driver["rules"]
        ids = [rule["id"] for rule in rules]
        assert len(set(ids)) == len(ids)
        for rule in rules:
            for key in ("shortDescription", "fullDescription", "help"):
                assert isinstance(rule[key]["text"], str) and rule[key]["text"], (rule["id"], key)
            assert rule["defaultConfiguration"]["level"] in GITHUB_LEVELS
            assert 0.0 <= float(rule["properties"]["security-severity"]) <= 10.0
            assert "security" in rule["properties"]["tags"]
        assert isinstance(run["results"], list)
        for result in run["results"]:
            assert result["ruleId"] in ids
            assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
            assert result["level"] in GITHUB_LEVELS
            assert isinstance(result["message"]["text"], str) and result["message"]["text"]
            assert 1 <= len(result["locations"]) <= 10
            physical = result["locations"][0]["physicalLocation"]
            uri = physical["artifactLocation"]["uri"]
            assert uri and "\\" not in uri and " " not in uri
            assert physical["region"]["startLine"] >= 1
            assert all(isinstance(v, str) for v in result["partialFingerprints"].values())


def test_sarif_holds_what_github_code_scanning_requires(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "scan.sarif"
    run = run_cli("scan", "fixtures", "--sarif", out)
    assert run.exit_code == 1
    assert run.stdout.splitlines()[-1].startswith("  summary  scanned 18 checkpoints")  # the lines as usual
    doc = json.loads(out.read_text())
    check_sarif_for_github(doc)
    results = doc["runs"][0]["results"]
    assert [(r["ruleId"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]) for r in results][
        :2
    ] == [
        ("surgery/pickle-outside-allowlist", "fixtures/full_model.pth"),
        ("surgery/pickle-outside-allowlist", "fixtures/full_model.pth"),
    ]
    danger = [r for r in results if r["ruleId"] == "surgery/pickle-runs-code"]
    assert len(danger) == 1
    assert danger[0]["level"] == "error"
    assert danger[0]["locations"][0]["physicalLocation"]["artifactLocation"] == {
        "uri": "fixtures/payload_os_system.pth",
        "uriBaseId": "%SRCROOT%",
    }
    assert "os.system('echo surgery-fixture-payload')" in danger[0]["message"]["text"]
    assert len(results) == 7 + 2 + 1  # every unsafe global of full_model and numpy_extras, the danger
    assert [rule["id"] for rule in doc["runs"][0]["tool"]["driver"]["rules"]] == [
        rule[0] for rule in SARIF_RULES.values()
    ]


def test_sarif_paths_are_uri_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my models").mkdir()
    raw = torch_save_bytes(STATE)
    (tmp_path / "my models" / "cut #1.pt").write_bytes(raw[:100])
    out = tmp_path / "out.sarif"
    assert run_cli("scan", ".", "--sarif", out).exit_code == 1
    doc = json.loads(out.read_text())
    check_sarif_for_github(doc)
    (result,) = doc["runs"][0]["results"]
    assert result["ruleId"] == "surgery/corrupt-checkpoint"
    uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "my%20models/cut%20%231.pt"
    assert (tmp_path / unquote(uri)).exists()


def test_a_clean_scan_gives_sarif_with_no_results(tmp_path):
    torch.save(STATE, tmp_path / "a.pt")
    out = tmp_path / "out.sarif"
    assert run_cli("scan", tmp_path / "a.pt", "--sarif", out).exit_code == 0
    doc = json.loads(out.read_text())
    check_sarif_for_github(doc)
    assert doc["runs"][0]["results"] == []


def test_sarif_never_overwrites_a_scanned_checkpoint(tmp_path):
    torch.save(STATE, tmp_path / "a.pt")
    before = (tmp_path / "a.pt").read_bytes()
    run = run_cli("scan", tmp_path, "--sarif", tmp_path / "a.pt")
    assert run.exit_code == 2
    assert run.stderr.startswith(f"error: {tmp_path}/a.pt: the SARIF output would overwrite")
    assert (tmp_path / "a.pt").read_bytes() == before


# -- never torch, never a payload ------------------------------------------------------------------


def test_scan_imports_no_torch_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    payload_checkpoint(tmp_path / "evil.pth", marker)
    prove_payload_runs(tmp_path / "evil.pth", marker)
    script = (
        "import sys, surgery\n"
        "from surgery.cli import app\n"
        f"report = surgery.scan([{str(FIXTURES)!r}, {str(tmp_path)!r}])\n"
        "assert report.counts['danger'] == 2, report.counts\n"
        "try:\n"
        f"    app(['scan', '--json', {str(FIXTURES)!r}, {str(tmp_path)!r}])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 1\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "False False"
    assert not marker.exists()


def test_a_zip_that_is_not_a_checkpoint_is_skipped_in_a_folder(tmp_path):
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    report = surgery.scan([tmp_path])
    assert report.results == ()
    assert [s.reason for s in report.skipped] == [
        "a zip archive but not a torch checkpoint: no data.pkl (holds readme.txt)"
    ]


# -- torch's pre-0.4 tar format -------------------------------------------------------------------

TAR_STORAGE = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.int64: "LongStorage"}


def _pickled(*items: bytes) -> bytes:
    """A protocol 2 pickle of a tuple of already-pickled items."""
    return b"\x80\x02(" + b"".join(items) + b"t."


def _item(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]


def torch03_tar(
    path: Path, obj, tensors: dict[str, torch.Tensor], *, tensor_type_payload: bytes = b""
) -> Path:
    """`torch.save(obj)` as PyTorch 0.3 wrote it (the layout `torch.serialization._legacy_load`
    reads): members sys_info, pickle, tensors, storages; tensors and storages keyed by id."""
    import io
    import struct
    import tarfile

    storage_keys: dict[int, int] = {}
    storages = io.BytesIO()
    roots = {t.untyped_storage().data_ptr(): t for t in tensors.values()}
    pickle.dump(len(roots), storages, protocol=2)
    for ptr, t in roots.items():
        storage_keys[ptr] = key = 100 + len(storage_keys)
        raw = bytes(t.untyped_storage())
        kind = f"ctorch\n{TAR_STORAGE[t.dtype]}\n".encode()
        storages.write(_pickled(_item(key), _item("cpu"), kind))
        storages.write(struct.pack("<q", len(raw) // t.element_size()) + raw)
    pickle.dump([], storages, protocol=2)
    tensor_keys = {name: 1000 + i for i, name in enumerate(tensors)}
    records = io.BytesIO()
    pickle.dump(len(tensors), records, protocol=2)
    for name, t in tensors.items():
        kind = (
            tensor_type_payload or f"ctorch\n{TAR_STORAGE[t.dtype].replace('Storage', 'Tensor')}\n".encode()
        )
        records.write(
            _pickled(_item(tensor_keys[name]), _item(storage_keys[t.untyped_storage().data_ptr()]), kind)
        )
        records.write(
            struct.pack("<ii", t.dim(), 0)
            + struct.pack(f"<{2 * t.dim() + 1}q", *t.shape, *t.stride(), t.storage_offset())
        )
    by_id = {id(t): str(tensor_keys[name]) for name, t in tensors.items()}

    class Saver(pickle.Pickler):
        def persistent_id(self, o):
            return by_id.get(id(o)) if isinstance(o, torch.Tensor) else None

    body = io.BytesIO()
    Saver(body, protocol=2).dump(obj)
    sys_info = pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}, protocol=2
    )
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("sys_info", sys_info),
            ("pickle", body.getvalue()),
            ("tensors", records.getvalue()),
            ("storages", storages.getvalue()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_state() -> OrderedDict:
    base = torch.arange(12, dtype=torch.float32)
    return OrderedDict(
        [
            ("fc.weight", base.view(3, 4)),
            ("fc.bias", base[4:7]),  # a view into the same storage, at an offset
            ("proj.weight", base.view(3, 4).t()),  # strided
            ("steps", torch.tensor(5)),
            ("scale", torch.tensor([0.5, 2.0], dtype=torch.float64)),
        ]
    )


def test_a_pytorch_0_3_tar_lists_the_tensors_torch_loads(tmp_path):
    state = tar_state()
    path = torch03_tar(tmp_path / "model.pth", {"state_dict": state, "epoch": 3}, state)
    loaded = torch.load(path, weights_only=False)["state_dict"]  # torch's own reader of the format
    ckpt = surgery.open_checkpoint(path)
    assert ckpt.format == "torch-tar" and ckpt.container == ("state_dict",) and ckpt.safe, ckpt.findings
    assert [(t.name, list(t.shape), t.dtype) for t in ckpt.tensors] == [
        (name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in loaded.items()
    ]
    assert [e.summary for e in ckpt.extras] == ["3"]
    ours = ckpt.state_dict()
    for name, want in loaded.items():
        assert torch.equal(ours[name], want) and ours[name].stride() == want.stride(), name
        assert ours[name].storage_offset() == want.storage_offset(), name
    assert ckpt.shared == [["fc.weight", "fc.bias", "proj.weight"]]


def test_a_payload_in_a_tar_checkpoints_pickle_is_danger_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    state = tar_state()
    path = torch03_tar(
        tmp_path / "model.pth", {"state_dict": state, "hook": RunsCommand(f"touch {marker}")}, state
    )
    prove_payload_runs(path, marker)
    result = surgery.scan([path]).results[0]
    assert (result.verdict, result.format) == ("danger", "torch-tar")
    assert "posix.system" in result.reason
    assert not marker.exists()


def test_a_payload_in_a_tar_checkpoints_tensor_records_is_danger(tmp_path):
    marker = tmp_path / "MARKER"
    state = tar_state()
    payload = b"cposix\nsystem\n" + _item(f"touch {marker}") + b"\x85R"  # as a tensor's class
    path = torch03_tar(tmp_path / "model.pth", {"state_dict": state}, state, tensor_type_payload=payload)
    prove_payload_runs(path, marker)
    result = surgery.scan([path]).results[0]
    assert result.verdict == "danger"
    assert any(f.where.startswith(f"{path}: tensors byte") for f in result.findings if f.severity == "danger")
    assert not marker.exists()


def test_a_tar_that_is_not_a_torch_checkpoint_is_named_as_such(tmp_path):
    import tarfile

    (tmp_path / "readme.txt").write_text("hello")
    with tarfile.open(tmp_path / "docs.tar", "w") as tar:
        tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    run = run_cli("inspect", tmp_path / "docs.tar")
    assert run.exit_code == 1
    assert (
        run.stderr
        == f"error: {tmp_path}/docs.tar: a tar archive, not a torch < 0.4 checkpoint (holds readme.txt)\n"
    )


def test_a_truncated_tar_checkpoint_is_corrupt(tmp_path):
    state = tar_state()
    path = torch03_tar(tmp_path / "model.pth", {"state_dict": state}, state)
    path.write_bytes(path.read_bytes()[:2000])
    result = surgery.scan([path]).results[0]
    assert result.verdict == "corrupt", result
