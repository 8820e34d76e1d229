"""What the user said would not come from the source, and the plan read with it.

A port that replaces a head (`--num-classes 5`, `--replace fc=...`), adds a module, or is
told `--allow-missing GLOB` expects some target keys to find nothing in the source: they
are *new*, not missing. The source's keys under a replaced or removed module (or named by
`--allow-unexpected GLOB`) are *unused* by intent, not unexpected, and a pair of them
with a new target key is not a mismatch. A strict port refuses only what nobody asked for.

Pure functions over names: nothing here reads a tensor or builds a module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from surgery.names import matches
from surgery.plans.match import PortPlan


@dataclass(frozen=True)
class Intent:
    """Module paths the edits created or removed, and the globs the user allowed."""

    created: tuple[str, ...] = ()  # target modules edits replaced or added: their keys are new
    removed: tuple[str, ...] = ()  # modules edits deleted or dropped: the source's keys there go unused
    allow_missing: tuple[str, ...] = ()  # globs on target keys
    allow_unexpected: tuple[str, ...] = ()  # globs on source keys, as in the file or as renamed

    @property
    def empty(self) -> bool:
        return not (self.created or self.removed or self.allow_missing or self.allow_unexpected)


def under(name: str, modules: Sequence[str]) -> bool:
    """Whether `name` is one of `modules` or inside one (`fc.weight` is under `fc`, `fc2.weight` is not)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def with_intent(plan: PortPlan, intent: Intent, renamed: Mapping[str, str]) -> PortPlan:
    """The plan with what the user expected moved out of missing, mismatched and unexpected.

    Args:
        plan: the judged plan.
        intent: what the edits and the allow globs say.
        renamed: source key -> its name after the key rules (`match.source_names`): a source
            key is under a replaced module by that name, as the target names it.

    Example:
        >>> from surgery.plans.match import Mismatched
        >>> plan = PortPlan((), (Mismatched("fc.weight", "fc.weight", (1000, 512), (5, 512)),), (), ())
        >>> with_intent(plan, Intent(created=("fc",)), {"fc.weight": "fc.weight"}).new
        ('fc.weight',)
    """
    if intent.empty:
        return plan

    def is_new(target: str) -> bool:
        return under(target, intent.created) or matches(target, intent.allow_missing)

    def is_unused(source: str) -> bool:
        name = renamed.get(source, source)
        return (
            under(name, intent.created + intent.removed)
            or matches(name, intent.allow_unexpected)
            or matches(source, intent.allow_unexpected)
        )

    replaced_pairs = [m for m in plan.mismatched if is_new(m.target)]
    new = [m.target for m in replaced_pairs] + [t for t in plan.missing if is_new(t)]
    unused = [m.source for m in replaced_pairs] + [s for s in plan.unexpected if is_unused(s)]
    if not new and not unused:
        return plan
    counts = [
        f"{len(new)} target keys new" if new else "",
        f"{len(unused)} source keys unused" if unused else "",
    ]
    steps = (
        *plan.steps,
        "expected by the edits and --allow-*: " + ", ".join(filter(None, counts)),
    )
    new_keys, unused_keys = set(new), set(unused)  # target names and source names: kept apart
    return replace(
        plan,
        mismatched=tuple(m for m in plan.mismatched if m not in replaced_pairs),
        missing=tuple(t for t in plan.missing if t not in new_keys),
        unexpected=tuple(s for s in plan.unexpected if s not in unused_keys),
        new=(*plan.new, *new),
        unused=(*plan.unused, *unused),
        steps=steps,
    )
