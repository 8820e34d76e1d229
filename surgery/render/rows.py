"""One renderer for every report: rows of (label, lines), a title, a tree after them.

A row whose label is None holds notes under the row before it (inspect's findings):
indented in plain text, coloured by their leading severity on a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from surgery.text import printable

if TYPE_CHECKING:
    from rich.console import Console

    from surgery.render.tree import TreeView

Row = tuple["str | None", list[str]]
MAX_LISTED = 20
# Labels drawn as warnings when they hold anything but "none".
WARNING_LABELS = ("mismatched", "missing", "unexpected", "only in A", "only in B", "differ", "dropped")
# Labels coloured by what they say: severities of findings, verdicts of scan.
STYLES = {
    "danger": "bold red",
    "unsafe": "red",
    "corrupt": "magenta",
    "error": "magenta",
    "notice": "yellow",
    "safe": "green",
    "skipped": "dim",
}


@dataclass
class Page:
    """What one command shows: an optional title, the rows, an optional module tree."""

    rows: list[Row]
    title: str | None = None
    tree: TreeView | None = field(default=None)


def capped(lines: list[str], per_line: int = 1) -> list[str]:
    """Long lists cut at MAX_LISTED lines with "... and N more"; `per_line` items joined per line."""
    if per_line > 1:
        lines = [", ".join(lines[i : i + per_line]) for i in range(0, len(lines), per_line)]
    if len(lines) > MAX_LISTED:
        return [*lines[:MAX_LISTED], f"... and {len(lines) - MAX_LISTED} more"]
    return lines


def plain(page: Page) -> str:
    """Label and value columns, stable for logs and tests; every name escaped."""
    lines = [printable(page.title)] if page.title is not None else []
    width = max((len(label) for label, _ in page.rows if label is not None), default=0)
    for label, values in page.rows:
        for i, value in enumerate(values):
            if label is None:
                lines.append(f"    {printable(value)}")
            else:
                lines.append(f"  {(label if i == 0 else ''):<{width}}  {printable(value)}")
    if page.tree is not None:
        lines.append("")
        lines.extend(page.tree.plain())
    return "\n".join(lines) + "\n"


def rich(page: Page, console: Console) -> None:
    """The same rows as a grid with colours; names are `Text`, never read as markup."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for label, values in page.rows:
        if label is None:
            for value in values:
                severity, _, rest = value.partition(": ")
                grid.add_row("", Text.assemble((f"{severity}: ", STYLES.get(severity, "")), printable(rest)))
            continue
        grid.add_row(label, Text("\n".join(map(printable, values)), style=_style(label, values)))
    if page.title is not None:
        console.print(Text(printable(page.title), style="bold"))
    console.print(grid)
    if page.tree is not None:
        page.tree.rich(console)


def _style(label: str, values: list[str]) -> str:
    if label == "summary":
        return "bold"
    if label == "safety":
        return "green" if values and values[0].startswith("ok") else "bold red"
    if label in STYLES:
        return STYLES[label]
    return "yellow" if label in WARNING_LABELS and values != ["none"] else ""
