"""Pairing source keys with target keys, and judging each pair by its shape.

Pure functions over names and shapes: nothing here reads a tensor or a file.
The result is a `PortPlan` (matched, mismatched, missing, unexpected), which
`surgery.port` applies, and which `--dry-run` and `--plan-out` show as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import BadArgument
from surgery.names import WRAPPER_PREFIXES, common_prefix, wrapper_prefixes
from surgery.plans import keys
from surgery.values import Entry, Shape

MODES = ("exact", "suffix", "order", "auto")


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

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "target": self.target,
            "source_shape": list(self.source_shape),
            "target_shape": list(self.target_shape),
        }


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
    new: tuple[str, ...] = ()  # target keys not expected from the source (edits, --allow-missing)
    unused: tuple[str, ...] = ()  # source keys left unused by intent (replaced, removed, --allow-unexpected)

    @property
    def complete(self) -> bool:
        """Nothing missing, unexpected or mismatched: what `--strict true` requires (keys
        `new` and `unused` by the user's intent are none of these)."""
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

    Raises:
        MatchError: with `refuse`, when the counts differ or a pair's shapes differ
            (the structures do not line up), naming the first divergence.
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
    if problem:
        if refuse:
            raise MatchError(f"cannot pair keys by order: {problem}")
        return []
    return [Pair(s.name, t.name, "order") for s, t in zip(source, target, strict=True)]


def pair(source: Sequence[Entry], renamed: dict[str, str], target: Sequence[Entry], mode: str) -> list[Pair]:
    """Pairs by `mode`: exact, suffix, order, or auto (exact, then unambiguous suffix,
    then order on what is left when it lines up exactly).

    Args:
        source: source entries under their original names, in file order.
        renamed: original source name -> name after the key pipeline (kept keys only).
        target: target entries in the target's order.
    """
    target_names = [t.name for t in target]
    if mode == "exact":
        return pair_exact(renamed, target_names)
    if mode == "suffix":
        return pair_suffix(renamed, target_names, ambiguous_is_error=True)
    by_name = {e.name: e for e in source}
    if mode == "order":
        return pair_order([by_name[s] for s in renamed], target, refuse=True)
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
    left_s = [by_name[s] for s in renamed if s not in used_s]
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
    different shape (Linear <-> 1x1 conv) loads only with `reshape`.

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
    for p in pairs:
        s, t = src[p.source], tgt[p.target]
        cast = (s.dtype, t.dtype) if s.dtype != t.dtype else None
        if s.shape == t.shape:
            matched.append(Matched(p.source, p.target, t.shape, p.how, None, cast))
        elif reshape and s.numel == t.numel:
            matched.append(Matched(p.source, p.target, t.shape, p.how, s.shape, cast))
        else:
            mismatched.append(Mismatched(p.source, p.target, s.shape, t.shape))
    steps = list(steps)
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
        }


def plan_port(
    source: Sequence[Entry],
    target: Sequence[Entry],
    options: PortOptions,
    ties: dict[str, str] | None = None,
    source_ties: dict[str, str] | None = None,
) -> PortPlan:
    """The key pipeline, on names and shapes alone.

    Args:
        ties, source_ties: keys sharing storage in the target and in the source.

    Raises:
        BadArgument: a key rule makes two keys collide, or a plan names unknown keys.
        MatchError: the keys cannot be paired as `options.match` asks.
    """
    if options.mapping is not None:
        return _apply_mapping(source, target, options, ties, source_ties)
    target_names = [t.name for t in target]
    kept, steps = options.keys.apply(
        [e.name for e in source], auto=lambda names: auto_strip(names, target_names, options.extracted)
    )
    pairs = pair(source, kept, target, options.match)
    hows = {"name": "exact", "dotted suffix": "suffix", "position": "order"}
    counts = [f"{n} by {label}" for label, how in hows.items() if (n := sum(p.how == how for p in pairs))]
    steps.append(f"--match {options.match}: " + (", ".join(counts) if counts else "no pairs"))
    return judge(
        pairs,
        source,
        target,
        reshape=options.reshape,
        ties=ties,
        source_ties=source_ties,
        kept=set(kept),
        steps=steps,
    )


def _apply_mapping(
    source: Sequence[Entry],
    target: Sequence[Entry],
    options: PortOptions,
    ties: dict[str, str] | None,
    source_ties: dict[str, str] | None,
) -> PortPlan:
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
    pairs = [Pair(s, t, "plan") for s, t in mapping.items()]
    steps = [f"applied a plan of {len(pairs)} pairs"]
    return judge(
        pairs, source, target, reshape=options.reshape, ties=ties, source_ties=source_ties, steps=steps
    )


def source_names(source: Sequence[str], target: Sequence[str], options: PortOptions) -> dict[str, str]:
    """Each source key (kept by the key rules) -> its name after them, as `plan_port` names
    it: what a key was called when it was paired, or found no pair."""
    if options.mapping is not None:
        return {name: name for name in source}
    kept, _ = options.keys.apply(source, auto=lambda names: auto_strip(names, target, options.extracted))
    return kept
