"""Start-up: what `surgery --help` and `surgery inspect` import, and the Typer-free inspect path.

No timing here (bench/bench_inspect.py measures): these tests pin down the structure that
keeps start-up short. A plain `surgery inspect` runs without Typer (`surgery.cli.fast`), so
its reader of command lines must give exactly what click gives, or leave the line to Typer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main
from conftest import FIXTURES, run_subprocess
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from surgery.cli import app, fast, typer_app
from surgery.cli.options import INSPECT

HEAVY = ("torch", "numpy", "rich", "typer", "click")


def modules_after(*args: str) -> dict:
    """Run `surgery ARGS` as the console script does in a fresh interpreter; which heavy
    packages it imported, its exit code and its stdout."""
    code = (
        "import io, json, sys, contextlib\n"
        f"sys.argv = ['surgery', *{list(args)!r}]\n"
        "out = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        from surgery.cli import run\n"
        "        run()\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})\n"
        "print(json.dumps({'heavy': heavy, 'exit': code, 'stdout': out.getvalue()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_imports_no_torch_numpy_or_rich():
    run = modules_after("--help")
    assert run["exit"] == 0 and "inspect" in run["stdout"]
    assert not {"torch", "numpy", "rich"} & set(run["heavy"]), run["heavy"]


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", str(FIXTURES / "imagenet_example.pth.tar"), "--json"),
        ("inspect", str(FIXTURES / "tiny.safetensors"), "--json"),
        ("inspect", str(FIXTURES / "legacy.pth"), "--depth", "1"),
        ("inspect", str(FIXTURES / "numpy_extras.pth"), "--json"),  # numpy arrays, read as data: exit 1
    ],
)
def test_plain_inspect_imports_no_torch_numpy_rich_or_typer(args):
    run = modules_after(*args)
    assert run["exit"] in (0, 1) and run["stdout"]
    assert run["heavy"] == [], run["heavy"]


def test_importing_the_cli_imports_no_typer():
    code = (
        "import sys, surgery.cli; print(sorted(m for m in sys.modules if m.startswith(('typer', 'click'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_inspect_is_built_from_the_records_the_fast_path_reads():
    """commands.inspect's parameters are options.INSPECT's, in order, with the same flags."""
    group = typer.main.get_command(typer_app.app_for(["inspect"]))
    params = group.commands["inspect"].params
    assert [p.name for p in params] == list(INSPECT)
    for p in params:
        assert tuple(p.opts) == (INSPECT[p.name].flags or (p.name,)), p.name
        assert p.multiple == INSPECT[p.name].many, p.name


# The command lines both ways must agree on: fixtures, and the forms each path reads.
SAME_EITHER_WAY = [
    ("imagenet_example.pth.tar",),
    ("imagenet_example.pth.tar", "--json"),
    ("--json", "ema.pth", "--key", "model_ema", "-f", "fc", "--filter=bn1", "-d", "1"),
    ("legacy.pth", "--depth", "0", "--verify"),
    ("sharded_safetensors", "-d", "1"),
    ("payload_os_system.pth", "--json"),  # not safe: exit 1 and the finding on stderr
    ("payload_os_system.pth", "-d", "1"),
    ("tied.pth", "--key", "nope"),  # a library error
    ("no_such_file.pth",),
    ("tied.pth", "-d", "-1"),  # left to Typer: click says what is wrong
    ("tied.pth", "--jso"),
    ("tied.pth", "tied.pth"),
    ("tied.pth", "--help"),
]


@pytest.mark.parametrize("args", SAME_EITHER_WAY)
def test_inspect_says_the_same_with_and_without_typer(args, monkeypatch):
    """`python -m surgery inspect` (fast path where it reads the line) and Typer's command
    in-process write the same bytes and exit alike."""
    monkeypatch.chdir(FIXTURES)
    typer_way = CliRunner().invoke(app, ["inspect", *args], prog_name="surgery")
    process = run_subprocess("inspect", *args, cwd=FIXTURES)
    assert (process.exit_code, process.stdout, process.stderr) == (
        typer_way.exit_code,
        typer_way.stdout,
        typer_way.stderr,
    )


def test_the_fast_path_reads_the_plain_lines():
    """Not vacuous: the usual command lines are read here, not left to Typer."""
    for args in SAME_EITHER_WAY[:8]:
        assert fast.parse(list(args), INSPECT) is not None, args
    for args in SAME_EITHER_WAY[-4:]:
        assert fast.parse(list(args), INSPECT) is None, args


def typer_params(args: list[str]) -> dict | None:
    """The parameters Typer hands `surgery inspect ARGS`, or None when it refuses the line."""
    seen: list[dict] = []

    def record(command, params):
        seen.append(params)
        return 0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer_app, "outcome", record)
        result = CliRunner().invoke(app, ["inspect", *args])
    return seen[0] if result.exit_code == 0 and seen else None


FLAGS = {flag: opt for opt in INSPECT.values() for flag in opt.flags}
WORDS = [
    "a.pth",
    "x",
    "model_ema",
    "layer1.*",
    "0",
    "1",
    "01",
    "",
    "=",
    "-",
    "-x",
    "--",
    " 2",
    "1_0",
    "\u0663",
]


def occurrence(flag: str) -> st.SearchStrategy[list[str]]:
    """One valid use of `flag`: alone (on/off), or with a value in the next word or after `=`."""
    opt = FLAGS[flag]
    if opt.value is bool:
        return st.just([flag])
    values = st.sampled_from(["0", "1", "01", "12"] if opt.value is int else WORDS[:9])
    forms = (lambda v: [[flag, v], [f"{flag}={v}"]]) if flag.startswith("--") else (lambda v: [[flag, v]])
    return values.flatmap(lambda v: st.sampled_from(forms(v)))


# Lines a user types: one PATH among valid options, in any order.
PLAIN_LINES = st.builds(
    lambda path, uses, at: (
        [w for use in uses[:at] for w in use] + [path] + [w for use in uses[at:] for w in use]
    ),
    st.sampled_from(WORDS[:4]),
    st.lists(st.sampled_from(sorted(FLAGS)).flatmap(occurrence), max_size=6),
    st.integers(0, 6),
)
# Anything made of the same words, flags and near misses.
ANY_LINES = st.lists(
    st.one_of(
        st.sampled_from(sorted(FLAGS)),
        st.sampled_from(WORDS),
        st.builds(lambda f, w: f"{f}={w}", st.sampled_from(sorted(FLAGS)), st.sampled_from(WORDS)),
        st.builds(
            lambda f, w: f + w, st.sampled_from([f for f in FLAGS if len(f) == 2]), st.sampled_from(WORDS)
        ),
        st.sampled_from(["--help", "-h", "--jso", "--depth=", "-dk", "-fk"]),
    ),
    max_size=7,
)


@settings(max_examples=200, deadline=None)
@given(PLAIN_LINES)
def test_the_fast_path_reads_plain_lines_as_click_does(args):
    read = fast.parse(args, INSPECT)
    assert read is not None, args
    assert read == typer_params(args)


@settings(max_examples=300, deadline=None)
@given(ANY_LINES)
def test_the_fast_path_reads_any_line_as_click_does_or_leaves_it(args):
    read = fast.parse(args, INSPECT)
    if read is not None:
        assert read == typer_params(args)
