"""Pure functions over key names: prefixes, globs, grouping for display.

Nothing here touches tensors or files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from surgery.errors import BadArgument

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


# -- key rules: what port, convert and diff do to names -----------------------
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


Auto = Callable[[dict[str, str]], tuple[dict[str, str], list[str]]]


@dataclass(frozen=True)
class KeyRules:
    """How a checkpoint's keys become the names a command works with, shared by every
    command that reads keys (port, convert, diff): pick the container (`key`), strip
    prefixes, add one, rename by regex, then keep by include/exclude globs.

    Build it with `KeyRules.parse(...)`, which checks every value and names the
    parameter at fault. Pure: names in, names out.

    Example:
        >>> rules = KeyRules.parse(strip_prefix=["module."], include=["fc"])
        >>> rules.apply(["module.fc.weight", "module.conv1.weight"])[0]
        {'module.fc.weight': 'fc.weight'}
    """

    key: str | None = None
    strip_prefix: tuple[str, ...] = ()
    add_prefix: str | None = None
    rename: tuple[Rename, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    FIELDS: ClassVar[tuple[str, ...]] = ("key", "strip_prefix", "add_prefix", "rename", "include", "exclude")

    @classmethod
    def parse(
        cls,
        *,
        key: str | None = None,
        strip_prefix: str | Iterable[str] = (),
        add_prefix: str | None = None,
        rename: str | Rename | Iterable[str | Rename] = (),
        include: str | Iterable[str] = (),
        exclude: str | Iterable[str] = (),
    ) -> KeyRules:
        """Checked rules; a single string where a list is expected is one item.

        Raises:
            BadArgument: naming the parameter (`rename`, `strip_prefix`, ...) and the value.
        """
        rules = []
        for rule in _items(rename, "rename"):
            if isinstance(rule, Rename):
                rules.append(rule)
                continue
            try:
                rules.append(Rename.parse(rule))
            except ValueError as exc:
                raise BadArgument("rename", str(exc)) from None
        for name, value in (("key", key), ("add_prefix", add_prefix)):
            if value is not None and not isinstance(value, str):
                raise BadArgument(name, f"{value!r} is not a string")
        return cls(
            key or None,
            _items(strip_prefix, "strip_prefix"),
            add_prefix or None,
            tuple(rules),
            _items(include, "include"),
            _items(exclude, "exclude"),
        )

    @property
    def renames_keys(self) -> bool:
        """Whether any rule changes or drops a name (the container choice aside)."""
        return bool(self.strip_prefix or self.add_prefix or self.rename or self.include or self.exclude)

    def apply(self, names: Iterable[str], auto: Auto | None = None) -> tuple[dict[str, str], list[str]]:
        """The rules in order: strip prefixes (or `auto`, when neither strip nor add is
        given), add a prefix, renames, include/exclude.

        Returns:
            (original key -> new name for the keys kept, what each step did).

        Raises:
            BadArgument: a step makes two keys collide, naming that step's parameter and both keys.
        """
        current = {name: name for name in names}
        steps: list[str] = []
        for p in self.strip_prefix:
            changed = sum(n.startswith(p) for n in current.values())
            current = _unique(strip_prefix(current, p), "strip_prefix")
            steps.append(f"stripped prefix {p!r} from {changed} keys")
        if auto is not None and not self.strip_prefix and not self.add_prefix:
            current, done = auto(current)
            steps += done
        if self.add_prefix:
            current = add_prefix(current, self.add_prefix)
            steps.append(f"added prefix {self.add_prefix!r} to {len(current)} keys")
        for rule in self.rename:
            renamed = _unique(rename(current, rule), "rename")
            steps.append(f"renamed {sum(renamed[k] != current[k] for k in current)} keys by {rule}")
            current = renamed
        kept = select(current, self.include, self.exclude)
        if len(kept) != len(current):
            steps.append(f"left out {len(current) - len(kept)} keys by --include/--exclude")
        return kept, steps

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "strip_prefix": list(self.strip_prefix),
            "add_prefix": self.add_prefix,
            "rename": [str(r) for r in self.rename],
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


def _items(value: Any, param: str) -> tuple:
    if isinstance(value, (str, Rename)):
        return (value,)
    try:
        items = tuple(value or ())
    except TypeError:
        raise BadArgument(param, f"{value!r} is not a string or a list of strings") from None
    for item in items:
        if not isinstance(item, (str, Rename)) or (param != "rename" and not isinstance(item, str)):
            raise BadArgument(param, f"{item!r} is not a string")
    return items


def _unique(names: dict[str, str], param: str) -> dict[str, str]:
    clashes = collisions(names)
    if clashes:
        new, olds = next(iter(clashes.items()))
        raise BadArgument(param, f"keys {olds[0]!r} and {olds[1]!r} would both become {new!r}")
    return names
