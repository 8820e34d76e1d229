"""The fine-tune plan: which parameters train, in which named optimizer group, at which rate.

    --freeze '*' --unfreeze 'fc.*'           the fixed-feature-extractor recipe
    --lr head:fc.*=1e-2 --base-lr 1e-3       the new head faster than the rest
    --weight-decay 1e-4 --layer-decay 0.75   no decay on biases and norms; rates decay from the head down

Groups hold parameters by identity (never by value), each trainable parameter in
exactly one group, frozen ones in none, and carry a name so a training script can
change one group's rate mid-run: `surgery.set_lr(optimizer, "head", 1e-4)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgery.errors import BadArgument
from surgery.names import matches_any

if TYPE_CHECKING:
    import torch
    from torch import nn

BASE_GROUP = "base"
NO_DECAY = "/no_decay"


@dataclass(frozen=True)
class LrRule:
    """`--lr [NAME:]GLOB=VALUE`: parameters matching GLOB train at VALUE, in group NAME (or GLOB)."""

    name: str
    glob: str
    lr: float

    @classmethod
    def parse(cls, text: str) -> LrRule:
        spec, sep, value = text.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if not sep or not spec or not math.isfinite(lr) or lr < 0:
            raise BadArgument("lr", f"{text!r} is not [NAME:]GLOB=VALUE with a non-negative VALUE")
        name, colon, glob = spec.partition(":")
        return cls(name, glob, lr) if colon and glob else cls(spec, spec, lr)

    def __str__(self) -> str:
        prefix = f"{self.name}:" if self.name != self.glob else ""
        return f"{prefix}{self.glob}={self.lr:g}"


@dataclass(frozen=True)
class FinetunePlan:
    freeze: tuple[tuple[str, str], ...] = ()  # ("freeze" | "unfreeze", glob), in order
    freeze_bn: bool = False
    lr: tuple[LrRule, ...] = ()
    base_lr: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "freeze": [list(r) for r in self.freeze],
            "freeze_bn": self.freeze_bn,
            "lr": [{"name": r.name, "glob": r.glob, "lr": r.lr} for r in self.lr],
            "base_lr": self.base_lr,
            "weight_decay": self.weight_decay,
            "layer_decay": self.layer_decay,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FinetunePlan:
        return cls(
            tuple((a, g) for a, g in doc.get("freeze", [])),
            bool(doc.get("freeze_bn", False)),
            tuple(LrRule(r["name"], r["glob"], float(r["lr"])) for r in doc.get("lr", [])),
            doc.get("base_lr"),
            doc.get("weight_decay"),
            doc.get("layer_decay"),
        )

    @property
    def empty(self) -> bool:
        return self == FinetunePlan()

    def __post_init__(self) -> None:
        for param, value in (("base_lr", self.base_lr), ("weight_decay", self.weight_decay)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise BadArgument(param, f"{value!r} must be a finite number, 0 or more")
        if self.layer_decay is not None and not (math.isfinite(self.layer_decay) and self.layer_decay > 0):
            raise BadArgument("layer_decay", f"{self.layer_decay!r} must be a finite number above 0")


def _names_by_param(model: nn.Module) -> list[tuple[Any, list[str]]]:
    """Each parameter once, by identity, with every name it has (a tied weight has two).

    Raises:
        SurgeryError: a lazy parameter not initialised yet (it cannot be frozen, and its
            shape, which decides its weight decay, is unknown).
    """
    from surgery.models.targets import refuse_lazy

    refuse_lazy(model, type(model).__name__)
    out: dict[int, tuple[Any, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(param), (param, []))[1].append(name)
    return list(out.values())


def apply_freeze(model: nn.Module, plan: FinetunePlan) -> list[str]:
    """Set requires_grad by the plan, rule by rule, on every parameter any of whose
    names matches (a tied weight through either name). With freeze_bn, BatchNorm layers
    keep their statistics (eval behaviour even under model.train()) and their
    parameters freeze. Returns a warning for each rule that matches nothing.
    """
    import torch.nn as tnn

    params = _names_by_param(model)
    for param, _ in params:
        param.requires_grad_(True)
    warnings = []
    for action, glob in plan.freeze:
        hit = [param for param, names in params if matches_any(names, glob)]
        if not hit:
            warnings.append(f"--{action} {glob!r} matches no parameter")
        for param in hit:
            param.requires_grad_(action == "unfreeze")
    if plan.freeze_bn:
        from surgery.frozen_bn import freeze_batchnorm

        for module in model.modules():
            if isinstance(module, tnn.modules.batchnorm._BatchNorm):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
                freeze_batchnorm(module)
    return warnings


def param_groups(model: nn.Module, plan: FinetunePlan) -> tuple[list[dict[str, Any]], list[str]]:
    """Optimizer parameter groups for the trainable parameters, by the plan's rules.

    Returns:
        (groups, warnings): each group a dict with `name`, `params` (the Parameter
        objects), `lr` (when known) and `weight_decay` (when set), ready for
        `torch.optim.SGD(groups, momentum=0.9)`.

    With `layer_decay` each group is split by layer (`NAME/layerN`, see `layer_ids`) and
    its rate scaled by layer_decay ** (top layer - N), as timm's `param_groups_layer_decay`.

    Raises:
        BadArgument: an `lr` rule that reaches only frozen parameters.
    """
    params = _names_by_param(model)  # each shared parameter once, by identity
    warnings = []
    for rule in plan.lr:
        hit = [(names, p) for p, names in params if matches_any(names, rule.glob)]
        if hit and not any(p.requires_grad for _, p in hit):
            first = hit[0][0][0]
            raise BadArgument(
                "lr",
                f"{rule} reaches only frozen parameters ({first}, ...): unfreeze them or drop the rule",
            )
        if not hit:
            warnings.append(f"--lr {rule} matches no parameter")
    layers = layer_ids(model) if plan.layer_decay is not None else {}
    depth = max(layers.values(), default=0)
    groups: dict[tuple[str, float | None, bool], dict[str, Any]] = {}
    for param, names in params:
        if not param.requires_grad:
            continue
        rule = next((r for r in plan.lr if matches_any(names, r.glob)), None)
        group, lr = (rule.name, rule.lr) if rule else (BASE_GROUP, plan.base_lr)
        scale = 1.0
        if plan.layer_decay is not None:
            layer = layers.get(names[0], depth)
            scale = plan.layer_decay ** (depth - layer)
            group = f"{group}/layer{layer}"
        lr = lr * scale if lr is not None else None
        decay = plan.weight_decay is not None and param.ndim > 1
        key = (group + ("" if decay or plan.weight_decay is None else NO_DECAY), lr, decay)
        entry = groups.get(key)
        if entry is None:
            entry = groups[key] = {"name": key[0], "params": []}
            if lr is not None:
                entry["lr"] = lr
            if scale != 1.0:
                entry["lr_scale"] = scale  # set_lr keeps the decay when it changes the rate
            if plan.weight_decay is not None:
                entry["weight_decay"] = plan.weight_decay if decay else 0.0
        entry["params"].append(param)
    if plan.layer_decay is not None and groups:
        warnings += _layer_decay_warnings(model, plan, list(groups.values()), depth)
    return list(groups.values()), warnings


def _layer_decay_warnings(
    model: nn.Module, plan: FinetunePlan, groups: list[dict[str, Any]], depth: int
) -> list[str]:
    """A --layer-decay that scales no rate must not pass in silence."""
    flag = f"--layer-decay {plan.layer_decay:g}"
    if len({g.get("lr_scale", 1.0) for g in groups}) == 1:
        if depth == 0:
            why = (
                f"{type(model).__name__} is one layer (no timm group_matcher, no repeated blocks "
                "such as blocks.0, blocks.1 or layer1, layer2)"
            )
        elif plan.layer_decay == 1:
            why = "a factor of 1 keeps every rate"
        else:
            why = "every trainable parameter is in one layer"
        return [f"{flag} changes nothing: {why}"]
    if any("lr" not in g and "lr_scale" in g for g in groups):
        return [
            f"{flag} without --base-lr: the base groups take the optimizer's own lr, unscaled "
            "(torch optimizers ignore lr_scale; surgery.set_lr applies it)"
        ]
    return []


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer for layer-wise decay, by its first name: 0 the input side, the
    highest the head. A timm model's own `group_matcher(coarse=False)` decides, exactly as
    timm's `param_groups_layer_decay` does; any other model is numbered by its structure
    (`layers_by_structure`).
    """
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            from timm.models import group_parameters
        except ImportError:
            pass
        else:
            return group_parameters(model, matcher(coarse=False), reverse=True)
    return layers_by_structure([names[0] for _, names in _names_by_param(model)])


_INDEXED = re.compile(r"(.*?)(\d+)")


def _indexed(part: str) -> tuple[str, int] | None:
    """`12` -> ("", 12), `layer3` -> ("layer", 3), `encoder_layer_0` -> ("encoder_layer_", 0)."""
    found = _INDEXED.fullmatch(part)
    return (found[1], int(found[2])) if found else None


def layers_by_structure(names: Sequence[str]) -> dict[str, int]:
    """Layer of each parameter name (in model order) for a model without a timm group_matcher.

    The repeated blocks are the sibling modules `STEM<i>` (two or more different i under
    one parent: `blocks.0`, `layers.3`, `layer2`, `encoder_layer_5`, `features.7`) that
    hold the most parameters. They are layers 1..n in order, numbered inside where a
    block is a row of indexed blocks itself (resnet's `layer1.0`, `layer1.1`; not a
    Sequential of conv and norm); what comes before the first block (stem, patch
    embedding, cls token, position embedding) is layer 0; what lies between blocks goes
    with the block before it; what follows the last (final norm, head) is layer n + 1.
    Without repeated blocks every name is in layer 0.

    Example:
        >>> layers_by_structure(["conv1.weight", "layer1.0.conv.weight", "layer1.1.conv.weight", "fc.weight"])
        {'conv1.weight': 0, 'layer1.0.conv.weight': 1, 'layer1.1.conv.weight': 2, 'fc.weight': 3}
    """
    split = [tuple(name.split(".")) for name in names]
    children: dict[tuple[str, ...], set[str]] = {}
    composite = set()  # modules holding modules that hold tensors
    sizes: dict[tuple[tuple[str, ...], str], list[int]] = {}  # (parent, stem) -> indices, one per tensor
    for parts in split:
        for depth, part in enumerate(parts):
            children.setdefault(parts[:depth], set()).add(part)
            if depth < len(parts) - 2:
                composite.add(parts[: depth + 1])
            indexed = _indexed(part) if depth < len(parts) - 1 else None  # modules, not tensors
            if indexed:
                sizes.setdefault((parts[:depth], indexed[0]), []).append(indexed[1])
    repeated = [run for run, indices in sizes.items() if len(set(indices)) > 1]
    if not repeated:
        return dict.fromkeys(names, 0)
    parent, stem = max(repeated, key=lambda run: len(sizes[run]))  # the first of equals, in model order
    rows = {node for node, kids in children.items() if _is_row(node, kids, composite)}
    blocks = [_block(parts, parent, stem, rows) for parts in split]
    ids = {block: i for i, block in enumerate(dict.fromkeys(b for b in blocks if b is not None), start=1)}
    last = max(i for i, block in enumerate(blocks) if block is not None)
    out, current = {}, 0
    for i, (name, block) in enumerate(zip(names, blocks, strict=True)):
        current = ids[block] if block is not None else current
        out[name] = len(ids) + 1 if i > last else current
    return out


def _is_row(node: tuple[str, ...], kids: set[str], composite: set[tuple[str, ...]]) -> bool:
    """A module whose children are all blocks `STEM<i>` of one stem (resnet's `layer1`)."""
    indexed = [_indexed(kid) for kid in kids]
    return (
        all(indexed)
        and len({i[0] for i in indexed if i}) == 1
        and all(node + (k,) in composite for k in kids)
    )


def _block(
    parts: tuple[str, ...], parent: tuple[str, ...], stem: str, rows: set[tuple[str, ...]]
) -> tuple[int, ...] | None:
    """The indices of the block a name lies in (`layer2.1.conv1.weight` -> (2, 1)), or None."""
    depth = len(parent)
    if len(parts) < depth + 2 or parts[:depth] != parent:
        return None
    indexed = _indexed(parts[depth])
    if indexed is None or indexed[0] != stem:
        return None
    block = [indexed[1]]
    while parts[: depth + len(block)] in rows:  # a row: every child is indexed
        block.append(_indexed(parts[depth + len(block)])[1])  # type: ignore[index]
    return tuple(block)


def set_lr(optimizer: torch.optim.Optimizer, name: str, lr: float) -> int:
    """Change the learning rate of the groups named `name` (and its `/no_decay` and
    `/layerN` parts, each keeping its layer-decay scale) in place: the optimizer keeps
    its state (momentum, Adam moments), which rebuilding it would lose. Returns how
    many groups changed.

    Raises:
        KeyError: no group of that name, naming the groups there are.
    """
    pattern = re.compile(rf"{re.escape(name)}(/.*)?$")
    changed = 0
    for group in optimizer.param_groups:
        if pattern.match(str(group.get("name", ""))):
            group["lr"] = lr * group.get("lr_scale", 1.0)
            changed += 1
    if not changed:
        names = sorted({str(g.get("name")) for g in optimizer.param_groups})
        raise KeyError(f"no parameter group named {name!r}; there are {', '.join(names)}")
    return changed


@dataclass(frozen=True)
class GroupSummary:
    name: str
    lr: float | None
    weight_decay: float | None
    tensors: int
    params: int


@dataclass(frozen=True)
class FinetuneSummary:
    """What the report shows: per top-level module trainable/frozen counts, and each group."""

    modules: tuple[tuple[str, int, int], ...]  # (module, trainable elements, frozen elements)
    groups: tuple[GroupSummary, ...]
    frozen_bn: int
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "modules": [{"module": m, "trainable": t, "frozen": f} for m, t, f in self.modules],
            "groups": [g.__dict__ for g in self.groups],
            "frozen_bn": self.frozen_bn,
            "warnings": list(self.warnings),
        }


def summarize(
    model: nn.Module, groups: list[dict[str, Any]], warnings: Sequence[str], plan: FinetunePlan
) -> FinetuneSummary:
    import torch.nn as tnn

    per_module: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        counts = per_module.setdefault(name.split(".")[0], [0, 0])
        counts[0 if param.requires_grad else 1] += param.numel()
    frozen_bn = (
        sum(isinstance(m, tnn.modules.batchnorm._BatchNorm) for m in model.modules()) if plan.freeze_bn else 0
    )
    return FinetuneSummary(
        tuple((m, t, f) for m, (t, f) in per_module.items()),
        tuple(
            GroupSummary(
                g["name"],
                g.get("lr"),
                g.get("weight_decay"),
                len(g["params"]),
                sum(p.numel() for p in g["params"]),
            )
            for g in groups
        ),
        frozen_bn,
        tuple(warnings),
    )
