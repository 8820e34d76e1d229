"""The module tree of `surgery inspect`: tensors grouped by dotted prefix, with counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery.names import Node
from surgery.text import human_count, plural, printable

if TYPE_CHECKING:
    from rich.console import Console

    from surgery.formats.checkpoint import TensorInfo


@dataclass
class TreeView:
    """The tree to draw, the tensors at its leaves, and how deep to unfold it."""

    tree: Node
    infos: dict[str, TensorInfo]
    depth: int | None

    def plain(self) -> list[str]:
        if self.depth == 0 or not self.infos:
            return [] if self.infos else ["  (no tensors)"]
        rows = self._rows()
        name_width = max(2 * d + len(label) for d, label, _, _ in rows)
        mid_width = max(len(mid) for _, _, mid, _ in rows)
        return [
            f"  {'  ' * d + label:<{name_width}}  {mid:>{mid_width}}  {last}".rstrip()
            for d, label, mid, last in rows
        ]

    def _rows(self) -> list[tuple[int, str, str, str]]:
        """(depth, label, shape or count, dtype or tensors) rows in display order."""
        rows: list[tuple[int, str, str, str]] = []
        stack: list[tuple[Node, int]] = [(self.tree, 0)]
        while stack:
            node, depth = stack.pop()
            if node is not self.tree:
                rows.append(
                    (depth - 1, printable(node.label), human_count(node.numel), plural(node.count, "tensor"))
                )
                if self.depth is not None and depth >= self.depth:
                    continue
            for name in node.leaves:
                info = self.infos[name]
                leaf = name[len(node.name) + 1 :] if node.name else name
                extra = f" {info.device}" if info.device != "cpu" else ""
                extra += f" ({info.note})" if info.note else ""
                rows.append((depth, printable(leaf), str(list(info.shape)), printable(info.dtype + extra)))
            for child in reversed(list(node.children.values())):
                stack.append((child, depth + 1))
        return rows

    def rich(self, console: Console) -> None:
        from rich.text import Text
        from rich.tree import Tree

        if self.depth == 0 or not self.infos:
            return
        root = Tree(
            Text(f"{human_count(self.tree.numel)} parameters in {self.tree.count} tensors", style="dim"),
            guide_style="dim",
        )
        stack: list[tuple[Node, Tree, int]] = [(self.tree, root, 0)]
        while stack:
            node, branch, depth = stack.pop()
            if node is not self.tree and self.depth is not None and depth >= self.depth:
                continue
            for name in node.leaves:
                info = self.infos[name]
                leaf = name[len(node.name) + 1 :] if node.name else name
                label = Text.assemble(
                    (printable(leaf), "green"),
                    "  ",
                    (str(list(info.shape)), "cyan"),
                    "  ",
                    (info.dtype, "magenta"),
                )
                if info.device != "cpu":
                    label.append(f"  {printable(info.device)}", style="yellow")
                if info.note:
                    label.append(f"  ({printable(info.note)})", style="red")
                branch.add(label)
            for child in node.children.values():
                sub = branch.add(
                    Text.assemble(
                        (printable(child.label), "bold"),
                        "  ",
                        (human_count(child.numel), "yellow"),
                        ("  " + plural(child.count, "tensor"), "dim"),
                    )
                )
                stack.append((child, sub, depth + 1))
        console.print(root)
