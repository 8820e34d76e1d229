"""Names from a file reach terminals and logs escaped, and JSON exactly.

A tensor name, a container key or a file name may hold escape codes (clear the
screen, forge a line), a bidi override, a newline or a lone surrogate (which
cannot be encoded at all). Every report and error line prints them as Python
escapes (`\\x1b`, `\\ud800`) and leaves readable text, CJK included, as it is;
`--json` carries the exact names.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, run_subprocess
from safetensors.torch import save_file

from surgery import open_checkpoint, text
from surgery.commands.inspect import InspectReport
from surgery.render import rows
from surgery.render.reports import page_of

ANSI = "\x1b[2J\x1b[Hconv.weight"  # clear the screen, cursor home
SURROGATE = "w\ud800"  # torch.save writes it, torch.load reads it back
FORGED = "fc.bias\n  safety      ok: nothing but tensors and plain containers"
BIDI = "head.\u202eweight"  # right-to-left override: reads as another name
CJK = "编码器.权重"
HOSTILE = [ANSI, SURROGATE, FORGED, BIDI]
ESCAPED = ["\\x1b[2J\\x1b[Hconv", "w\\ud800", "bias\\n  safety", "\\u202eweight"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """A real torch.save file whose tensor names carry every hostile kind, and one readable CJK name."""
    path = tmp_path_factory.mktemp("names") / "hostile.pt"
    torch.save({name: torch.full((2,), float(i)) for i, name in enumerate([*HOSTILE, CJK])}, path)
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("names") / "plain.safetensors"
    save_file({"fc.weight": torch.ones(2, 2)}, str(path))
    return path


def assert_escaped(text: str) -> None:
    """Nothing without a glyph but newlines; the hostile names shown escaped."""
    assert all(c.isprintable() or c == "\n" for c in text), repr(text)
    for shown in ESCAPED:
        assert shown in text, shown


def test_printable_escapes_only_what_has_no_glyph():
    assert text.printable(CJK) == CJK
    assert text.printable("conv1.weight ünïcode Ω") == "conv1.weight ünïcode Ω"
    assert text.printable(ANSI) == "\\x1b[2J\\x1b[Hconv.weight"
    assert text.printable("a\x00b\tc\u200bd\xa0e\udc80") == "a\\x00b\\tc\\u200bd\\xa0e\\udc80"


@pytest.mark.parametrize("run", [run_cli, run_subprocess])
def test_inspect_prints_hostile_names_escaped(hostile, run):
    result = run("inspect", hostile)
    assert result.exit_code == 0, result.stderr
    assert_escaped(result.stdout)
    assert CJK.split(".")[0] in result.stdout and CJK.split(".")[1] in result.stdout
    assert sum(line.startswith("  safety") for line in result.stdout.splitlines()) == 1


def test_inspect_json_carries_the_exact_names(hostile):
    result = run_subprocess("inspect", hostile, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.isascii()
    assert [t["name"] for t in json.loads(result.stdout)["tensors"]] == [*HOSTILE, CJK]


def test_diff_convert_and_port_reports_print_names_escaped(hostile, plain, tmp_path):
    result = run_cli("diff", hostile, plain, "--structure-only")
    assert result.exit_code == 0, result.stderr
    assert_escaped(result.stdout)
    doc = json.loads(run_subprocess("diff", hostile, plain, "--structure-only", "--json").stdout)
    assert sorted(doc["only_in_a"]) == sorted([*HOSTILE, CJK])

    out = tmp_path / "kept.pt"
    result = run_cli("convert", hostile, "-o", out, "--include", CJK)
    assert result.exit_code == 0, result.stderr
    assert_escaped(result.stdout)  # the left-out names

    result = run_cli("port", hostile, "--to", plain, "--strict", "false", "--min-coverage", "0", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert_escaped(result.stdout)  # the unexpected names


def test_error_lines_print_file_names_escaped(tmp_path):
    path = tmp_path / "bad\x1b[31m\u202e.pt"
    path.write_bytes(b"\x17 not a checkpoint at all")
    for run in (run_cli, run_subprocess):
        result = run("inspect", path)
        assert "\x1b" not in result.stderr and "\u202e" not in result.stderr
        assert_clean_error(result, text.printable(str(path)), code=1)


def test_rich_reports_print_names_escaped_and_never_as_markup(tmp_path):
    from rich.console import Console

    path = tmp_path / "markup.pt"
    state = {name: torch.ones(1) for name in HOSTILE}
    torch.save({"state_dict": state, "[/bold]": 1, "[link=https://example.com]x": 2}, path)
    ckpt = open_checkpoint(path)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    rows.rich(page_of(InspectReport(ckpt)), console)
    rows.rich(rows.Page([("only in A", [*HOSTILE, "[/bold]"])]), console)
    text = out.getvalue()
    assert "\x1b[2J" not in text and "\ud800" not in text and "\u202e" not in text
    assert "[/bold]" in text and "[link=https://example.com]x" in text
    for shown in ESCAPED:
        assert shown in text, shown
