"""Shared helpers: running the CLI both in-process and as a real subprocess,
writing checkpoint-shaped files from raw bytes, and a seeded resnet18 saved once per session."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from typer.testing import CliRunner

from surgery.cli import app

# CI replays the same examples every run: a red build is a bug, never bad luck. Elsewhere
# ("dev") each run draws new ones, a third as many in the tests that ask `examples()`
# (hypothesis' database replays any that failed before). `--hypothesis-profile ci` runs CI's.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("dev", max_examples=35)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def examples(in_ci: int) -> int:
    """A property test's example count: `in_ci` under the "ci" profile (hypothesis' default of
    100 a test), scaled as the loaded profile's `max_examples` is otherwise."""
    return max(1, round(in_ci * settings.default.max_examples / 100))


def pytest_configure(config: pytest.Config) -> None:
    # The tests' tensors are small: on a machine whose cores are busy, torch's second
    # intra-op thread only waits for a core (a resnet18 forward pass took 3x longer).
    import torch

    torch.set_num_threads(1)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What is imported and collected by now (torch, hypothesis, every test module) lives to the
    # end. Frozen, it is no longer walked by each full garbage collection: 0.3 s a collection,
    # 18 s of CPU in test_hostile_safetensors, test_port and test_recipes alone.
    gc.collect()
    gc.freeze()


ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Run:
    """`surgery ARGS` in-process through Typer's CliRunner (stdout is not a terminal)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Run(result.exit_code, result.stdout, result.stderr)


def run_subprocess(*args: str, cwd: Path | None = None, env: dict | None = None) -> Run:
    """`python -m surgery ARGS` as a separate process, as a user or a pipeline runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_error(run: Run, path: object, *, contains: str = "", code: int | None = None) -> str:
    """A refusal the way users must see it: one `error: <path>: ...` line, no traceback."""
    assert run.exit_code != 0, run
    if code is not None:
        assert run.exit_code == code, run
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith(f"error: {path}: "), errors[0]
    assert contains.lower() in errors[0].lower(), errors[0]
    return errors[0]


def write_torch_zip(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A zip laid out as torch.save writes it, around a data.pkl of our own."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, blob in (storages or {}).items():
            zf.writestr(f"{prefix}/data/{key}", blob)
        zf.writestr(f"{prefix}/version", "3\n")
        for name, blob in (extra or {}).items():
            zf.writestr(name, blob)
    return path


def write_big_safetensors(path: Path, tensors: int, mib_each: int, block: bytes) -> None:
    """A safetensors file of `tensors` flat float32 tensors of `mib_each` MiB, their bytes `block`
    repeated, written without torch and without holding it (big inputs made at test time)."""
    numel = (mib_each << 20) // 4
    header = {
        f"layer{i}.weight": {
            "dtype": "F32",
            "shape": [numel],
            "data_offsets": [i * numel * 4, (i + 1) * numel * 4],
        }
        for i in range(tensors)
    }
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    assert (1 << 20) % len(block) == 0, "a block divides a MiB"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _ in range(tensors * mib_each * ((1 << 20) // len(block))):
            f.write(block)


def torch_save_bytes(obj: object, **kwargs) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@dataclass(frozen=True)
class SavedResnet18:
    """torchvision's resnet18 as `torch.manual_seed(0)` initialises it (never downloaded), saved as
    users hold it. Shared by every test module: read it, never change it; a test that writes beside
    or over its input copies the file into its own tmp_path first."""

    state: dict  # the state_dict
    imagenet: Path  # the PyTorch ImageNet example's checkpoint.pth.tar: `module.` keys, epoch, arch
    plain: Path  # torch.save(state)
    legacy: Path  # torch.save(state) in the pre-1.6 format
    safetensors: Path  # safetensors' save_file(state), metadata {"format": "pt"}


def _tree_digest(folder: Path, state: dict) -> str:
    """Every file name and byte under `folder`, and every tensor's bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    for name, tensor in state.items():
        digest.update(name.encode() + b"\0" + tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def seeded_resnet18(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SavedResnet18]:
    """Built and saved once (seven modules used to build their own); checked unchanged at the end."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    folder = tmp_path_factory.mktemp("seeded_resnet18")
    saved = SavedResnet18(
        state=state,
        imagenet=folder / "checkpoint.pth.tar",
        plain=folder / "resnet18.pth",
        legacy=folder / "legacy.pth",
        safetensors=folder / "model.safetensors",
    )
    prefixed = {"module." + k: v for k, v in state.items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": prefixed}, saved.imagenet)
    torch.save(state, saved.plain)
    torch.save(state, saved.legacy, _use_new_zipfile_serialization=False)
    save_file(state, saved.safetensors, metadata={"format": "pt"})
    before = _tree_digest(folder, state)
    yield saved
    assert _tree_digest(folder, state) == before, "a test changed the shared resnet18 or wrote beside it"
