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
from collections.abc import Callable
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


def _load_sharded(model: nn.Module, ckpt: Any, shard: Callable[[nn.Module], Any], path: str | Path) -> None:
    """The meta-built model sharded by `shard`, materialised, and each rank's blocks read.

    Raises:
        SurgeryError: buffers the file cannot fill (not saved in a state_dict: they would hold
            whatever memory `to_empty` gave them), or weights that do not fit the model.
    """
    persistent = set(model.state_dict())
    unsaved = [name for name, _ in model.named_buffers() if name not in persistent]
    if unsaved:
        raise SurgeryError(
            path,
            f"cannot load sharded: {len(unsaved)} buffers are not in any state_dict ({', '.join(unsaved[:3])}); "
            "built on the meta device they would hold garbage",
            hint="load without shard=, then shard the loaded model",
        )
    import torch

    from surgery.models.loading import copy_into

    shard(model)
    if any(t.is_meta for t in model.state_dict().values()):
        model.to_empty(device="cpu")
    state = model.state_dict(keep_vars=True)
    held = ckpt.tensors_by_name
    wrong = [n for n, t in state.items() if n not in held or tuple(held[n].shape) != tuple(t.shape)]
    extra = [n for n in held if n not in state]
    if wrong or extra:
        first = (wrong or extra)[0]
        raise SurgeryError(
            path,
            f"the weights do not fit the rebuilt model: {len(wrong)} of its tensors missing or of another "
            f"shape, {len(extra)} more in the file (first: {first})",
        )
    with torch.no_grad():
        for name, tensor in state.items():
            copy_into(tensor, ckpt, name)


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


def load_ready(
    path: str | Path, *, trust: bool = False, shard: Callable[[nn.Module], Any] | None = None
) -> Ready:
    """Rebuild a fine-tune-ready model from a file `surgery port` wrote.

    Args:
        trust: build a `package.module:callable` target named by the file's recipe.
            Without it only library targets (torchvision, timm) are built: a name
            read from a file is never imported unasked.
        shard: run on every rank of a process group: the model is built on the meta device,
            `shard(model)` shards it (FSDP2's `fully_shard` per block; it may also move it with
            `to_empty`, else it is materialised on the CPU), and each rank reads only its own
            block of each tensor: no rank holds the whole model.

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
    target = build_target(recipe.target, meta=shard is not None)
    model = target.module
    if model is None:
        raise SurgeryError(path, f"the recipe's target {recipe.target!r} builds no module")
    for edit in recipe.edits:
        model, _, _ = apply(model, edit, adapt_weights=False)
    if shard is not None:
        _load_sharded(model, ckpt, shard, path)
    else:
        try:
            model.load_state_dict(ckpt.state_dict(), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise SurgeryError(path, f"the weights do not fit the rebuilt model: {first}") from None
    warnings = apply_freeze(model, recipe.finetune)
    groups, more = param_groups(model, recipe.finetune)
    return Ready(model, groups, recipe, summarize(model, groups, warnings + more, recipe.finetune))
