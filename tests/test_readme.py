"""The examples of README.md and of every docs/ page are real: each is run and must show what it shows.

The pages are read in the site's order, as one reader following them would, in one shared
folder (the repository's fixtures/ beside the files the pages name: the ImageNet example's
`checkpoint.pth.tar`, a training `checkpoint.pth`, ...), so a page may use what an earlier
one wrote. A block that several pages show is run once.

- `console`: each block runs as a user's shell would (stderr into the same stream), and
  prints exactly what it shows; timings and rates (`in 1.61 s (27.7 MiB/s)`) may differ. Each
  `surgery` command is a process of its own, forked from one that imported torch already
  (forked.py: the same process from the step after the imports, minutes less over the pages).
- `python`: each block runs as written; a bare expression or a `print(...)` with a comment
  after it must show that comment (its repr, or what it prints; `...` stands for anything).
- `toml`: the file named on its first line (`# recipe.toml`), for the console blocks after it.

Commands shown only to be read (set-up, CI) go in `bash` or `yaml` blocks, which are not run.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import io
import os
import re
import shutil
import subprocess
import tokenize
import traceback
from collections.abc import Iterator
from pathlib import Path

import forked
import pytest
from doc_pages import (
    PAGES,
    ROOT,
    download_mistakes,
    fenced,
    imagenet_checkpoint,
    make_fixtures,
    unsafe_training_checkpoint,
)

RUN = ("console", "python", "toml")
TIMES = re.compile(r"in \d+\.\d+ s( \([^)]*/s\))?")
# --check's float differences: their last digits depend on the CPU's vector instructions
CHECKED = re.compile(r"(max abs|max rel) [0-9.e+-]+")


def steady(text: str) -> str:
    """Timings, rates and --check's float differences vary; everything else must be as shown."""
    return CHECKED.sub(r"\1 <x>", TIMES.sub("in <t> s", text))


def shows(expected: str, actual: str) -> bool:
    """`actual` is what `expected` shows, `...` standing for anything."""
    return re.fullmatch(".*".join(map(re.escape, expected.split("..."))), actual, re.S) is not None


class Tour:
    """One folder the pages' examples run in, and what each distinct block gave (None: as shown)."""

    def __init__(self, folder: Path, env: dict[str, str], surgery: str):
        self.folder = folder
        self.env = env
        self.surgery = surgery  # the command line that runs `surgery`
        self.results: dict[tuple[str, str], str | None] = {}
        self.pages_done: set[Path] = set()

    def through(self, page: Path) -> list[str]:
        """Run every page up to `page` (once each); the failures of `page`'s own blocks."""
        for earlier in PAGES[: PAGES.index(page) + 1]:
            if earlier not in self.pages_done:
                for block in fenced(earlier):
                    if block[0] in RUN and block not in self.results:
                        self.results[block] = self.run(earlier, *block)
                self.pages_done.add(earlier)
        return [
            f"{page.relative_to(ROOT)}, {lang} block:\n{text}\n{self.results[(lang, text)]}"
            for lang, text in fenced(page)
            if lang in RUN and self.results[(lang, text)] is not None
        ]

    def run(self, page: Path, lang: str, text: str) -> str | None:
        if lang == "console":
            return self.console(text)
        if lang == "toml":
            name = re.fullmatch(r"# (\S+)", text.splitlines()[0])
            if name is None:
                return "a toml block names its file on its first line: # recipe.toml"
            (self.folder / name[1]).write_text(text)
            return None
        return self.python(page, text)

    def console(self, block: str) -> str | None:
        lines = block.splitlines()
        commands = "\n".join(line[2:] for line in lines if line.startswith("$ "))
        expected = "\n".join(line for line in lines if not line.startswith("$ ")) + "\n"
        script = "exec 2>&1\n" + re.sub(r"^surgery ", f"{self.surgery} ", commands, flags=re.M)
        proc = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, cwd=self.folder, env=self.env
        )
        if steady(proc.stdout) == steady(expected):
            return None
        return "".join(
            difflib.unified_diff(expected.splitlines(True), proc.stdout.splitlines(True), "shown", "run")
        )

    def python(self, page: Path, code: str) -> str | None:
        comments = {
            tok.start[0]: tok.string.removeprefix("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(code).readline)
            if tok.type == tokenize.COMMENT
        }
        namespace: dict = {"your_model": make_fixtures().tiny_net()}
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            for statement in ast.parse(code).body:
                shown = comments.get(statement.end_lineno) if isinstance(statement, ast.Expr) else None
                actual = self.statement(page, statement, namespace, printing=shown is not None)
                if shown is not None and not shows(shown, actual):
                    return f"line {statement.end_lineno}: shows {shown!r}, gave {actual!r}"
        except Exception:
            return traceback.format_exc(limit=-3)
        finally:
            os.chdir(cwd)
        return None

    @staticmethod
    def statement(page: Path, statement: ast.stmt, namespace: dict, *, printing: bool) -> str:
        """Run one statement; with `printing`, what it prints, or the repr of its value."""
        name = f"{page.relative_to(ROOT)}, python block"
        if not printing:
            exec(compile(ast.Module([statement], []), name, "exec"), namespace)
            return ""
        call = statement.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(ast.Module([statement], []), name, "exec"), namespace)
            return out.getvalue().removesuffix("\n")
        return repr(eval(compile(ast.Expression(call), name, "eval"), namespace))


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Iterator[Tour]:
    folder = tmp_path_factory.mktemp("tour")
    # The fixtures as committed: other tests import make_fixtures, leaving a __pycache__ beside it.
    shutil.copytree(ROOT / "fixtures", folder / "fixtures", ignore=shutil.ignore_patterns("__pycache__"))
    imagenet_checkpoint(folder)
    unsafe_training_checkpoint(folder)
    download_mistakes(folder)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),  # this checkout's surgery, whatever the folder
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the fixtures a later scan walks
        "HOME": str(folder),
    }
    with forked.server(env, folder) as surgery:
        yield Tour(folder, env, surgery)


def test_the_pages_have_examples_to_run():
    counts = {p.name: sum(lang in RUN for lang, _ in fenced(p)) for p in PAGES}
    assert counts["README.md"] >= 7, counts


@pytest.mark.slow  # every example command runs as a process
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_show_what_they_print(tour, page):
    failures = tour.through(page)
    assert not failures, "\n\n".join(failures)
