"""Rule files: source keys to target keys across implementations, through tensor ops.

    [[rule]]
    from = "transformer.h.{n}.attn.c_attn.weight"
    to   = ["blocks.{n}.attn.q.weight", "blocks.{n}.attn.k.weight", "blocks.{n}.attn.v.weight"]
    ops  = [{ op = "transpose" }, { op = "split", dim = 0 }]

`{name}` stands for one dotted segment and binds across `from` and `to`; a rule applies
once per binding. An op parameter written `"{name}"` is a value the caller supplies
(`--map-arg`, the target's keyword arguments, its config). Planning is pure: every
binding's tensors, ops and shapes are known before a byte is read, and a rule that
matches nothing, a binding with a source missing, or shapes that do not fit are errors
naming the rule, the binding and the shapes. Keys no rule takes go on to name matching.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from surgery.names import natural
from surgery.plans.ops import Op, OpError, changes_layout, make_op, run_shapes
from surgery.values import Entry, Shape

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
RULE_FIELDS = ("from", "to", "ops", "optional")
FILE_FIELDS = ("rule", "preset", "args")


class RuleError(ValueError):
    """A rule file that cannot be read or applied; the message names the rule."""


@dataclass(frozen=True)
class Rule:
    """One `[[rule]]`: key patterns in, key patterns out, the ops between (parameters as written)."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]  # () drops the sources on purpose
    ops: tuple[dict[str, Any], ...] = ()
    optional: bool = False
    where: str = "rule 1"  # how messages name it: "vit.toml rule 3"

    def to_json(self) -> dict[str, Any]:
        return {"from": list(self.sources), "to": list(self.targets), "ops": [dict(o) for o in self.ops]}


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file or preset, in order, with the values its ops may name."""

    rules: tuple[Rule, ...]
    origin: str  # the file, or "preset NAME"
    args: tuple[tuple[str, Any], ...] = ()  # defaults for "{name}" op parameters
    description: str = ""
    verified: tuple[tuple[str, str], ...] = ()  # library -> version the preset was checked with


@dataclass(frozen=True)
class Derived:
    """One binding of a rule: the source tensors it reads, the ops, the target keys it fills.

    `names` are what its outputs are called as source keys of the port: the source's own
    name when one tensor becomes one (so the report reads `wq -> q_proj`, and a rename with
    no ops copies bytes as they lie), else the sources joined and numbered.
    """

    rule: str  # "vit.toml rule 3"
    pattern: str  # "blocks.{n}.attn.qkv.weight -> ...": the rule as written
    binding: tuple[tuple[str, str], ...]
    sources: tuple[str, ...]  # as the file names them
    targets: tuple[str, ...]
    ops: tuple[Op, ...]
    shapes: tuple[tuple[Shape, ...], ...]  # the tensors' shapes before the ops and after each
    dtype: str
    names: tuple[str, ...]

    def entries(self) -> list[Entry]:
        return [Entry(n, s, self.dtype) for n, s in zip(self.names, self.shapes[-1], strict=True)]

    @property
    def label(self) -> str:
        """`vit.toml rule 3 (n=0)`: the rule and this binding."""
        bound = ", ".join(f"{k}={v}" for k, v in self.binding)
        return f"{self.rule} ({bound})" if bound else self.rule

    def steps(self) -> str:
        """`[64, 64] -> permute_rope(heads=4) -> [64, 64]`: the shapes before and after each op."""
        parts = [_listed(self.shapes[0])]
        for op, shapes in zip(self.ops, self.shapes[1:], strict=True):
            parts += [str(op), _listed(shapes)]
        return " -> ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "binding": dict(self.binding),
            "from": list(self.sources),
            "to": list(self.targets),
            "ops": [op.to_json() for op in self.ops],
            "shapes": [[list(s) for s in step] for step in self.shapes],
        }


@dataclass(frozen=True)
class RulePlan:
    derived: tuple[Derived, ...] = ()
    dropped: tuple[str, ...] = ()  # source keys a rule with `to = []` takes
    steps: tuple[str, ...] = ()
    layout_changed: tuple[str, ...] = field(default=())  # target keys whose ops change outputs

    @property
    def consumed(self) -> set[str]:
        return {s for d in self.derived for s in d.sources} | set(self.dropped)


# -- reading ---------------------------------------------------------------------
def rules_from_doc(doc: Mapping[str, Any], origin: str) -> RuleSet:
    """A rule file's parsed TOML as a RuleSet, every field and op checked.

    Raises:
        RuleError: naming the rule (`rule 3`) and what is wrong with it.
    """
    unknown = sorted(set(doc) - set(FILE_FIELDS))
    if unknown:
        raise RuleError(f"unknown field {unknown[0]!r} (a rule file holds {', '.join(FILE_FIELDS)})")
    tables = doc.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError("rule is a list of [[rule]] tables with from and to")
    if not tables and "preset" not in doc:  # a preset may say that the names already agree
        raise RuleError("no rules: a rule file holds [[rule]] tables with from and to")
    preset = doc.get("preset", {})
    args = doc.get("args", {})
    if not isinstance(preset, dict) or not isinstance(args, dict):
        raise RuleError("[preset] and [args] are tables")
    verified = preset.get("verified", {})
    return RuleSet(
        tuple(_rule(t, f"rule {i}") for i, t in enumerate(tables, 1)),
        origin,
        tuple(args.items()),
        str(preset.get("description", "")),
        tuple((str(k), str(v)) for k, v in verified.items()) if isinstance(verified, dict) else (),
    )


def _rule(table: Mapping[str, Any], where: str) -> Rule:
    unknown = sorted(set(table) - set(RULE_FIELDS))
    if unknown:
        raise RuleError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(RULE_FIELDS)})")
    if "from" not in table or "to" not in table:
        raise RuleError(f"{where}: needs both from and to")
    sources, targets = _patterns(table["from"], where, "from"), _patterns(table["to"], where, "to")
    if not sources:
        raise RuleError(f"{where}: from names no key")
    ops = table.get("ops", [])
    if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
        raise RuleError(f'{where}: ops is a list of tables like {{ op = "cat", dim = 0 }}')
    for o in ops:  # the names and types are checked now; "{name}" values when applied
        params = {k: v for k, v in o.items() if k != "op"}
        later = {k for k, v in params.items() if isinstance(v, str) and PLACEHOLDER.fullmatch(v)}
        try:
            make_op(
                o.get("op"),
                {k: _placeholder_free(v) for k, v in params.items() if k not in later},
                unresolved=later,
            )
        except OpError as exc:
            raise RuleError(f"{where}: {exc}") from None
    bound = set(PLACEHOLDER.findall(max(sources, key=lambda p: len(set(PLACEHOLDER.findall(p))))))
    for pattern in sources:
        unbound = sorted(set(PLACEHOLDER.findall(pattern)) - bound)
        if unbound:
            raise RuleError(
                f"{where}: {{{unbound[0]}}} in from {pattern!r} is not in the from pattern that binds the most"
            )
    for pattern in targets:
        unbound = sorted(set(PLACEHOLDER.findall(pattern)) - bound)
        if unbound:
            raise RuleError(f"{where}: {{{unbound[0]}}} in to {pattern!r} is bound by no from pattern")
    optional = table.get("optional", False)
    if not isinstance(optional, bool):
        raise RuleError(f"{where}: optional is true or false")
    if not targets and ops:
        raise RuleError(f"{where}: a rule with to = [] drops its sources; it has no ops")
    return Rule(sources, targets, tuple(dict(o) for o in ops), optional, where)


def _patterns(value: Any, where: str, name: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        raise RuleError(f"{where}: {name} is a key pattern or a list of them")
    for p in items:
        if re.sub(PLACEHOLDER, "", p).count("{") or re.sub(PLACEHOLDER, "", p).count("}"):
            raise RuleError(f"{where}: {p!r}: a placeholder is {{name}}, a name of letters, digits and _")
    return tuple(items)


def _placeholder_free(value: Any) -> Any:
    """A parameter as make_op can check it before the `{name}`s in a list of sizes are
    known: each of them as a size (a whole `"{name}"` is make_op's `unresolved`)."""
    if isinstance(value, list):
        return [1 if isinstance(v, str) and PLACEHOLDER.fullmatch(v) else v for v in value]
    return value


# -- applying ----------------------------------------------------------------------
def _regex(pattern: str) -> re.Pattern[str]:
    out, seen, last = [], set(), 0
    for m in PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[last : m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^.]+)")
        seen.add(name)
        last = m.end()
    out.append(re.escape(pattern[last:]))
    return re.compile("".join(out))


def resolve(value: Any, args: Mapping[str, Any], where: str) -> Any:
    """An op parameter with each `"{name}"` replaced by the caller's value."""
    if isinstance(value, list):
        return [resolve(v, args, where) for v in value]
    if isinstance(value, str) and (m := PLACEHOLDER.fullmatch(value)):
        if m.group(1) not in args:
            raise RuleError(
                f"{where}: no value for {value} (pass --map-arg {m.group(1)}=VALUE, or a target that has it)"
            )
        return args[m.group(1)]
    return value


def plan_rules(
    sets: Sequence[RuleSet],
    source: Sequence[Entry],
    target: Sequence[Entry],
    args: Mapping[str, Any] | None = None,
    seen: Mapping[str, str] | None = None,
    adapt: bool = False,
) -> RulePlan:
    """Every rule bound to the source keys, its ops checked against the shapes.

    Args:
        source: the source's entries, named as the file names them.
        target: the target's entries.
        args: values for `"{name}"` op parameters (a rule set's own `args` are the defaults).
        seen: file name -> the name rules match (after the key rules), default the same.
        adapt: add the known adaptation to a binding whose output does not fit its target.

    Raises:
        RuleError: a rule matching nothing (and not optional), a binding with a source or
            target missing, a key two rules take, ops that do not fit the shapes they get.
    """
    seen = dict(seen) if seen is not None else {e.name: e.name for e in source}
    by_seen = {seen[e.name]: e for e in source if e.name in seen}
    tgt = {e.name: e for e in target}
    kept: dict[int, tuple[list[str], Derived | None]] = {}  # binding number -> (its keys, what it makes)
    taken: dict[str, tuple[int, int, str]] = {}  # source or target key -> (set, binding, label)
    overrides: list[str] = []
    counter = itertools.count()
    for number, rules in enumerate(sets):
        values = {**dict(rules.args), **(args or {})}
        for rule in rules.rules:
            where = f"{rules.origin} {rule.where}"
            bindings = _bindings(rule, by_seen)
            if not bindings:
                if rule.optional:
                    continue
                raise RuleError(
                    f"{where}: from {_shown(rule.sources)!r} matches no source key{_near(rule, by_seen)}"
                )
            for binding in bindings:
                names = [p.format(**binding) for p in rule.sources]
                label = f"{where} ({', '.join(f'{k}={v}' for k, v in binding.items())})" if binding else where
                missing = [n for n in names if n not in by_seen]
                if missing:
                    raise RuleError(f"{label}: no source key {missing[0]!r}")
                outs = [p.format(**binding) for p in rule.targets]
                absent = [n for n in outs if n not in tgt]
                if absent:
                    raise RuleError(f"{label}: the target has no key {absent[0]!r}")
                entries = [by_seen[n] for n in names]
                keys = [*(e.name for e in entries), *(f"\0{n}" for n in outs)]
                for key in keys:  # a later file's rule overrides an earlier one's (a preset's)
                    if key not in taken:
                        continue
                    earlier, index, by = taken[key]
                    if earlier == number:
                        raise RuleError(f"{label}: {key.lstrip(chr(0))!r} is already taken by {by}")
                    if index in kept:
                        for k in kept.pop(index)[0]:
                            taken.pop(k, None)
                        overrides.append(f"{label} overrides {by}")
                index = next(counter)
                made = (
                    _derive(rule, where, label, binding, entries, [tgt[n] for n in outs], values, adapt)
                    if outs
                    else None
                )
                kept[index] = (keys, made)
                taken.update((k, (number, index, label)) for k in keys)
    derived = [d for _, d in kept.values() if d is not None]
    dropped = [k for keys, d in kept.values() if d is None for k in keys]
    layout = [t for d in derived if changes_layout(d.ops) for t in d.targets]
    steps = []
    if derived or dropped:
        count = len({d.rule for d in derived})
        origins = ", ".join(dict.fromkeys(r.origin for r in sets))
        steps.append(
            f"rules ({origins}): {len(derived)} bindings of {count} rules fill {sum(len(d.targets) for d in derived)} "
            f"target keys" + (f"; {len(dropped)} source keys dropped by rule" if dropped else "")
        )
    steps += overrides
    return RulePlan(tuple(derived), tuple(dropped), tuple(steps), tuple(layout))


def _bindings(rule: Rule, by_seen: Mapping[str, Entry]) -> list[dict[str, str]]:
    """Each distinct binding of the placeholders, in the source's natural key order, from
    the `from` pattern that binds the most of them."""
    pattern = max(rule.sources, key=lambda p: len(set(PLACEHOLDER.findall(p))))
    regex = _regex(pattern)
    found: dict[tuple, dict[str, str]] = {}
    for name in sorted(by_seen, key=natural):
        m = regex.fullmatch(name)
        if m:
            found.setdefault(tuple(sorted(m.groupdict().items())), m.groupdict())
    return list(found.values())


def _derive(
    rule: Rule,
    where: str,
    label: str,
    binding: Mapping[str, str],
    sources: list[Entry],
    targets: list[Entry],
    values: Mapping[str, Any],
    adapt: bool = False,
) -> Derived:
    """One binding, its ops checked against the shapes. Outputs of another shape than their
    target's are judged as any pair (mismatched: not loaded, refused when strict); with
    `adapt`, a known adaptation (`plans.adapt`) is added to the ops first."""
    try:
        ops = [
            make_op(o["op"], {k: resolve(v, values, label) for k, v in o.items() if k != "op"})
            for o in rule.ops
        ]
        steps = run_shapes(ops, [e.shape for e in sources], [t.shape for t in targets])
    except OpError as exc:
        raise RuleError(f"{label}: {exc} (sources {_shapes(sources)}, targets {_shapes(targets)})") from None
    made = steps[-1]
    if len(made) != len(targets):
        raise RuleError(
            f"{label}: the ops make {len(made)} tensors for {len(targets)} targets "
            f"(sources {_shapes(sources)}, targets {_shapes(targets)})"
        )
    if adapt and len(made) == 1 and made[0] != targets[0].shape:
        from surgery.plans.adapt import adaptation  # the adaptations are rules' ops too

        found = adaptation(label, targets[0].name, made[0], targets[0].shape)
        if found is not None and found.op is not None:
            ops.append(make_op(found.op["op"], {k: v for k, v in found.op.items() if k != "op"}))
            try:
                steps = run_shapes(ops, [e.shape for e in sources], [t.shape for t in targets])
            except OpError as exc:
                raise RuleError(f"{label}: --adapt: {exc}") from None
    dtypes = {e.dtype for e in sources}
    if len(dtypes) > 1:
        raise RuleError(f"{label}: sources of different dtypes {sorted(dtypes)}")
    src = tuple(e.name for e in sources)
    if len(src) == 1 and len(targets) == 1:
        names: tuple[str, ...] = src
    else:
        joined = " + ".join(src)
        names = (
            (joined,)
            if len(targets) == 1
            else tuple(f"{joined} [{i}/{len(targets)}]" for i in range(1, len(targets) + 1))
        )
    return Derived(
        where,
        f"{_shown(rule.sources)} -> {_shown(rule.targets)}",
        tuple(binding.items()),
        src,
        tuple(t.name for t in targets),
        tuple(ops),
        tuple(tuple(s) for s in steps),
        dtypes.pop(),
        names,
    )


def _listed(shapes: Sequence[Shape]) -> str:
    """`[64, 64]`, `[32, 32] x3`, or `[32, 64] + [16, 64]`."""
    if len(set(shapes)) == 1 and len(shapes) > 1:
        return f"{list(shapes[0])} x{len(shapes)}"
    return " + ".join(str(list(s)) for s in shapes)


def rule_lines(derived: Sequence[Derived]) -> list[str]:
    """One line a rule: as written, how many bindings, and its ops with the first binding's shapes."""
    by_rule: dict[str, list[Derived]] = {}
    for d in derived:
        by_rule.setdefault(d.rule, []).append(d)
    origins = {rule.rpartition(" rule ")[0] for rule in by_rule}
    lines = []
    for rule, found in by_rule.items():
        first = found[0]
        name = rule if len(origins) > 1 else "rule " + rule.rpartition(" rule ")[2]
        text = f"{name}: {first.pattern}" + (f" ({len(found)} bindings)" if len(found) > 1 else "")
        lines.append(text + (f": {first.steps()}" if first.ops else ""))
    return lines


def _shapes(entries: Sequence[Entry]) -> str:
    return ", ".join(f"{e.name} {list(e.shape)}" for e in entries)


def _shown(patterns: Sequence[str]) -> str:
    return patterns[0] if len(patterns) == 1 else "[" + ", ".join(patterns) + "]"


def _near(rule: Rule, by_seen: Mapping[str, Entry]) -> str:
    """A hint: the source keys that look most like the rule's pattern."""
    import difflib

    probe = PLACEHOLDER.sub("0", max(rule.sources, key=len))
    close = difflib.get_close_matches(probe, list(by_seen), n=2, cutoff=0.6)
    return f"; closest source keys: {', '.join(close)}" if close else ""
