"""TorchScript module objects as `torch.jit.load` presents them: state apart from other attributes.

A TorchScript archive's data.pkl pickles each module as an object of its `__torch__` class
holding every attribute in one dict: parameters, buffers, submodules, but also `training` and
plain tensors such as silero-vad's `_state` and `_context`, which `state_dict()` leaves out.
Only the class's serialized code says which is which, in declarations that lead each class:

    class Linear(Module):
      __parameters__ = ["weight", "bias", ]
      __buffers__ = []

Those headers are read as text and parsed with `ast.parse` (never compiled to run, never
executed); method bodies are not even parsed. With them each module object is rearranged as an
`nn.Module` keeps its state (`_parameters`, `_buffers`, `_modules`, the rest beside them), so
the readers that find a pickled `nn.Module`'s state_dict find exactly `torch.jit.load(f).state_dict()`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from surgery.formats.pickle_vm import Call, Global

# Real code files are a few KB (a class or two each, mangled copies in files of their own);
# only class headers are parsed, but the whole file is searched for them: past this size a
# file is not read.
MAX_SOURCE = 16 << 20


class UnreadableCode(ValueError):
    """The archive's code does not say what a module object's attributes are."""


@dataclass(frozen=True)
class ScriptClass:
    """What a TorchScript class declares: whether it is a module, and which attributes are state."""

    module: bool
    parameters: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()


def code_file(qualifier: str) -> str:
    """Where an archive keeps the code of a qualifier, as torch's importer looks it up:
    `__torch__.torch.nn.modules.linear` -> `code/__torch__/torch/nn/modules/linear.py`."""
    return "code/" + qualifier.replace(".", "/") + ".py"


def script_classes(source: str) -> dict[str, ScriptClass]:
    """The classes a TorchScript code file declares, by name, read from their headers.

    Only each class's first line and its `__parameters__` and `__buffers__` declarations
    (which torch prints before the first method) are parsed, with `ast.parse`.

    Raises:
        UnreadableCode: a class header that is not Python, or declarations that are not lists of names.
    """
    headers = _class_headers(source)
    try:
        tree = ast.parse("\n".join(headers))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnreadableCode(f"its class headers do not parse ({type(exc).__name__})") from None
    nodes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    if len(nodes) != len(tree.body) or len(nodes) != len(headers):
        raise UnreadableCode("its class headers do not parse as classes")
    return {
        node.name: ScriptClass(
            any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases),
            _names(node, "__parameters__"),
            _names(node, "__buffers__"),
        )
        for node in nodes
    }


_CLASS = re.compile(r"^class ", re.MULTILINE)
_DECLARATIONS = ("__parameters__", "__buffers__")


def _class_headers(source: str) -> list[str]:
    """Each top-level class's first line and its declarations of state (with any lines they
    continue on), up to its first method: the rest, most of a file, is skipped unread."""
    headers = []
    for match in _CLASS.finditer(source):
        start = source.find("\n", match.start())
        start = len(source) if start < 0 else start + 1
        lines = [source[match.start() : start].rstrip()]
        indent, keeping = "", False
        while start < len(source):
            end = source.find("\n", start)
            end = len(source) if end < 0 else end
            line, start = source[start:end].rstrip(), end + 1
            body = line.lstrip()
            if not body:
                continue
            if len(body) == len(line):
                break  # a top-level function or statement: the class is over
            here = line[: len(line) - len(body)]
            indent = indent or here
            if here == indent:
                if body.startswith(("def ", "@")):
                    break  # its methods are not needed
                keeping = body.startswith(_DECLARATIONS)
            if keeping:
                lines.append(line)
        headers.append("\n".join(lines if len(lines) > 1 else [*lines, "  pass"]))
    return headers


def _names(node: ast.ClassDef, declaration: str) -> tuple[str, ...]:
    """The names a `__parameters__ = [...]` (or `__buffers__`) declaration lists; () without one."""
    for statement in node.body:
        if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
            continue
        target = statement.targets[0]
        if isinstance(target, ast.Name) and target.id == declaration:
            value = statement.value
            if isinstance(value, (ast.List, ast.Tuple)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts
            ):
                return tuple(e.value for e in value.elts)  # type: ignore[attr-defined]
            raise UnreadableCode(f"{node.name}.{declaration} is not a list of names")
    return ()


def is_script_object(value: Any) -> bool:
    """An object of a TorchScript class (`__torch__.…`) with its attributes in a dict."""
    return (
        isinstance(value, Call)
        and isinstance(value.func, Global)
        and (value.func.module == "__torch__" or value.func.module.startswith("__torch__."))
        and type(value.state) is dict
    )


def as_modules(root: Any, source: Callable[[str], str]) -> Any:
    """`root` with each TorchScript module object rearranged as an `nn.Module` keeps its state.

    Every module object reachable from `root` through its submodules becomes a new record
    whose state is `{<other attributes>, "_parameters": …, "_buffers": …, "_modules": …}`,
    in the order of the pickled attributes (torch's slot order, which `state_dict()` follows).
    Nothing is changed in place; a root that is not a script module comes back as it is.

    Args:
        root: what data.pkl built.
        source: the text of the code file for a qualifier (`__torch__.torch.nn.modules.linear`),
            raising `UnreadableCode` when the archive has none that can be read.

    Raises:
        UnreadableCode: the code of a module object's class is missing or does not parse.
    """
    files: dict[str, dict[str, ScriptClass]] = {}

    def declared(call: Call) -> ScriptClass:
        where: Global = call.func
        if where.module not in files:
            text = source(where.module)
            try:
                files[where.module] = script_classes(text)
            except UnreadableCode as exc:
                raise UnreadableCode(f"{code_file(where.module)}: {exc}") from None
        found = files[where.module].get(where.name)
        if found is None:
            raise UnreadableCode(f"{code_file(where.module)} does not declare class {where.name}")
        return found

    if not is_script_object(root) or not declared(root).module:
        return root
    copies: dict[int, Call] = {}
    found: list[tuple[Call, ScriptClass]] = []
    stack = [root]
    while stack:
        call = stack.pop()
        if id(call) in copies:
            continue
        copies[id(call)] = Call(call.func, call.args, call.kwargs, call.offset)
        found.append((call, declared(call)))
        stack.extend(v for v in call.state.values() if is_script_object(v) and declared(v).module)
    for call, script_class in found:
        copies[id(call)].state = _arranged(call.state, script_class, copies)
    return copies[id(root)]


def _arranged(state: dict, script_class: ScriptClass, copies: dict[int, Call]) -> dict:
    parameters = {k: v for k, v in state.items() if k in script_class.parameters}
    buffers = {k: v for k, v in state.items() if k in script_class.buffers and k not in parameters}
    modules = {
        k: copies[id(v)]
        for k, v in state.items()
        if isinstance(v, Call) and id(v) in copies and k not in parameters and k not in buffers
    }
    others = {k: v for k, v in state.items() if k not in parameters and k not in buffers and k not in modules}
    return {**others, "_parameters": parameters, "_buffers": buffers, "_modules": modules}
