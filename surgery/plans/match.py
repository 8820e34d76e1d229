"""Pairing source keys with target keys, and judging each pair by its shape.

Pure functions over names and shapes: nothing here reads a tensor or a file.
The result is a `PortPlan` (matched, mismatched, missing, unexpected, filled), which
`surgery.port` applies, and which `--dry-run` and `--plan-out` show as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

from surgery.errors import BadArgument
from surgery.names import WRAPPER_PREFIXES, common_prefix, natural, numbered, wrapper_prefixes
from surgery.plans import keys
from surgery.plans.rules import Derived, RulePlan, RuleSet, plan_rules
from surgery.values import Entry, Shape

MODES = ("exact", "suffix", "order", "auto")

# Formats whose key order is not the order the state_dict was saved in: safetensors files
# (and indexes of them) list keys sorted as strings, a DCP folder by its metadata.
SORTED_FORMATS = frozenset({"safetensors", "sharded", "dcp"})


class MatchError(ValueError):
    """The keys cannot be paired as asked (ambiguous suffixes, a structure that does not line up)."""


@dataclass(frozen=True)
class Pair:
    source: str  # the key as the source file names it
    target: str
    how: str  # exact | suffix | order | plan


@dataclass(frozen=True)
class Matched:
    source: str
    target: str
    shape: Shape  # the target's
    how: str
    source_shape: Shape | None = None  # set when --reshape made the shapes agree
    cast: tuple[str, str] | None = None  # (source dtype, target dtype) when they differ

    def to_json(self) -> dict:
        out: dict = {"source": self.source, "target": self.target, "shape": list(self.shape), "how": self.how}
        if self.source_shape is not None:
            out["reshaped_from"] = list(self.source_shape)
        if self.cast is not None:
            out["cast"] = list(self.cast)
        return out


@dataclass(frozen=True)
class Mismatched:
    source: str
    target: str
    source_shape: Shape
    target_shape: Shape
    reason: str | None = None  # why it was not loaded when the shapes alone do not say

    def to_json(self) -> dict:
        out: dict = {
            "source": self.source,
            "target": self.target,
            "source_shape": list(self.source_shape),
            "target_shape": list(self.target_shape),
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class PortPlan:
    """What loading would do: every target key is matched, mismatched, tied, missing or new."""

    matched: tuple[Matched, ...]
    mismatched: tuple[Mismatched, ...]
    missing: tuple[str, ...]  # target keys nothing was found for
    unexpected: tuple[str, ...]  # source keys nothing used
    tied: tuple[tuple[str, str], ...] = ()  # (target key, key it shares storage with that was loaded)
    steps: tuple[str, ...] = field(default=())
    excluded: tuple[str, ...] = ()  # source keys left out by --include/--exclude
    filled: tuple[str, ...] = ()  # target keys torch itself would not miss: they keep the target's value
    new: tuple[str, ...] = ()  # target keys not expected from the source (edits, --allow-missing)
    unused: tuple[str, ...] = ()  # source keys left unused by intent (replaced, removed, --allow-unexpected)
    derived: tuple[Derived, ...] = ()  # what the rules make: their outputs are source keys of `matched`
    layout_changed: tuple[str, ...] = ()  # target keys whose rule ops change what their module computes
    dropped: tuple[str, ...] = ()  # source keys a rule with `to = []` drops (also in `unused`)

    @property
    def complete(self) -> bool:
        """Nothing missing, unexpected or mismatched: what `--strict true` requires (keys
        `filled` as torch's own load_state_dict fills them are not missing; `new` and `unused` by
        the user's intent are none of these)."""
        return not (self.mismatched or self.missing or self.unexpected)


# -- pairing ------------------------------------------------------------------
def pair_exact(source: dict[str, str], target: Sequence[str]) -> list[Pair]:
    """Pairs of keys whose (renamed) source name equals the target name.

    Args:
        source: original source key -> its current (renamed) name.
        target: target key names.
    """
    by_name = {new: old for old, new in source.items()}
    return [Pair(by_name[t], t, "exact") for t in target if t in by_name]


def pair_suffix(source: dict[str, str], target: Sequence[str], *, ambiguous_is_error: bool) -> list[Pair]:
    """Each target key takes the source key whose name overlaps it the most as a dotted
    suffix (`layer1.0.conv1.weight` into `backbone.body.layer1.0.conv1.weight`, or the
    other way round), as detectron2 matches backbone checkpoints.

    Raises:
        MatchError: with `ambiguous_is_error`, a target that two source keys fit equally
            well, or one source key that would feed two targets (named).
    """
    current = {new: old for old, new in source.items()}
    suffixes: dict[str, list[str]] = {}  # every dotted suffix of a source name -> those names
    for name in current:
        parts = name.split(".")
        for i in range(len(parts)):
            suffixes.setdefault(".".join(parts[i:]), []).append(name)
    chosen: dict[str, str] = {}  # target -> current source name
    for t in target:
        if t in current:
            chosen[t] = t
            continue
        parts = t.split(".")
        # a source name that ends with the whole target overlaps it most; of those,
        # the one that adds the fewest parts (`backbone.body.conv1.weight`, not
        # `backbone.body.layer1.0.conv1.weight`, for `conv1.weight`)...
        longer = [s for s in suffixes.get(t, []) if s != t]
        fewest = min((s.count(".") for s in longer), default=0)
        best = [s for s in longer if s.count(".") == fewest]
        if not best:  # ...else the longest dotted suffix of the target that is a source name
            shorter = (".".join(parts[i:]) for i in range(1, len(parts)))
            best = [next((c for c in shorter if c in current), None)] if len(parts) > 1 else []
            best = [b for b in best if b]
        if len(best) > 1:
            if ambiguous_is_error:
                names = ", ".join(sorted(current[b] for b in best)[:4])
                raise MatchError(f"target {t!r} fits several source keys equally well: {names}")
            continue
        if best:
            chosen[t] = best[0]
    users: dict[str, list[str]] = {}
    for t, s in chosen.items():
        users.setdefault(s, []).append(t)
    for s, ts in users.items():
        if len(ts) == 1:
            continue
        if s in ts:  # the target of the same name keeps it; the others go without
            for t in ts:
                if t != s:
                    del chosen[t]
        elif ambiguous_is_error:
            raise MatchError(f"source key {current[s]!r} would feed both {ts[0]!r} and {ts[1]!r}")
        else:
            for t in ts:
                del chosen[t]
    return [Pair(current[s], t, "exact" if s == t else "suffix") for t, s in chosen.items()]


def pair_order(source: Sequence[Entry], target: Sequence[Entry], *, refuse: bool) -> list[Pair]:
    """Pair two key sequences by position, for the same architecture named differently.

    Both sequences must be in the same kind of order (see `model_order`). Equal shapes
    at every position are not enough: a pairing that puts numbered layers in another
    order on one side than on the other (`block10 -> blocks.2` while `block02 -> blocks.10`)
    lines up only by permuting layers, and is refused too.

    Raises:
        MatchError: with `refuse`, when the counts differ, a pair's shapes differ (the
            structures do not line up) or the layers would be permuted, naming the first
            divergence.
    """
    problem = None
    if len(source) != len(target):
        problem = f"{len(source)} source keys against {len(target)} target keys"
    else:
        for i, (s, t) in enumerate(zip(source, target, strict=True)):
            if s.shape != t.shape:
                problem = (
                    f"structure diverges at key {i + 1}: source {s.name} {list(s.shape)} "
                    f"against target {t.name} {list(t.shape)}"
                )
                break
    pairs = (
        [Pair(s.name, t.name, "order") for s, t in zip(source, target, strict=True)] if not problem else []
    )
    crossed = permuted_layers([(p.source, p.target) for p in pairs])
    if crossed:
        (s1, t1), (s2, t2) = crossed
        problem = (
            f"the shapes line up only by permuting layers: {s1} -> {t1} but {s2} -> {t2} "
            "(pair them by name with --rename, or review a --plan-out file)"
        )
    if problem:
        if refuse:
            raise MatchError(f"cannot pair keys by order: {problem}")
        return []
    return pairs


def permuted_layers(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two (source, target) pairs that number the same layers in opposite orders, or None.

    Names are compared within a repeated structure: the keys of one pattern on each side
    (`block#.weight` against `blocks.#.weight`, see `names.numbered`). A number on the
    source side and one on the target side count the same layers when they correspond
    one to one over the pairs (each source value always meets the same target value, and
    back); such numbers must rise together. Numbers that do not correspond one to one (a
    running index against a layer number, names nested in another order) say nothing.

    Example:
        >>> permuted_layers([("block02.w", "blocks.10.w"), ("block10.w", "blocks.2.w")])
        (('block02.w', 'blocks.10.w'), ('block10.w', 'blocks.2.w'))
    """
    groups: dict[tuple[str, str], list[tuple[tuple[int, ...], tuple[int, ...], tuple[str, str]]]] = {}
    for s, t in pairs:
        (s_pattern, s_numbers), (t_pattern, t_numbers) = numbered(s), numbered(t)
        if s_numbers and t_numbers:
            groups.setdefault((s_pattern, t_pattern), []).append((s_numbers, t_numbers, (s, t)))
    for members in groups.values():
        s_slots, t_slots = len(members[0][0]), len(members[0][1])
        for i in range(s_slots):
            for j in range(t_slots):
                forward: dict[int, tuple[int, tuple[str, str]]] = {}
                backward: dict[int, int] = {}
                for s_numbers, t_numbers, p in members:
                    a, b = s_numbers[i], t_numbers[j]
                    if forward.setdefault(a, (b, p))[0] != b or backward.setdefault(b, a) != a:
                        break
                else:
                    ranked = sorted(forward.items())
                    for (_, (b1, p1)), (_, (b2, p2)) in pairwise(ranked):
                        if b2 < b1:
                            return p1, p2
    return None


def model_order(
    entries: Sequence[Entry], *, saved: bool, name_of: dict[str, str] | None = None
) -> list[Entry]:
    """Entries in the order position matching compares: as saved (a model's registration
    order, which torch.save keeps in a state_dict), or else the natural order of the
    names (`block2` before `block10`), the only order a sorted file still has.

    Args:
        saved: keep the order given.
        name_of: the name to sort an entry by (its name after the key rules); its own by default.
    """
    if saved:
        return list(entries)
    name_of = name_of or {}

    def key(e: Entry) -> tuple:
        name = name_of.get(e.name, e.name)
        return natural(name), name

    return sorted(entries, key=key)


def pair(
    source: Sequence[Entry],
    renamed: dict[str, str],
    target: Sequence[Entry],
    mode: str,
    *,
    saved_order: bool = True,
) -> list[Pair]:
    """Pairs by `mode`: exact, suffix, order, or auto (exact, then unambiguous suffix,
    then order on what is left when it lines up exactly).

    Args:
        source: source entries under their original names, in file order.
        renamed: original source name -> name after the key pipeline (kept keys only).
        target: target entries in the target's order.
        saved_order: both sides are in the order their state_dicts were saved in (a
            model's registration order); else position matching puts both sides in the
            natural order of their names, the source by its renamed names.
    """
    target_names = [t.name for t in target]
    if mode == "exact":
        return pair_exact(renamed, target_names)
    if mode == "suffix":
        return pair_suffix(renamed, target_names, ambiguous_is_error=True)
    by_name = {e.name: e for e in source}
    kept = model_order([by_name[s] for s in renamed], saved=saved_order, name_of=renamed)
    target = model_order(target, saved=saved_order)
    if mode == "order":
        return pair_order(kept, target, refuse=True)
    if mode != "auto":
        raise ValueError(f"match mode {mode!r} is not one of {', '.join(MODES)}")
    pairs = pair_exact(renamed, target_names)
    used_s, used_t = {p.source for p in pairs}, {p.target for p in pairs}
    rest = {s: n for s, n in renamed.items() if s not in used_s}
    rest_t = [t for t in target_names if t not in used_t]
    suffix = pair_suffix(rest, rest_t, ambiguous_is_error=False)
    pairs += suffix
    used_s |= {p.source for p in suffix}
    used_t |= {p.target for p in suffix}
    left_s = [e for e in kept if e.name not in used_s]
    left_t = [t for t in target if t.name not in used_t]
    if left_s and left_t:
        pairs += pair_order(left_s, left_t, refuse=False)
    return pairs


# -- judging pairs ------------------------------------------------------------
def judge(
    pairs: Sequence[Pair],
    source: Sequence[Entry],
    target: Sequence[Entry],
    *,
    reshape: bool = False,
    ties: dict[str, str] | None = None,
    source_ties: dict[str, str] | None = None,
    kept: set[str] | None = None,
    steps: Sequence[str] = (),
) -> PortPlan:
    """Split pairs by shape and list what stays unpaired.

    A pair of different shapes is mismatched and never loaded; equal numel with a
    different shape (Linear <-> 1x1 conv) loads only with `reshape`, and never when
    one shape is the other's dimensions permuted (`transposed`): reshaping those
    scrambles the values.

    Args:
        ties: target key -> the key it shares storage with in the target (tied
            weights): loading either fills both, so neither is missing. When the
            two would be filled from different source tensors, only the first
            (in target order) is; the other source key is left unused.
        source_ties: the same for the source: two source keys sharing storage
            are one tensor, so filling a tied pair from them is no conflict.
        kept: source keys left after --include/--exclude; the others are
            `excluded`, not unexpected.
    """
    src = {e.name: e for e in source}
    tgt = {e.name: e for e in target}
    order = {e.name: i for i, e in enumerate(target)}
    matched, mismatched = [], []
    steps = list(steps)
    for p in pairs:
        s, t = src[p.source], tgt[p.target]
        cast = (s.dtype, t.dtype) if s.dtype != t.dtype else None
        if s.shape == t.shape:
            matched.append(Matched(p.source, p.target, t.shape, p.how, None, cast))
        elif reshape and s.numel == t.numel and not transposed(s.shape, t.shape):
            matched.append(Matched(p.source, p.target, t.shape, p.how, s.shape, cast))
        elif reshape and transposed(s.shape, t.shape):
            what = "the transpose" if len(squeezed(s.shape)) == 2 else "a permutation of the dimensions"
            reason = TRANSPOSED.format(what=what)
            mismatched.append(Mismatched(p.source, p.target, s.shape, t.shape, reason))
            steps.append(f"{p.target}: source {list(s.shape)} against target {list(t.shape)}: {reason}")
        else:
            mismatched.append(Mismatched(p.source, p.target, s.shape, t.shape))
    ties, source_ties = ties or {}, source_ties or {}
    by_target = {m.target: m for m in matched}
    conflicts = set()
    for m in matched:
        other = by_target.get(ties.get(m.target, ""))
        if other is None or other.target in conflicts or order[m.target] < order[other.target]:
            continue
        if other.source != m.source and source_ties.get(other.source) != m.source:
            conflicts.add(m.target)
            steps.append(
                f"{m.target} shares storage with {other.target} in the target: filled from "
                f"{other.source} only, {m.source} left unused"
            )
    matched = [m for m in matched if m.target not in conflicts]
    loaded = {m.target for m in matched}
    paired_targets = loaded | {m.target for m in mismatched}
    tied = tuple(
        (t.name, ties[t.name]) for t in target if t.name not in paired_targets and ties.get(t.name) in loaded
    )
    tied_names = {name for name, _ in tied}
    missing = tuple(t.name for t in target if t.name not in paired_targets and t.name not in tied_names)
    used = {m.source for m in matched} | {m.source for m in mismatched}
    kept = kept if kept is not None else set(src)
    unexpected = tuple(e.name for e in source if e.name in kept and e.name not in used)
    excluded = tuple(e.name for e in source if e.name not in kept)
    return PortPlan(tuple(matched), tuple(mismatched), missing, unexpected, tied, tuple(steps), excluded)


TRANSPOSED = (
    "not reshaped: one shape is {what} of the other (--reshape would scramble the values); "
    "a transpose rule is needed"
)


# -- torch's own leniency -------------------------------------------------------------
FILLED_BUFFER = "num_batches_tracked"  # BatchNorm's counter, added in PyTorch 0.4.1 (module version 2)


def fill_as_torch(
    plan: PortPlan, target: Sequence[Entry], versions: dict[str, int] | None = None
) -> PortPlan:
    """Move missing `*.num_batches_tracked` keys to `filled`, where torch's own
    `load_state_dict(strict=True)` does not miss them either.

    BatchNorm's `_load_from_state_dict` supplies the key (the module's own value: 0 in a
    freshly built model) when the state_dict's `_metadata` gives the module no version or
    a version below 2: checkpoints saved before PyTorch 0.4.1, and any state_dict that
    lost its `_metadata` (safetensors files, `{k: v ...}` copies). Where `versions` says 2
    or more, the counter was saved and then deleted: torch refuses, and so does the plan.

    Only the counter of a module whose other tensors were paired with source tensors is
    filled: a BatchNorm the source does not hold at all is missing whole (torch would
    report its other keys anyway, so no port torch accepts is refused). Nothing else is filled.

    Args:
        plan: the judged plan.
        target: the target's entries (a filled key is a scalar int64 named `*.num_batches_tracked`).
        versions: module path in the source -> its `_metadata` version, where the file has
            them; the module is named as the source names it (`bn1.num_batches_tracked`
            beside `bn1.weight` loaded from `enc.bn.weight` looks `enc.bn` up).
    """
    versions = versions or {}
    shapes = {e.name: (e.shape, e.dtype) for e in target}
    source_module = {
        m.target.rpartition(".")[0]: m.source.rpartition(".")[0] for m in (*plan.matched, *plan.mismatched)
    }
    filled = []
    for name in plan.missing:
        module, _, leaf = name.rpartition(".")
        if leaf != FILLED_BUFFER or shapes[name] != ((), "int64") or module not in source_module:
            continue
        version = versions.get(source_module[module])
        if version is None or version < 2:
            filled.append(name)
    if not filled:
        return plan
    steps = (*plan.steps, f"filled {len(filled)} {FILLED_BUFFER} as torch does (the target's own value)")
    missing = tuple(n for n in plan.missing if n not in set(filled))
    return replace(plan, missing=missing, filled=tuple(filled), steps=steps)


def squeezed(shape: Shape) -> Shape:
    """`shape` without its dimensions of size 1: what a reshape cannot scramble."""
    return tuple(n for n in shape if n != 1)


def transposed(source: Shape, target: Shape) -> bool:
    """Whether `target` is `source` with its dimensions permuted (size-1 dimensions aside):
    `[6, 4]` against `[4, 6]` or `[4, 6, 1, 1]`. Same element count, but a reshape would
    read the values in the wrong order: a transpose is meant.

    Example:
        >>> transposed((6, 4), (4, 6)), transposed((6, 4), (6, 4, 1, 1)), transposed((6, 4), (24,))
        (True, False, False)
    """
    s, t = squeezed(source), squeezed(target)
    return len(s) >= 2 and s != t and sorted(s) == sorted(t)


def auto_strip(
    renamed: dict[str, str], target: Sequence[str], extra: Sequence[str] = ()
) -> tuple[dict[str, str], list[str]]:
    """Strip the wrapper prefixes every key carries (`module.`, `_orig_mod.`, `model.`,
    nested as in `module._orig_mod.`), and after them any of `extra` (the path of a
    module extracted from the target, `features.`), as far as that makes more keys
    fit the target: equal a target key or be a dotted suffix of one. Says what it did.
    """
    fits = set()
    for t in target:
        parts = t.split(".")
        fits.update(".".join(parts[i:]) for i in range(len(parts)))
    common = common_prefix(list(renamed.values())) if len(renamed) > 1 else ""
    chain = [w for w, _ in wrapper_prefixes(common)]
    candidates = ["".join(chain[:depth]) for depth in range(len(chain) + 1)]
    candidates += [c + e for c in list(candidates) for e in extra]
    before = sum(n in fits for n in renamed.values())
    best, best_score = "", before
    for prefix in filter(None, candidates):  # keys without the prefix keep their names
        score = sum(n.removeprefix(prefix) in fits for n in renamed.values())
        if score > best_score:
            best, best_score = prefix, score
    if not best:
        return renamed, []
    why, rest = [], best
    for wrapper in chain:
        if rest.startswith(wrapper):
            why.append(WRAPPER_PREFIXES[wrapper])
            rest = rest[len(wrapper) :]
    if rest:
        why.append("the extracted module")
    step = f"stripped prefix {best!r} ({', '.join(why)}): {best_score} of {len(renamed)} keys fit the target instead of {before}"
    return keys.strip_prefix(renamed, best), [step]


# -- the port plan: key rules, pairing, judging ----------------------------------
@dataclass(frozen=True)
class PortOptions:
    """How source keys become target keys: the key rules, then pairing and shape rules."""

    keys: keys.KeyRules = keys.KeyRules()
    match: str = "auto"
    reshape: bool = False
    mapping: dict[str, str] | None = None  # a reviewed plan: source key -> target key, used as is
    extracted: tuple[str, ...] = ()  # prefixes the target lost to --extract: stripped when that helps
    rules: tuple[RuleSet, ...] = ()  # rule files and presets, applied before any pairing
    rule_args: tuple[tuple[str, Any], ...] = ()  # values for the rules' "{name}" op parameters
    adapt: bool = False  # a rule's output that does not fit its target gets the known adaptation

    def __post_init__(self) -> None:
        if self.match not in MODES:
            raise BadArgument("match", f"{self.match!r} is not one of {', '.join(MODES)}")

    def to_json(self) -> dict[str, Any]:
        rules = self.keys.to_json()
        return {
            "key": rules.pop("key"),
            "match": self.match,
            **rules,
            "reshape": self.reshape,
            "plan": self.mapping is not None,
            "map": [r.origin for r in self.rules],
        }


def plan_port(
    source: Sequence[Entry],
    target: Sequence[Entry],
    options: PortOptions,
    ties: dict[str, str] | None = None,
    source_ties: dict[str, str] | None = None,
    *,
    saved_order: bool = True,
    source_versions: dict[str, int] | None = None,
) -> PortPlan:
    """The key pipeline, on names and shapes alone.

    Args:
        ties, source_ties: keys sharing storage in the target and in the source.
        saved_order: both sides list their keys in the order they were saved in (a
            model, a torch file); false when either is a file that sorts its keys
            (`SORTED_FORMATS`): position matching then puts both in natural order.
        source_versions: the source's module versions (`fill_as_torch`).

    Raises:
        BadArgument: a key rule makes two keys collide, or a plan names unknown keys.
        MatchError: the keys cannot be paired as `options.match` asks.
    """
    ruled = _rules(source, target, options)
    rest = [e for e in source if e.name not in ruled.consumed]
    filled = {t for d in ruled.derived for t in d.targets}
    rest_target = [t for t in target if t.name not in filled]
    derived = [e for d in ruled.derived for e in d.entries()]
    made = [
        Pair(e.name, t, "rule") for d in ruled.derived for e, t in zip(d.entries(), d.targets, strict=True)
    ]
    if options.mapping is not None:
        plan = _apply_mapping(rest, rest_target, options, ties, source_ties, [*rest, *derived], made, target)
    else:
        kept, steps = _renamed([e.name for e in rest], [t.name for t in rest_target], options)
        pairs = pair(rest, kept, rest_target, options.match, saved_order=saved_order)
        hows = {"name": "exact", "dotted suffix": "suffix", "position": "order"}
        counts = [f"{n} by {label}" for label, how in hows.items() if (n := sum(p.how == how for p in pairs))]
        if not saved_order and any(p.how == "order" for p in pairs):
            counts[-1] += " (both sides in the natural order of their names)"
        steps.append(f"--match {options.match}: " + (", ".join(counts) if counts else "no pairs"))
        plan = judge(
            [*made, *pairs],
            [*rest, *derived],
            target,
            reshape=options.reshape,
            ties=ties,
            source_ties=source_ties,
            kept=set(kept) | {e.name for e in derived},
            steps=[*ruled.steps, *steps],
        )
    if ruled.derived or ruled.dropped:
        made_by = {n: d for d in ruled.derived for n in d.names}
        mismatched = tuple(
            replace(m, reason=f"made by {made_by[m.source].label}") if m.source in made_by else m
            for m in plan.mismatched
        )
        plan = replace(
            plan,
            mismatched=mismatched,
            derived=ruled.derived,
            unused=(*plan.unused, *ruled.dropped),
            layout_changed=ruled.layout_changed,
            dropped=ruled.dropped,
        )
    return fill_as_torch(plan, target, source_versions)


def _apply_mapping(
    source: Sequence[Entry],
    target: Sequence[Entry],
    options: PortOptions,
    ties: dict[str, str] | None,
    source_ties: dict[str, str] | None,
    judged: Sequence[Entry],
    made: Sequence[Pair],
    every_target: Sequence[Entry],
) -> PortPlan:
    """A reviewed plan's pairs (`source` and `target`: the keys its rules leave), with the
    pairs its rules `made`, judged over every source entry and every target key."""
    mapping = options.mapping or {}
    source_names = {e.name for e in source}
    target_names = {e.name for e in target}
    unknown = [s for s in mapping if s not in source_names] + [
        t for t in mapping.values() if t not in target_names
    ]
    if unknown:
        raise BadArgument("plan", f"the plan names keys that are not there: {', '.join(unknown[:3])}")
    clashes = keys.collisions(mapping)
    if clashes:
        new, olds = next(iter(clashes.items()))
        raise BadArgument("plan", f"the plan maps both {olds[0]!r} and {olds[1]!r} to {new!r}")
    pairs = [*made, *(Pair(s, t, "plan") for s, t in mapping.items())]
    steps = [f"applied a plan of {len(pairs)} pairs"]
    return judge(
        pairs, judged, every_target, reshape=options.reshape, ties=ties, source_ties=source_ties, steps=steps
    )


def _rules(source: Sequence[Entry], target: Sequence[Entry], options: PortOptions) -> RulePlan:
    """The rules bound to the source keys as the key rules name them (`--strip-prefix`,
    `--rename`: the wrapper prefixes stripped automatically are not, the rules name keys)."""
    if not options.rules:
        return RulePlan()
    seen, _ = options.keys.apply([e.name for e in source])
    return plan_rules(options.rules, source, target, dict(options.rule_args), seen, options.adapt)


def source_names(source: Sequence[str], target: Sequence[str], options: PortOptions) -> dict[str, str]:
    """Each source key (kept by the key rules) -> its name after them, as `plan_port` names
    it: what a key was called when it was paired, or found no pair."""
    if options.mapping is not None:
        return {name: name for name in source}
    return _renamed(source, target, options)[0]


def _renamed(
    source: Sequence[str], target: Sequence[str], options: PortOptions
) -> tuple[dict[str, str], list[str]]:
    """The key rules on the source names (`module.` stripped when that makes them the
    target's): kept name -> new name, and the steps taken."""
    return options.keys.apply(source, auto=lambda names: auto_strip(names, target, options.extracted))
