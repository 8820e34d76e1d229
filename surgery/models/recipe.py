"""A fine-tune-ready checkpoint: weights plus the recipe that rebuilds model and optimizer groups.

`surgery port ... -o ready.safetensors` stores the recipe (target, edits in order,
initialisation, key mapping, freeze and learning-rate rules) in the file's
metadata. `load_ready(path)` replays it: builds the target, replays the edits,
loads the weights strictly, applies the freeze plan and builds the parameter
groups, with no pickled code anywhere. (A recipe *file* for `surgery port
--recipe` is a `PortRequest` written as TOML: see `PortRequest.from_file`.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError
from surgery.models.edit import Edit
from surgery.models.finetune import FinetunePlan, FinetuneSummary
from surgery.trust import RECIPE_KEY, require_trust

if TYPE_CHECKING:
    from torch import nn

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    target: str
    edits: tuple[Edit, ...] = ()
    init: str | None = None
    finetune: FinetunePlan = field(default_factory=FinetunePlan)
    mapping: dict[str, str] = field(default_factory=dict)  # source key -> target key, as loaded

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_recipe": RECIPE_VERSION,
            "target": self.target,
            "edits": [e.to_json() for e in self.edits],
            "init": self.init,
            "finetune": self.finetune.to_json(),
            "mapping": self.mapping,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Recipe:
        return cls(
            doc["target"],
            tuple(Edit.from_json(e) for e in doc.get("edits", [])),
            doc.get("init"),
            FinetunePlan.from_json(doc.get("finetune", {})),
            dict(doc.get("mapping", {})),
        )


@dataclass
class Ready:
    """What `load_ready` gives a training script."""

    model: nn.Module
    param_groups: list[dict[str, Any]]
    recipe: Recipe
    summary: FinetuneSummary


def recipe_of(metadata: dict[str, Any]) -> Recipe | None:
    text = (metadata.get("metadata") or {}).get(RECIPE_KEY)
    if not text:
        return None
    return Recipe.from_json(json.loads(text))


def load_ready(path: str | Path, *, trust: bool = False) -> Ready:
    """Rebuild a fine-tune-ready model from a file `surgery port` wrote.

    Args:
        trust: build a `package.module:callable` target named by the file's recipe.
            Without it only library targets (torchvision, timm) are built: a name
            read from a file is never imported unasked.

    Returns:
        Ready with `.model` (weights loaded strictly, frozen set applied), `.param_groups`
        (for `torch.optim.SGD(ready.param_groups, momentum=0.9)`), `.recipe`, `.summary`.

    Raises:
        Untrusted: the recipe's target would import code and `trust` is not set.
        SurgeryError: the file holds no recipe, or its weights do not fit the rebuilt model.

    Example:
        >>> ready = surgery.load_ready("ready.safetensors")
        >>> optimizer = torch.optim.SGD(ready.param_groups, lr=1e-3, momentum=0.9)
        >>> surgery.set_lr(optimizer, "head", 1e-4)  # later, keeping the momentum
    """
    from surgery.formats.checkpoint import open_checkpoint, open_trusted
    from surgery.models.edit import apply
    from surgery.models.finetune import apply_freeze, param_groups, summarize
    from surgery.models.targets import build_target

    ckpt = open_checkpoint(path)
    recipe = recipe_of(ckpt.metadata)
    if recipe is None:
        raise SurgeryError(path, "no recipe in this file", hint="write one with surgery port ... -o OUT")
    require_trust(recipe.target, path, trust=trust, named_by="the file's recipe")
    open_trusted(ckpt, trust=trust, purpose="load")  # the same refusals as a port's source
    target = build_target(recipe.target)
    model = target.module
    if model is None:
        raise SurgeryError(path, f"the recipe's target {recipe.target!r} builds no module")
    for edit in recipe.edits:
        model, _, _ = apply(model, edit, adapt_weights=False)
    try:
        model.load_state_dict(ckpt.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise SurgeryError(path, f"the weights do not fit the rebuilt model: {first}") from None
    warnings = apply_freeze(model, recipe.finetune)
    groups, more = param_groups(model, recipe.finetune)
    return Ready(model, groups, recipe, summarize(model, groups, warnings + more, recipe.finetune))
