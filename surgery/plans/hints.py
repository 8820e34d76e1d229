"""Hints that diagnose a port whose keys did not pair: the easy fix, named.

When target keys are missing and source keys unexpected, the fix is often one flag:
a prefix that makes the names equal (every target key is `bert.` + a source key:
`--add-prefix bert.`), suffix matching that pairs them (`--match suffix`), or a rename
of a key whose shape only one key on the other side has (`class_token [1, 1, 768]`
missing next to `cls_token [1, 1, 768]` unexpected). Each hint says how many keys of
equal shape it would pair, so a user can judge it.

Pure functions over the missing target entries and the unexpected source entries (under
the names the key rules gave them): nothing here reads a tensor or a file.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from surgery.plans.match import pair_suffix
from surgery.values import Entry

MAX_RENAMES = 3  # candidate renames shown


@dataclass(frozen=True)
class PrefixFix:
    """Source names starting with `strip` become target names starting with `add`."""

    strip: str
    add: str
    pairs: int  # missing keys it would pair with an unexpected key of the same shape

    def flags(self, *, plain_names: bool) -> str:
        """The flags that say it: `--strip-prefix`/`--add-prefix` when the source names are as
        in the file, else a `--rename` rule (it runs after the prefix rules already given)."""
        if not plain_names:
            return "--rename " + _quoted(f"^{re.escape(self.strip)}={self.add}")
        parts = [f"--strip-prefix {self.strip}"] if self.strip else []
        return " ".join(parts + ([f"--add-prefix {self.add}"] if self.add else []))


def prefix_fix(missing: Sequence[Entry], unexpected: Sequence[Entry]) -> PrefixFix | None:
    """The prefix change that pairs the most missing keys with unexpected keys of their shape.

    Each missing key is compared with the one unexpected key that shares its longest
    dotted ending (`bert.encoder.layer.0.output.dense.weight` with `encoder.layer.0.output.dense.weight`):
    the parts before that ending are the prefixes to strip and to add. Endings that several
    unexpected keys share, or of one part (`weight`), say nothing.

    Returns:
        The most frequent change, when it pairs two keys or more, else None.

    Example:
        >>> e = lambda name: Entry(name, (2,), "float32")
        >>> prefix_fix([e("bert.a.weight"), e("bert.b.weight")], [e("a.weight"), e("b.weight")])
        PrefixFix(strip='', add='bert.', pairs=2)
    """
    by_ending: dict[str, list[Entry]] = {}
    for u in unexpected:
        parts = u.name.split(".")
        for i in range(len(parts)):
            by_ending.setdefault(".".join(parts[i:]), []).append(u)
    votes: Counter[tuple[str, str]] = Counter()
    for m in missing:
        parts = m.name.split(".")
        for i in range(len(parts)):
            ending = ".".join(parts[i:])
            found = by_ending.get(ending)
            if not found:
                continue
            if len(found) == 1 and found[0].shape == m.shape and "." in ending:
                add = m.name[: len(m.name) - len(ending)]
                strip = found[0].name[: len(found[0].name) - len(ending)]
                if add or strip:
                    votes[(strip, add)] += 1
            break  # the longest shared ending decides
    if not votes:
        return None
    (strip, add), pairs = votes.most_common(1)[0]
    return PrefixFix(strip, add, pairs) if pairs >= 2 else None


def suffix_pairs(missing: Sequence[Entry], unexpected: Sequence[Entry]) -> int:
    """How many missing keys `--match suffix` would pair with an unexpected key of their shape."""
    source = {u.name: u.name for u in unexpected}
    shapes = {e.name: e.shape for e in (*missing, *unexpected)}
    pairs = pair_suffix(source, [m.name for m in missing], ambiguous_is_error=False)
    return sum(shapes[p.source] == shapes[p.target] for p in pairs)


def rename_candidates(missing: Sequence[Entry], unexpected: Sequence[Entry]) -> list[tuple[Entry, Entry]]:
    """(missing, unexpected) pairs whose shape no other missing or unexpected key has: likely
    one tensor under two names. In the order of the missing keys.

    Example:
        >>> rename_candidates([Entry("class_token", (1, 1, 768), "float32")],
        ...                   [Entry("cls_token", (1, 1, 768), "float32")])
        [(Entry(name='class_token', ...), Entry(name='cls_token', ...))]
    """
    on_missing = Counter(m.shape for m in missing)
    on_unexpected: dict[tuple[int, ...], list[Entry]] = {}
    for u in unexpected:
        on_unexpected.setdefault(u.shape, []).append(u)
    return [
        (m, on_unexpected[m.shape][0])
        for m in missing
        if on_missing[m.shape] == 1 and len(on_unexpected.get(m.shape, [])) == 1
    ]


def rename_flag(source: str, target: str) -> str:
    """`--rename` for one key: its whole name as a regex (anchored, dots escaped: `bias` must
    not rename `0.bias` too), then the target name."""
    return _quoted(f"^{re.escape(source)}$={target}")


def diagnose(
    missing: Sequence[Entry], unexpected: Sequence[Entry], *, match: str = "exact", plain_names: bool = True
) -> list[str]:
    """What would pair missing target keys with unexpected source keys, best first.

    Args:
        missing: the target keys nothing was found for, with their shapes.
        unexpected: the source keys nothing used, under their names after the key rules.
        match: the match mode used (`--match suffix` is suggested only when it was not tried).
        plain_names: the source names are as in the file (no prefix stripped or added yet):
            a prefix fix is said with `--strip-prefix`/`--add-prefix`, else with `--rename`.

    Example:
        >>> e = lambda name: Entry(name, (2,), "float32")
        >>> diagnose([e("bert.a.weight"), e("bert.b.weight")], [e("a.weight"), e("b.weight")])
        ['--add-prefix bert. would pair 2 of 2 missing keys with unexpected keys of their shape']
    """
    if not missing or not unexpected:
        return []
    hints = []
    of = f"of {len(missing)} missing keys with unexpected keys of their shape"
    fix = prefix_fix(missing, unexpected)
    explained: set[str] = set()
    if fix is not None:
        hints.append(f"{fix.flags(plain_names=plain_names)} would pair {fix.pairs} {of}")
        names = {u.name for u in unexpected}
        explained = {
            m.name
            for m in missing
            if m.name.startswith(fix.add) and fix.strip + m.name.removeprefix(fix.add) in names
        }
    if match in ("exact", "order"):
        by_suffix = suffix_pairs(missing, unexpected)
        if by_suffix >= 2 and by_suffix > (fix.pairs if fix else 0):
            hints.append(f"--match suffix would pair {by_suffix} {of}")
            explained = {m.name for m in missing}
    renames = [(m, u) for m, u in rename_candidates(missing, unexpected) if m.name not in explained]
    for m, u in renames[:MAX_RENAMES]:
        hints.append(
            f"missing {m.name} {list(m.shape)} next to unexpected {u.name} {list(u.shape)}: "
            f"maybe --rename {rename_flag(u.name, m.name)}"
        )
    if len(renames) > MAX_RENAMES:
        hints.append(f"... and {len(renames) - MAX_RENAMES} more such pairs of equal shape")
    return hints


def _quoted(text: str) -> str:
    """A shell word: quoted when it holds anything a shell would read."""
    return text if re.fullmatch(r"[\w.,:=/+-]+", text) else f"'{text}'"
