"""Pure functions over dotted tensor names: common and wrapper prefixes, globs, natural
order, grouping for display (`fc.{bias,weight}`) and the module tree. Dependency-free."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

# Prefixes that wrappers add to every key, and who adds them.
WRAPPER_PREFIXES = {
    "module.": "DataParallel / DistributedDataParallel",
    "_orig_mod.": "torch.compile",
    "model.": "a wrapper module (Lightning, ...)",
}


def common_prefix(names: Sequence[str]) -> str:
    """The longest dotted prefix every name shares: `module.` for DataParallel keys.

    A prefix needs two names or more: one name alone would be its own prefix.

    Example:
        >>> common_prefix(["module.fc.weight", "module.fc.bias"])
        'module.fc.'
    """
    if len(names) < 2:
        return ""
    parts = [name.split(".")[:-1] for name in names]
    shared: list[str] = []
    for level in zip(*parts, strict=False):
        if any(p != level[0] for p in level):
            break
        shared.append(level[0])
    return "".join(p + "." for p in shared)


def wrapper_prefixes(prefix: str) -> list[tuple[str, str]]:
    """The known wrapper prefixes at the start of `prefix`, in order, with who adds them."""
    found = []
    rest = prefix
    while True:
        hit = next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None)
        if hit is None:
            return found
        found.append((hit, WRAPPER_PREFIXES[hit]))
        rest = rest[len(hit) :]


def matches(name: str, globs: Iterable[str]) -> bool:
    """Whether `name` matches any glob; a glob also selects the module it names.

    `layer1` and `layer1.*` both select `layer1.0.conv1.weight`.
    """
    return any(fnmatchcase(name, g) or fnmatchcase(name, g + ".*") for g in globs)


def matches_any(names: Iterable[str], glob: str) -> bool:
    """Whether any of a thing's names (a tied weight has several) matches `glob`."""
    return any(matches(name, [glob]) for name in names)


@dataclass
class Node:
    """One module prefix in the tree of names."""

    name: str  # the dotted path of this node ("" for the root)
    label: str  # what to print: the last part, or merged parts `backbone.body`
    children: dict[str, Node] = field(default_factory=dict)
    leaves: list[str] = field(default_factory=list)  # full names of tensors directly here
    numel: int = 0
    count: int = 0  # tensors at or below


def build_tree(entries: Iterable[tuple[str, int]]) -> Node:
    """Group names by dotted prefix: `layer1.0.conv1.weight` under layer1 > 0 > conv1.

    Args:
        entries: (name, numel) in display order.

    Returns:
        The root; chains of single-child modules are merged (`module.backbone`).
    """
    root = Node("", "")
    for name, numel in entries:
        node = root
        node.numel += numel
        node.count += 1
        parts = name.split(".")
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            node = node.children.setdefault(part, Node(path, part))
            node.numel += numel
            node.count += 1
        node.leaves.append(name)
    _merge_chains(root)
    return root


def _merge_chains(root: Node) -> None:
    stack = [root]
    while stack:
        node = stack.pop()
        for key, child in list(node.children.items()):
            while len(child.children) == 1 and not child.leaves:
                (grandchild,) = child.children.values()
                grandchild.label = f"{child.label}.{grandchild.label}"
                child = grandchild
            node.children[key] = child
            stack.append(child)


# Runs of digits, read as numbers; a run longer than any real index is read in pieces
# (`int` refuses strings of thousands of digits, and a file may name a key that way).
_NUMBERS = re.compile(r"(\d{1,18})")


def natural(name: str) -> tuple:
    """Sort key that puts `layer2` before `layer10` and `enc.2` before `enc.10`.

    Text and numbers alternate (text first), so two keys always compare.
    """
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_NUMBERS.split(name)))


def natural_order(names: Iterable[str]) -> list[str]:
    """`names` sorted naturally (numbers as numbers, `block02` = 2), ties by the text itself:
    the order a file's names mean when the file does not keep its save order.

    Example:
        >>> natural_order(["block10.w", "block2.w", "block02.w"])
        ['block02.w', 'block2.w', 'block10.w']
    """
    return sorted(names, key=lambda name: (natural(name), name))


def numbered(name: str) -> tuple[str, tuple[int, ...]]:
    """A name's pattern, every number written `#`, and its numbers: what says which layer
    of a repeated structure a tensor belongs to.

    Example:
        >>> numbered("blocks.10.fc2.weight")
        ('blocks.#.fc#.weight', (10, 2))
    """
    parts = _NUMBERS.split(name)
    return "#".join(parts[::2]), tuple(int(n) for n in parts[1::2])


def group_names(names: Iterable[str]) -> list[str]:
    """Names sharing a parent written once: `fc.{bias,weight}` (fvcore's style).

    Example:
        >>> group_names(["fc.weight", "fc.bias", "conv1.weight"])
        ['conv1.weight', 'fc.{bias,weight}']
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    out = []
    for parent, leaves in sorted(groups.items(), key=lambda item: natural(item[0])):
        body = leaves[0] if len(leaves) == 1 else "{" + ",".join(sorted(leaves, key=natural)) + "}"
        out.append(f"{parent}.{body}" if parent else body)
    return out


def short_names(names: Sequence[str], limit: int = 8) -> list[str]:
    """`group_names`, or for long lists the names sharing a last part counted together:
    `*.num_batches_tracked (20 keys)`.

    Example:
        >>> short_names([f"layer{i}.bn.num_batches_tracked" for i in range(9)] + ["fc.bias"])
        ['*.num_batches_tracked (9 keys)', 'fc.bias']
    """
    grouped = group_names(names)
    if len(grouped) <= limit:
        return grouped
    by_leaf: dict[str, list[str]] = {}
    for name in names:
        by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
    common = {leaf for leaf, members in by_leaf.items() if len(members) >= 3}
    out = [f"*.{leaf} ({len(by_leaf[leaf])} keys)" for leaf in sorted(common, key=natural)]
    return out + group_names(n for n in names if n.rpartition(".")[2] not in common)
