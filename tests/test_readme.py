"""The README's console examples are real: each is run and must print exactly what it shows."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli, run_subprocess

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```console\n(.*?)```", README, re.S)


def _examples() -> list[tuple[str, str]]:
    """(commands, expected output) for blocks whose files are in the repository."""
    out = []
    for block in BLOCKS:
        lines = block.splitlines()
        commands = [line[2:] for line in lines if line.startswith("$ ")]
        expected = "\n".join(line for line in lines if not line.startswith("$ ")) + "\n"
        paths = [
            word for cmd in commands for word in shlex.split(cmd) if "/" in word and not word.startswith("-")
        ]
        if paths and all((ROOT / p).exists() for p in paths):
            out.append(("\n".join(commands), expected))
    return out


EXAMPLES = _examples()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_runnable_examples():
    assert len(EXAMPLES) >= 5


def _marks(commands: str) -> list:
    """An example that starts torch in its process (port, convert, diff) takes seconds."""
    return [pytest.mark.slow] if any(f"surgery {c} " in commands for c in ("port", "convert", "diff")) else []


@pytest.mark.parametrize(
    "commands, expected",
    [pytest.param(*e, marks=_marks(e[0]), id=e[0].splitlines()[0][:60]) for e in EXAMPLES],
)
def test_readme_example_prints_what_it_shows(commands, expected):
    """Run as a user's shell would, stderr into the same stream as stdout."""
    script = "exec 2>&1\n" + commands.replace("surgery ", f"{shlex.quote(sys.executable)} -m surgery ")
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}
    )
    assert proc.stdout == expected


def test_readme_python_example_runs(monkeypatch):
    """The API example executes as written, with `your_model` the fixtures' architecture."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    (block,) = [b for b in PYTHON_BLOCKS if "open_checkpoint" in b]
    monkeypatch.chdir(ROOT)
    namespace = {"your_model": fixtures.tiny_net()}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["ckpt"].container == ("state_dict",)


@pytest.fixture
def imagenet_example(tmp_path, monkeypatch, seeded_resnet18):
    """The PyTorch ImageNet example's checkpoint of a seeded resnet18, as checkpoint.pth.tar in the cwd
    (a copy: the examples write beside it)."""
    shutil.copyfile(seeded_resnet18.imagenet, tmp_path / "checkpoint.pth.tar")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_port_example_runs(imagenet_example, capsys):
    """The `surgery.port` example, on the ImageNet example's checkpoint of a seeded resnet18."""
    (block,) = [b for b in PYTHON_BLOCKS if "surgery.port(" in b]
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("loaded 120/122 tensors (99.99% of parameters); mismatched 2: fc.{bias,weight}")


def test_readme_fine_tune_example_and_load_ready_run(imagenet_example):
    """The fixed-feature-extractor command prints what the README shows; its Python continuation runs."""
    block = next(b for b in BLOCKS if "--freeze-bn" in b)
    command, *expected = block.splitlines()
    run = run_cli(*shlex.split(command.removeprefix("$ surgery ")))  # test_port runs `port` as a process
    assert run.exit_code == 0, run.stderr
    assert run.stdout == "\n".join(expected) + "\n"
    (code,) = [b for b in PYTHON_BLOCKS if "load_ready" in b]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert [g["name"] for g in namespace["optimizer"].param_groups] == ["head"]


def test_readme_recipe_file_runs(imagenet_example):
    (toml,) = re.findall(r"```toml\n(.*?)```", README, re.S)
    (imagenet_example / "recipe.toml").write_text(toml)
    run = run_cli("port", "--recipe", "recipe.toml", "--verify")
    assert run.exit_code == 0, run.stderr
    assert "re-read, 122 tensors bit-identical" in run.stdout


TIMES = re.compile(r"in \d+\.\d+ s( \([^)]*/s\))?")


def _steady(text: str) -> str:
    """Timings and rates vary from run to run; everything else must be as shown."""
    return TIMES.sub("in <t> s", text)


@pytest.mark.slow
def test_readme_convert_and_diff_examples_print_what_they_show(imagenet_example, capsys):
    """Run in order on the ImageNet example's checkpoint, the first command of each block as its own
    process and the others in this one; the Python continuation after them."""
    blocks = [b for b in BLOCKS if "$ surgery convert" in b or "$ surgery diff" in b]
    assert len(blocks) == 2
    for block in blocks:
        lines = block.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")] + [len(lines)]
        for start, end in zip(starts, starts[1:], strict=False):
            args = shlex.split(lines[start].removeprefix("$ surgery "))
            run = run_subprocess(*args, cwd=imagenet_example) if start == 0 else run_cli(*args)
            assert run.exit_code == 0, run.stderr
            assert _steady(run.stdout) == _steady("\n".join(lines[start + 1 : end]) + "\n")
    (code,) = [b for b in PYTHON_BLOCKS if "surgery.convert(" in b]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("20 copied as raw bytes; 102 cast")
    assert printed[1] == "differ: 102 other dtype, 20 identical"
    assert namespace["worst"].max_abs > 0
