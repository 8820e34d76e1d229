"""Mismatched tensors that a known adaptation loads (`--adapt`), as rules.

Only where the shapes differ the way timm itself adapts on load, or a vocabulary or a
classifier grows or shrinks: a position embedding on another grid (class and register
tokens kept), a patch embedding with another kernel, a token embedding or output matrix
with more or fewer rows, a classifier with more or fewer classes. The key's name must say
which kind it is as well as its shapes: a conv, a norm or an MLP layer of another width, a
position or token-type table with more rows, stay mismatched. Each becomes a one-key rule
(`plans.rules`), so what `--adapt` does is reported, planned and applied like any rule;
without `--adapt` the mismatch says what `--adapt` would do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from surgery.plans.rules import Rule, RuleSet
from surgery.values import Shape

if TYPE_CHECKING:
    from surgery.plans.match import Mismatched, PortPlan

# A token embedding or an output projection over the vocabulary: its module's last name
# holds one of these words, and none of NOT_VOCAB (positions, token types, patches).
VOCAB_WORDS = ("embed", "wte", "tok", "lm_head", "word", "shared")
NOT_VOCAB = ("pos", "type", "segment", "patch")
VOCAB_MODULES = ("output",)  # Meta Llama's `output`: only as the whole name
# A classifier: one segment of its module's path is one of these (`fc`, `head.fc`, `classifier.6`).
CLASSIFIER_MODULES = ("fc", "head", "heads", "classifier", "last_linear", "logits")
PATCH_MODULES = ("conv_proj",)  # torchvision's ViT; else a module named `patch...`
POSITION = re.compile(r"(^|[._])pos")  # pos_embed, position_embeddings, embed_positions
MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens before a position grid

Grids = Mapping[str, tuple[int, int]]  # position-embedding key -> its patch grid (rows, columns)


@dataclass(frozen=True)
class Adaptation:
    source: str
    target: str
    op: dict[str, Any] | None  # None: the target keeps its own tensor (a classifier for other classes)
    what: str  # "the position grid 14x14 -> 24x24 (1 prefix token kept)"
    tied_to: str | None = None  # the target key this one shares storage with, adapted once


def adaptation(
    source: str, target: str, s: Shape, t: Shape, grid: tuple[int, int] | None = None
) -> Adaptation | None:
    """The adaptation that transforms `source` (of shape `s`) into `target` (`t`), or None
    when the shapes are not one of the known kinds or the target key's name does not say it
    is that kind. (Classifiers are judged a module at a time: `classifiers`.)

    Args:
        grid: the target's patch grid, where its module says (`position_grids`): the
            tokens before a position grid are then counted, not guessed.
    """
    module, _, leaf = target.rpartition(".")
    segments = module.lower().split(".") if module else []
    last = segments[-1] if segments else ""
    if len(s) == 3 and (POSITION.search(leaf.lower()) or POSITION.search(last)):
        return _position(source, target, s, t, grid)
    if len(s) == 4 and len(t) == 4 and s[:2] == t[:2] and (last in PATCH_MODULES or _patch(segments)):
        what = f"the patch kernel {s[2]}x{s[3]} -> {t[2]}x{t[3]}"
        return Adaptation(source, target, {"op": "resample_patch_embed"}, what)
    if len(s) == 2 and len(t) == 2 and s[1] == t[1] and _vocabulary(last):
        what = f"the vocabulary {s[0]} -> {t[0]} rows" + (
            " (new rows the mean of the old)" if t[0] > s[0] else ""
        )
        return Adaptation(source, target, {"op": "resize_rows", "init": "mean"}, what)
    return None


def _position(
    source: str, target: str, s: Shape, t: Shape, grid: tuple[int, int] | None
) -> Adaptation | None:
    """A [1, prefix + h*w, dim] position embedding to another square grid."""
    if len(t) != 3 or s[0] != 1 or t[0] != 1 or s[2] != t[2]:
        return None
    if grid is None:
        prefix = _prefix_tokens(s, t)
    elif grid[0] == grid[1] and t[1] >= grid[0] * grid[1] and _square(s[1] - t[1] + grid[0] * grid[1]):
        prefix = t[1] - grid[0] * grid[1]
    else:  # a grid of another shape, or a source laid out with other prefix tokens
        prefix = None
    if prefix is None:
        return None
    old, new = math.isqrt(s[1] - prefix), math.isqrt(t[1] - prefix)
    kept = {0: "no prefix tokens", 1: "1 prefix token kept"}.get(prefix, f"{prefix} prefix tokens kept")
    what = f"the position grid {old}x{old} -> {new}x{new} ({kept})"
    return Adaptation(source, target, {"op": "resample_pos_embed", "prefix_tokens": prefix}, what)


def _prefix_tokens(s: Shape, t: Shape) -> int | None:
    """With no module to ask: the fewest leading tokens that leave both sides a square
    grid, of different sizes and at least 2x2 (a 1x1 'grid' is what a wrong count leaves)."""
    for p in range(min(MAX_PREFIX_TOKENS, s[1], t[1]) + 1):
        a, b = s[1] - p, t[1] - p
        if a != b and a >= 4 and b >= 4 and _square(a) and _square(b):
            return p
    return None


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _patch(segments: Sequence[str]) -> bool:
    return any(seg.startswith("patch") for seg in segments)


def _vocabulary(last: str) -> bool:
    if last in VOCAB_MODULES:
        return True
    return any(w in last for w in VOCAB_WORDS) and not any(w in last for w in NOT_VOCAB)


def classifiers(plan: PortPlan, taken: Collection[str] = ()) -> list[Adaptation]:
    """The classifiers for another number of classes, kept as the target's own: a module
    named like one (`fc`, `head`, `classifier`, ...) whose mismatched tensors are exactly
    its weight [classes, features] and its bias [classes], gaining or losing the same rows,
    and whose outputs no other mismatched layer reads (not a norm, nor an MLP layer `fc1`,
    nor a hidden layer of a head whose next layer's inputs differ alike).

    Args:
        taken: target keys another adaptation already loads.
    """
    by_module: dict[str, dict[str, Mismatched]] = {}
    fed = {
        (m.source_shape[1], m.target_shape[1])
        for m in plan.mismatched
        if len(m.source_shape) >= 2 and len(m.target_shape) >= 2
    }
    for m in plan.mismatched:
        if m.target not in taken:
            module, _, leaf = m.target.rpartition(".")
            by_module.setdefault(module, {})[leaf] = m
    found = []
    for module, tensors in by_module.items():
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if weight is None or set(tensors) - {"weight", "bias"}:
            continue
        if not any(seg in CLASSIFIER_MODULES for seg in module.lower().split(".")):
            continue
        s, t = weight.source_shape, weight.target_shape
        if len(s) != 2 or len(t) != 2 or s[1] != t[1] or (s[0], t[0]) in fed:  # fed: a layer reads it
            continue
        if bias is not None and (bias.source_shape, bias.target_shape) != ((s[0],), (t[0],)):
            continue
        what = f"the classes {s[0]} -> {t[0]}: the target's own {module} kept, as timm does on load"
        found += [Adaptation(m.source, m.target, None, what) for m in (weight, bias) if m is not None]
    return found


def position_grids(module: Any) -> dict[str, tuple[int, int]]:
    """Position-embedding keys -> the patch grid of the module that holds them, where a
    patch embedding beside them says it: timm's `patch_embed.grid_size`, transformers'
    `patch_embeddings` image and patch sizes. The tokens in front of the grid are then
    whatever the embedding holds beyond it: class and register tokens, or none (timm's
    `no_embed_class`, CaiT), whatever `num_prefix_tokens` says.

    Example:
        >>> position_grids(timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8))
        {'pos_embed': (6, 6)}
    """
    out: dict[str, tuple[int, int]] = {}
    for path, owner in module.named_modules():
        grid = _grid(getattr(owner, "patch_embed", None)) or _grid(getattr(owner, "patch_embeddings", None))
        if grid is None:
            continue
        for name, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            if tensor.dim() == 3 and POSITION.search(name.lower()):
                out[f"{path}.{name}" if path else name] = grid
    return out


def _grid(patch_embed: Any) -> tuple[int, int] | None:
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None:
        image, patch = getattr(patch_embed, "image_size", None), getattr(patch_embed, "patch_size", None)
        if _pair(image) and _pair(patch) and all(patch):
            grid = (image[0] // patch[0], image[1] // patch[1])
    return tuple(grid) if _pair(grid) else None  # type: ignore[return-value]


def _pair(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in value)
    )


def adaptations(
    plan: PortPlan,
    grids: Grids | None = None,
    ties: Mapping[str, str] | None = None,
    source_ties: Mapping[str, str] | None = None,
) -> list[Adaptation]:
    """Every mismatched tensor a known adaptation loads: transformed, or a classifier kept.

    Args:
        grids: the target's patch grids (`position_grids`).
        ties: target alias -> the first key of the same tensor (`Target.aliases`, one way).
        source_ties: the source's tied names, both ways.

    A tied pair (an `lm_head` sharing `wte`'s storage) adapted alike from one source
    tensor is adapted once: the alias is `tied_to` the first key, and filled through it.
    """
    grids = grids or {}
    found = [
        a
        for m in plan.mismatched
        if (a := adaptation(m.source, m.target, m.source_shape, m.target_shape, grids.get(m.target)))
    ]
    ties, source_ties = ties or {}, source_ties or {}
    by_target = {a.target: a for a in found}
    for i, a in enumerate(found):
        first = by_target.get(ties.get(a.target, ""))
        if first is not None and first.op == a.op and source_ties.get(a.source) == first.source:
            found[i] = replace(a, tied_to=first.target, what=f"tied to {first.target}, adapted with it")
    return [*found, *classifiers(plan, set(by_target))]


def as_rules(found: Sequence[Adaptation], seen: Mapping[str, str]) -> RuleSet:
    """The adaptations that transform a tensor as a rule set; `seen`: file name -> the name
    rules match. A tied alias's source name is dropped: the alias is filled as tied."""
    rules = tuple(
        Rule((seen.get(a.source, a.source),), (), (), where=f"{a.target} (tied to {a.tied_to})")
        if a.tied_to is not None
        else Rule((seen.get(a.source, a.source),), (a.target,), (a.op,), where=a.target)
        for a in found
        if a.op is not None
    )
    return RuleSet(rules, "--adapt")


def kept_heads(found: Sequence[Adaptation]) -> tuple[str, ...]:
    """The classifier modules the target keeps (new, as if an edit had made them)."""
    return tuple(dict.fromkeys(a.target.rpartition(".")[0] for a in found if a.op is None))


def adapt_steps(found: Sequence[Adaptation]) -> tuple[str, ...]:
    """One line a module for the report: what `--adapt` did and why."""
    lines = {a.target.rpartition(".")[0] if a.op is None else a.target: a.what for a in found}
    return tuple(f"--adapt {key}: {what}" for key, what in lines.items())


def with_adapt_hints(plan: PortPlan, grids: Grids | None = None) -> tuple[PortPlan, list[str]]:
    """The plan with each mismatch `--adapt` would load saying how, and a hint. (A classifier
    for other classes is not loaded either way: `--adapt` only calls it new.)"""
    found = {(a.source, a.target): a for a in adaptations(plan, grids) if a.op is not None}
    if not found:
        return plan, []

    def said(m: Mismatched) -> str:
        what = f"--adapt: {found[m.source, m.target].what}"
        return f"{m.reason}; {what}" if m.reason else what

    mismatched = tuple(
        replace(m, reason=said(m)) if (m.source, m.target) in found else m for m in plan.mismatched
    )
    return replace(plan, mismatched=mismatched), [f"--adapt would adapt {len(found)} mismatched tensors"]
