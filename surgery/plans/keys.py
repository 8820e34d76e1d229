"""Key rules: what port, convert and diff do to a checkpoint's names, as one value.

Pure functions over key names: nothing here touches tensors or files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from surgery.errors import BadArgument
from surgery.names import matches


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

    # The rules as fields of a request file, with their TOML types (every command that reads keys).
    FILE_FIELDS: ClassVar[dict[str, type]] = {
        "key": str,
        "strip_prefix": list,
        "add_prefix": str,
        "rename": list,
        "include": list,
        "exclude": list,
    }

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
        for rule in strings(rename, "rename"):
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
            strings(strip_prefix, "strip_prefix"),
            add_prefix or None,
            tuple(rules),
            strings(include, "include"),
            strings(exclude, "exclude"),
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> KeyRules:
        """The key rules among a request's flat fields (`strip_prefix`, `rename`, ...)."""
        return cls.parse(**{k: fields[k] for k in cls.FILE_FIELDS if fields.get(k) is not None})

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


def strings(value: Any, param: str) -> tuple:
    """A string or a list of strings as a tuple: one string is one item (never its letters).

    Raises:
        BadArgument: naming `param`, for anything else (a `Rename` only for `rename`).
    """
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
