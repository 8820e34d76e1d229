"""Finding the state_dict inside whatever object a checkpoint pickled.

Training scripts save `{'epoch': 90, 'state_dict': {...}, 'optimizer': {...}}`,
Lightning nests under `state_dict`, YOLO-style files pickle a whole module under
`model`, TorchScript archives pickle module objects. These functions walk the
stand-in tree the pickle machine built: iteratively, each container once, to a
bounded depth, so a self-referencing or absurdly deep pickle costs nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from surgery.formats.pickle_vm import Call, Global
from surgery.formats.torch_pickle import TensorRef, is_module_state

MAX_DEPTH = 64  # module nesting in real models stays far below this
SEARCH_DEPTH = 6  # how deep a state_dict is looked for inside a training checkpoint
MODULE_STATE = ("_parameters", "_buffers", "_modules")  # what a module's state_dict() is made of

# Where training code puts the weights, most specific first (timm, Lightning,
# the PyTorch ImageNet example, DeepSpeed, detectron2, mmengine, YOLO, GANs).
PREFERRED_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "params",
    "weights",
    "generator",
    "state_dict_ema",
    "model_ema",
    "ema",
    "ema_state_dict",
    "g_ema",
)

# Training state saved beside the weights: never where the state_dict is.
TRAINING_STATE_KEYS = frozenset(
    """optimizer optimizers optimizer_states optimizer_state_dict optim lr_scheduler
    lr_schedulers scheduler schedulers scaler grad_scaler amp callbacks loops""".split()
)


def children(node: Any) -> list[tuple[str, Any]] | None:
    """The named members of a container stand-in, or None for a leaf.

    A pickled `nn.Module` contributes its `_parameters`, persistent `_buffers` and
    `_modules`, the names its `state_dict()` would use (TorchScript modules are read in
    that shape, see `torchscript.as_modules`); another object its attributes.
    """
    if type(node) is dict:
        return [(_key(k), v) for k, v in node.items()]
    if type(node) in (list, tuple):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, Call):
        state = _state(node)
        out: list[tuple[str, Any]] = []
        if type(state) is dict:
            if is_module_state(state):
                hidden = _non_persistent(state)
                for part in MODULE_STATE:
                    sub = state.get(part)
                    if type(sub) is dict:
                        out.extend(
                            (_key(k), v)
                            for k, v in sub.items()
                            if v is not None and not (part == "_buffers" and k in hidden)
                        )
            else:
                out.extend((_key(k), v) for k, v in state.items())
        out.extend((_key(k), v) for k, v in node.entries)
        out.extend((str(i), v) for i, v in enumerate(node.items))
        return out
    return None


def _state(node: Call) -> Any:
    """What BUILD gave an object; a `(dict, slots)` pair as one dict."""
    state = node.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
        state = {**(state[0] or {}), **(state[1] if isinstance(state[1], dict) else {})}
    return state


def _non_persistent(state: dict) -> set | frozenset:
    """Buffers registered with `persistent=False`: kept by the module, left out of its state_dict."""
    names = state.get("_non_persistent_buffers_set")
    return names if isinstance(names, (set, frozenset)) else frozenset()


def module_attributes(node: Any) -> list[tuple[str, TensorRef]]:
    """Tensors that modules under `node` hold outside their state_dict, with dotted names.

    `state_dict()` has a module's parameters, persistent buffers and submodules; a tensor kept
    as a plain attribute (silero-vad's TorchScript `_state`, a list of anchor grids) or a
    buffer registered with `persistent=False` is not in it.
    """
    found: list[tuple[str, TensorRef]] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("", node, 0)]
    while stack:
        prefix, module, depth = stack.pop()
        state = _state(module) if isinstance(module, Call) else None
        if not is_module_state(state) or id(module) in seen or depth >= MAX_DEPTH:
            continue
        seen.add(id(module))
        for key, value in state.items():
            if isinstance(value, TensorRef):
                found.append((prefix + _key(key), value))
            elif key not in MODULE_STATE and is_container(value):
                found.extend(flatten(value, prefix + _key(key))[0])
        buffers = state.get("_buffers")
        if type(buffers) is dict:
            hidden = _non_persistent(state)
            found.extend(
                (prefix + _key(k), v) for k, v in buffers.items() if k in hidden and isinstance(v, TensorRef)
            )
        submodules = state.get("_modules")
        if type(submodules) is dict:
            stack.extend((f"{prefix}{_key(k)}.", m, depth + 1) for k, m in reversed(submodules.items()))
    return found


def is_container(node: Any) -> bool:
    """Whether `children` would list members (cheap: builds nothing)."""
    return type(node) in (dict, list, tuple) or isinstance(node, Call)


def _key(key: Any) -> str:
    return (
        key if isinstance(key, str) else str(key) if isinstance(key, (int, float, bool)) else repr(key)[:40]
    )


def is_module(node: Any) -> bool:
    """A pickled nn.Module or a TorchScript module object."""
    if not isinstance(node, Call):
        return False
    state = node.state
    if is_module_state(state):
        return True
    func = node.func
    return isinstance(func, Global) and func.module.startswith("__torch__") and type(state) is dict


def is_state_dict(node: Any, counts: TensorCounts) -> bool:
    """A str-keyed dict whose values are mostly tensors and that nests no other weights.

    `{'model': {...}, 'ema_decay': tensor}` is half tensors but not a state_dict:
    the weights are under `model`.
    """
    if type(node) is not dict or not node or not all(isinstance(k, str) for k in node):
        return False
    tensors = sum(isinstance(v, TensorRef) for v in node.values())
    if tensors == 0 or 2 * tensors < len(node):
        return False
    return not any(is_container(v) and counts(v) for v in node.values())


def flatten(node: Any, prefix: str = "") -> tuple[list[tuple[str, TensorRef]], list[tuple[str, Any]], bool]:
    """Every tensor under `node` with its dotted name, in order, and the other leaves.

    Returns:
        (tensors, other leaves, truncated): leaves inside module objects are
        left out; truncated is True when MAX_DEPTH cut the walk short.
    """
    tensors: list[tuple[str, TensorRef]] = []
    leaves: list[tuple[str, Any]] = []
    seen: set[int] = set()
    truncated = False
    # Attributes of module objects (`training`, `padding`) are not entries of the
    # state_dict: only leaves of plain containers are reported.
    stack: list[tuple[str, Any, int, bool]] = [(prefix, node, 0, False)]
    while stack:
        name, value, depth, in_module = stack.pop()
        if isinstance(value, TensorRef):
            tensors.append((name, value))
            continue
        if not is_container(value):
            if not in_module:
                leaves.append((name, value))
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        kids = children(value) or []
        if depth >= MAX_DEPTH:
            truncated = True
            continue
        inside = in_module or isinstance(value, Call)
        for key, child in reversed(kids):
            stack.append((f"{name}.{key}" if name else key, child, depth + 1, inside))
    return tensors, leaves, truncated


class TensorCounts:
    """Tensors under each node, each node computed once.

    A pickle can hang one big list under thousands of dicts; walking it again
    for every dict would take their product. Here each node is counted once,
    from its children's counts (shared subtrees count for each parent, cycles
    for none), in one iterative post-order pass.
    """

    CAP = 10**12

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps ids stable while memoized

    def __call__(self, node: Any) -> int:
        if isinstance(node, TensorRef):
            return 1
        if id(node) not in self.memo:
            self._fill(node)
        return self.memo[id(node)]

    def _fill(self, node: Any) -> None:
        in_progress: set[int] = set()
        stack: list[tuple[Any, bool]] = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            key = id(current)
            if not expanded and (key in self.memo or key in in_progress):
                continue  # done, or an ancestor: a cycle adds nothing
            kids = children(current) or ()
            if expanded:
                total = sum(1 if isinstance(c, TensorRef) else self.memo.get(id(c), 0) for _, c in kids)
                self.memo[key] = min(total, self.CAP)
                in_progress.discard(key)
                continue
            in_progress.add(key)
            self._alive.append(current)
            stack.append((current, True))
            stack.extend(
                (c, False) for _, c in kids if not isinstance(c, TensorRef) and id(c) not in self.memo
            )


@dataclass
class Located:
    """Where the state_dict sits and what else is there."""

    path: tuple[str, ...] | None  # None: no state_dict anywhere
    node: Any
    counts: TensorCounts
    candidates: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    siblings: list[tuple[str, Any]] = field(default_factory=list)  # entries beside the path


def candidates(root: Any, counts: TensorCounts) -> list[tuple[tuple[str, ...], Any]]:
    """Every state_dict-like node, breadth first, not looking inside one."""
    found: list[tuple[tuple[str, ...], Any]] = []
    seen: set[int] = set()
    queue: deque[tuple[tuple[str, ...], Any]] = deque([((), root)])
    while queue:
        path, node = queue.popleft()
        if id(node) in seen or isinstance(node, TensorRef):
            continue
        seen.add(id(node))
        if is_state_dict(node, counts) or is_module(node):
            found.append((path, node))
            continue
        if len(path) >= SEARCH_DEPTH:
            continue
        # Optimizer state is keyed by parameter index: not where weights live.
        if type(node) is dict and not all(isinstance(k, str) for k in node):
            continue
        kids = children(node)
        if kids:
            queue.extend(((*path, key), child) for key, child in kids if key not in TRAINING_STATE_KEYS)
    return found


def resolve(root: Any, path: tuple[str, ...]) -> Any:
    """The node at `path` (member names as `children` gives them), or KeyError."""
    node = root
    for part in path:
        kids = children(node)
        match = [child for key, child in kids or () if key == part]
        if not match:
            raise KeyError(part)
        node = match[0]
    return node


def locate(root: Any, key: tuple[str, ...] | None = None) -> Located:
    """Pick the state_dict: the given key, the top level, a preferred key, or the largest.

    Raises:
        KeyError: `key` names nothing in the tree.
    """
    tensor_counts = TensorCounts()
    found = candidates(root, tensor_counts)
    counts = [(path, tensor_counts(node)) for path, node in found]
    if key is not None:
        path, node = key, resolve(root, key)
    elif isinstance(root, TensorRef):
        path, node = (), {"tensor": root}
    elif found and found[0][0] == ():
        path, node = found[0]
    else:
        path, node = _preferred(root, found, tensor_counts) or _largest(found, counts) or (None, None)
    return Located(path, node, tensor_counts, counts, _siblings(root, path or ()))


def _preferred(
    root: Any, found: list[tuple[tuple[str, ...], Any]], counts: TensorCounts
) -> tuple[tuple[str, ...], Any] | None:
    if type(root) is not dict:
        return None
    for name in PREFERRED_KEYS:
        under = [(p, n) for p, n in found if p and p[0] == name]
        if under:
            return max(under, key=lambda item: counts(item[1]))
    return None


def _largest(found, counts) -> tuple[tuple[str, ...], Any] | None:
    if not found:
        return None
    best = max(range(len(found)), key=lambda i: (counts[i][1], -i))
    return found[best]


def _siblings(root: Any, path: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Entries beside the path at each level: `epoch`, `optimizer`, `arch`, ..."""
    out: list[tuple[str, Any]] = []
    node, prefix = root, ""
    for part in path:
        for key, child in children(node) or ():
            if key != part:
                out.append((prefix + key, child))
        node = resolve(node, (part,))
        prefix += part + "."
    return out
