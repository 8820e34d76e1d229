"""A write interrupted by a signal leaves nothing behind; what a killed run left, the next removes.

Real `python -m surgery convert` processes are signalled while their temporary output
exists: a cast to bf16 imports torch (over a second) and converts 64 MB after the
temporary file is created, so the signal lands mid-write.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgery
from surgery.writers import outputs as writer

TEMP = re.compile(r"\..+\.surgery-[0-9a-f]{8}-(\d+)-[a-z0-9_]{8}\.tmp")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signals") / "big.pt"
    torch.save({f"layer{i}.weight": torch.randn(1 << 20) for i in range(16)}, path)  # 64 MiB
    return path


def start_convert(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "surgery", "convert", str(source), "-o", str(out), "--dtype", "bf16", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_temp(proc: subprocess.Popen, out: Path) -> Path:
    """The temporary output (`.NAME.<anything>.tmp` beside it), as soon as the process has made it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.suffix == ".tmp"]
        if temps:
            return temps[0]
        assert proc.poll() is None, f"finished before writing: {proc.communicate()}"
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no temporary output appeared")


@pytest.mark.parametrize(
    "name, extra", [("o.safetensors", ()), ("o.pt", ()), ("shards", ("--shard-size", "16MB"))]
)
def test_sigterm_mid_write_removes_the_temporary_output(source, tmp_path, name, extra):
    before = source.read_bytes()
    proc = start_convert(source, tmp_path / name, *extra)
    temp = wait_for_temp(proc, tmp_path / name)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert list(tmp_path.iterdir()) == []
    assert proc.returncode == -signal.SIGTERM, stderr  # killed by the signal again, after cleaning up
    assert b"Traceback" not in stderr, stderr.decode()
    assert source.read_bytes() == before
    match = TEMP.fullmatch(temp.name)
    assert match and int(match[1]) == proc.pid, temp.name


def test_sigkill_leftover_is_removed_by_the_next_write(source, tmp_path):
    proc = start_convert(source, tmp_path / "o.safetensors")
    stale = wait_for_temp(proc, tmp_path / "o.safetensors")
    proc.kill()
    proc.wait()
    assert stale.exists(), "SIGKILL cannot be cleaned up after: the temporary file stays"
    live = stale.with_name(stale.name.replace(f"-{proc.pid}-", f"-{os.getpid()}-"))
    live.write_bytes(b"a write of a running process")
    other_host = tmp_path / f".o.safetensors.surgery-00000000-{proc.pid}-abcdefgh.tmp"
    other_host.write_bytes(b"a write of a process on another machine")
    not_ours = [tmp_path / ".o.safetensors.abcdefgh.tmp", tmp_path / f"notes-{proc.pid}.tmp"]
    for path in not_ours:
        path.write_bytes(b"not surgery's")
    stale_folder = tmp_path / f".shards.surgery-{writer._HOST}-{proc.pid}-zyxwvuts.tmp"
    stale_folder.mkdir()
    (stale_folder / "model-00001-of-00002.safetensors").write_bytes(b"half")

    small = tmp_path / "small.pt"
    torch.save({"w": torch.ones(2)}, small)
    surgery.convert(small, tmp_path / "p.safetensors")

    assert not stale.exists() and not stale_folder.exists()
    assert live.exists() and other_host.exists() and all(p.exists() for p in not_ours)
    assert torch.equal(load_file(tmp_path / "p.safetensors")["w"], torch.ones(2))


def test_sigterm_handler_is_restored_after_a_write(tmp_path):
    small = tmp_path / "small.pt"
    torch.save({"w": torch.ones(2)}, small)
    before = signal.getsignal(signal.SIGTERM)
    surgery.convert(small, tmp_path / "o.safetensors")
    surgery.convert(small, tmp_path / "shards", shard_size="1KB")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_program_with_its_own_sigterm_handler_still_gets_the_signal(source, tmp_path):
    """surgery.convert in a program that handles SIGTERM itself: the temporary output goes,
    then the program's handler runs."""
    script = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        from pathlib import Path
        import surgery

        def handler(signum, frame):
            print("own handler ran", flush=True)
            sys.exit(7)

        signal.signal(signal.SIGTERM, handler)
        out = Path(sys.argv[2])

        def terminate_once_writing():
            while not any(p.name.startswith(f".{out.name}.surgery-") for p in out.parent.iterdir()):
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=terminate_once_writing, daemon=True).start()
        surgery.convert(sys.argv[1], out, dtype="bf16")
        print("finished without the signal", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(source), str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 7 and proc.stdout == "own handler ran\n", proc
    assert list(tmp_path.iterdir()) == []
