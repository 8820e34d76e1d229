"""A reader that goes away (`surgery inspect x | true`, `| head`) ends the command quietly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_closed_pipe_ends_inspect_quietly(tmp_path, extra):
    path = tmp_path / "many.pt"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(3000)}, path)  # > a pipe's 64 KiB
    run = subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; {sys.executable} -m surgery inspect {path} {' '.join(extra)} | true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 141, run  # 128 + SIGPIPE, as `git log | true` ends
    assert run.stderr == "", run.stderr  # no "internal error", no traceback
