"""Pure functions over key names: prefixes, globs, grouping for display.

Nothing here touches tensors or files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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


def natural(name: str) -> tuple:
    """Sort key that puts `layer2` before `layer10` and `enc.2` before `enc.10`."""
    import re

    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


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


# -- the key pipeline of `surgery port` --------------------------------------
@dataclass(frozen=True)
class Rename:
    """One `--rename REGEX=REPL` rule: `re.sub` over every key, groups allowed."""

    pattern: str
    replacement: str

    @classmethod
    def parse(cls, text: str) -> Rename:
        """`REGEX=REPL`, split at the first `=` (write `\\=` for a literal `=` in REGEX).

        Raises:
            ValueError: no `=`, or a REGEX that does not compile.
        """
        import re

        split = re.search(r"(?<!\\)=", text)
        if split is None:
            raise ValueError(f"rename {text!r} is not REGEX=REPL")
        rule = cls(text[: split.start()].replace("\\=", "="), text[split.end() :])
        try:
            re.compile(rule.pattern)
        except re.error as exc:
            raise ValueError(f"rename {text!r}: bad regex ({exc})") from None
        return rule

    def __str__(self) -> str:
        return f"{self.pattern}={self.replacement}"


def strip_prefix(names: dict[str, str], prefix: str) -> dict[str, str]:
    """Each key's current name without `prefix`, where it has it."""
    return {old: new.removeprefix(prefix) for old, new in names.items()}


def add_prefix(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {old: prefix + new for old, new in names.items()}


def parse_renames(rules: Iterable[str | Rename]) -> tuple[Rename, ...]:
    """`--rename` texts (or rules already parsed) as rules. Raises ValueError naming a bad one."""
    return tuple(rule if isinstance(rule, Rename) else Rename.parse(rule) for rule in rules)


def rename(names: dict[str, str], rule: Rename) -> dict[str, str]:
    import re

    compiled = re.compile(rule.pattern)
    return {old: compiled.sub(rule.replacement, new) for old, new in names.items()}


def select(names: dict[str, str], include: Iterable[str], exclude: Iterable[str]) -> dict[str, str]:
    """The keys kept by `--include` (any, when given) and not dropped by `--exclude`."""
    include, exclude = list(include), list(exclude)
    return {
        old: new
        for old, new in names.items()
        if (not include or matches(new, include)) and not matches(new, exclude)
    }


def collisions(names: dict[str, str]) -> dict[str, list[str]]:
    """New names that two or more keys were mapped to, with those keys."""
    seen: dict[str, list[str]] = {}
    for old, new in names.items():
        seen.setdefault(new, []).append(old)
    return {new: olds for new, olds in seen.items() if len(olds) > 1}


def pipeline(
    names: dict[str, str],
    *,
    strip: Sequence[str] = (),
    prefix: str | None = None,
    renames: Sequence[Rename] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    auto: Callable[[dict[str, str]], tuple[dict[str, str], list[str]]] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """The key steps shared by `port` and `convert`, in order: strip prefixes (or the
    `auto` stripping when none is given), add a prefix, renames, include/exclude.

    Args:
        names: original key -> current name.

    Returns:
        (original key -> new name for the keys kept, what each step did).

    Raises:
        ValueError: a step makes two keys collide (naming both).
    """
    steps: list[str] = []
    for p in strip:
        changed = sum(n.startswith(p) for n in names.values())
        names = strip_prefix(names, p)
        steps.append(f"stripped prefix {p!r} from {changed} keys")
    if auto is not None and not strip and not prefix:
        names, done = auto(names)
        steps += done
    if prefix:
        names = add_prefix(names, prefix)
        steps.append(f"added prefix {prefix!r} to {len(names)} keys")
    for rule in renames:
        renamed = rename(names, rule)
        steps.append(f"renamed {sum(renamed[k] != names[k] for k in names)} keys by {rule}")
        names = renamed
    clashes = collisions(names)
    if clashes:
        new, olds = next(iter(clashes.items()))
        raise ValueError(f"keys {olds[0]!r} and {olds[1]!r} would both become {new!r}")
    kept = select(names, include, exclude)
    if len(kept) != len(names):
        steps.append(f"left out {len(names) - len(kept)} keys by --include/--exclude")
    return kept, steps
