"""Mismatched tensors that a known adaptation loads (`--adapt`), as rules.

Only where the shapes differ the way timm itself adapts on load, or a vocabulary or a
classifier grows or shrinks: a position embedding on another grid (class and register
tokens kept), a patch embedding with another kernel, an embedding or output matrix with
more or fewer rows, a classifier with more or fewer classes. Each becomes a one-key rule
(`plans.rules`), so what `--adapt` does is reported, planned and applied like any rule;
without `--adapt` the mismatch says what `--adapt` would do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from surgery.plans.rules import Rule, RuleSet
from surgery.values import Shape

if TYPE_CHECKING:
    from surgery.plans.match import Mismatched, PortPlan

VOCAB_WORDS = ("embed", "wte", "tok", "lm_head", "output", "word")
CLASSIFIER_WORDS = ("fc", "head", "classifier", "last_linear", "logits")
MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens before a position grid


@dataclass(frozen=True)
class Adaptation:
    source: str
    target: str
    op: dict[str, Any] | None  # None: the target keeps its own tensor (a classifier for other classes)
    what: str  # "the position grid 14x14 -> 24x24"


def adaptation(source: str, target: str, s: Shape, t: Shape) -> Adaptation | None:
    """The adaptation that loads `source` (of shape `s`) into `target` (`t`), or None when
    the shapes are not one of the known kinds (the target key's name must say which, too)."""
    module, _, leaf = target.rpartition(".")
    words = target.lower()
    if len(s) == 3 and "pos" in leaf.lower() + module.rsplit(".", 1)[-1].lower():
        prefix = _prefix_tokens(s, t)
        if prefix is not None:
            old, new = math.isqrt(s[1] - prefix), math.isqrt(t[1] - prefix)
            kept = f"{prefix} prefix token{'s' if prefix != 1 else ''} kept" if prefix else "no prefix tokens"
            what = f"the position grid {old}x{old} -> {new}x{new} ({kept})"
            return Adaptation(source, target, {"op": "resample_pos_embed", "prefix_tokens": prefix}, what)
    if len(s) == 4 and s[:2] == t[:2] and ("patch" in words or "proj" in words):
        what = f"the patch kernel {s[2]}x{s[3]} -> {t[2]}x{t[3]}"
        return Adaptation(source, target, {"op": "resample_patch_embed"}, what)
    if not s or len(s) != len(t) or s[1:] != t[1:] or len(s) > 2:
        return None
    last = module.rsplit(".", 1)[-1].lower()
    if len(s) == 2 and any(w in last for w in VOCAB_WORDS) and not any(w == last for w in CLASSIFIER_WORDS):
        what = f"the vocabulary {s[0]} -> {t[0]} rows" + (
            " (new rows the mean of the old)" if t[0] > s[0] else ""
        )
        return Adaptation(source, target, {"op": "resize_rows", "init": "mean"}, what)
    if any(w in module.lower().split(".")[-1] for w in CLASSIFIER_WORDS):
        what = f"the classes {s[0]} -> {t[0]}: the target's own classifier kept, as timm does on load"
        return Adaptation(source, target, None, what)
    return None


def _prefix_tokens(s: Shape, t: Shape) -> int | None:
    """The fewest leading tokens that leave both sides a square grid of different sizes."""
    if s[0] != 1 or t[0] != 1 or s[2] != t[2]:
        return None
    for p in range(min(MAX_PREFIX_TOKENS, s[1], t[1]) + 1):
        a, b = s[1] - p, t[1] - p
        if a > 0 and b > 0 and math.isqrt(a) ** 2 == a and math.isqrt(b) ** 2 == b and a != b:
            return p
    return None


def adaptations(plan: PortPlan) -> list[Adaptation]:
    found = (adaptation(m.source, m.target, m.source_shape, m.target_shape) for m in plan.mismatched)
    return [a for a in found if a is not None]


def as_rules(found: list[Adaptation], seen: Mapping[str, str]) -> RuleSet:
    """The adaptations that transform a tensor as a rule set; `seen`: file name -> the name rules match."""
    rules = tuple(
        Rule((seen.get(a.source, a.source),), (a.target,), (a.op,), where=a.target)
        for a in found
        if a.op is not None
    )
    return RuleSet(rules, "--adapt")


def kept_heads(found: list[Adaptation]) -> tuple[str, ...]:
    """The classifier modules the target keeps (new, as if an edit had made them)."""
    return tuple(dict.fromkeys(a.target.rpartition(".")[0] for a in found if a.op is None))


def with_adapt_hints(plan: PortPlan) -> tuple[PortPlan, list[str]]:
    """The plan with each mismatch `--adapt` would load saying how, and a hint. (A classifier
    for other classes is not loaded either way: `--adapt` only calls it new.)"""
    found = {(a.source, a.target): a for a in adaptations(plan) if a.op is not None}
    if not found:
        return plan, []

    def said(m: Mismatched) -> str:
        what = f"--adapt: {found[m.source, m.target].what}"
        return f"{m.reason}; {what}" if m.reason else what

    mismatched = tuple(
        replace(m, reason=said(m)) if (m.source, m.target) in found else m for m in plan.mismatched
    )
    return replace(plan, mismatched=mismatched), [f"--adapt would adapt {len(found)} mismatched tensors"]
