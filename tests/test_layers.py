"""The package's layers: every import goes down the flow, and no module imports itself back.

    leaves     errors, dtypes, values, names, text, trust     shared values and words
    formats    bytes -> entries, findings; writers            files in and out
    plans      names and shapes -> plans                      pure: no files, no tensors
    models     plans -> modules                               targets, edits, loading, fine-tune
    commands   requests -> reports                            one module per command
    render     reports -> text                                 plain, rich, JSON
    cli        flags -> requests, reports -> the terminal

A module may import its own layer or any below it, never above; imports inside
functions count too (they are the same dependency, only later). Module-level imports
must form no cycle. The test reads the source with `ast`: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"

LAYERS = {
    "surgery.errors": 0,
    "surgery.dtypes": 0,
    "surgery.values": 0,
    "surgery.names": 0,
    "surgery.text": 0,
    "surgery.trust": 0,
    "surgery.casts": 0,
    "surgery.formats": 1,
    "surgery.writers": 1,
    "surgery.plans": 2,
    "surgery.models": 3,
    "surgery.frozen_bn": 3,  # stays where pickled models name it
    "surgery.commands": 4,
    "surgery.render": 5,
    "surgery.cli": 6,
    "surgery": 7,  # the package's own __init__ and __main__: the public calls
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported surgery module, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body} | {
        id(n) for node in tree.body if isinstance(node, ast.If) for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from surgery.formats import pickle_vm` imports the submodule when there is one
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        found += [(n, id(node) in top) for n in names if n == "surgery" or n.startswith("surgery.")]
    return found


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for target, _ in imports(MODULES[module])
        if target != "surgery" and layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_module_level_imports_form_no_cycle():
    graph = {
        m: sorted({t for t, top in imports(p) if top and t in MODULES and t != m}) for m, p in MODULES.items()
    }
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if state.get(nxt) is None and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :]))
