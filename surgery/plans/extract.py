"""What `surgery extract` writes for each tensor a fine-tune changed, from names and shapes alone:
LoRA factors for the weights of linear and conv layers, the rest whole as PEFT keeps it.

PEFT decides a LoRA layer's tensor names by the layer's class, which a checkpoint does not record:
a 2-D weight is taken for an `nn.Linear` (GPT-2's `Conv1D` with `fan_in_fan_out`), one of 3 dims
or more for a conv, and a 2-D weight of a module named like an embedding (`wte`, `embed_tokens`)
is kept whole, as PEFT keeps `modules_to_save`: exact, and never a Linear's factors under an
embedding's name. The biases of LoRA layers go as PEFT saves trained biases (`base_layer.bias`);
every other changed tensor takes its whole module into `modules_to_save`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from surgery.errors import SurgeryError

EMBEDDINGS = ("wte", "wpe", "shared")  # embeddings by name, besides any name holding "embed"
SHOWN = 4


def is_embedding(module: str) -> bool:
    """A module named as embeddings are (`transformer.wte`, `model.embed_tokens`)."""
    leaf = module.rpartition(".")[2]
    return leaf in EMBEDDINGS or "embed" in leaf


def lora_layout(name: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
    """The LoRA layout a changed tensor is written in (`plans.adapters`), or None: kept whole."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or not module or is_embedding(module) or len(shape) < 2:
        return None
    if len(shape) == 2:
        return "fan_in_fan_out" if fan_in_fan_out else "linear"
    return "conv"


@dataclass(frozen=True)
class ExtractLayout:
    """Where each changed tensor goes in the adapter."""

    lora: dict[str, str]  # weight name -> its layout (linear | fan_in_fan_out | conv)
    biases: list[str]  # biases of LoRA layers: saved as `<module>.base_layer.bias`
    modules: list[str]  # modules_to_save: each saved whole (every tensor of it)
    whole: list[str]  # the tensors those modules hold

    @property
    def targets(self) -> list[str]:
        """The LoRA layers' module names: the config's `target_modules`."""
        return [name.rpartition(".")[0] for name in self.lora]


def extract_layout(
    changed: list[str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    fan_in_fan_out: bool = False,
    tied: Collection[str] = (),
) -> ExtractLayout:
    """Where each changed tensor goes: LoRA factors, a LoRA layer's bias, or its module whole.

    Args:
        changed: the names of the tensors the fine-tune changed, in order.
        shapes: every tensor of the checkpoint, by name.
        tied: names that are one tensor with another name (GPT-2's `lm_head` and `wte`): kept
            whole, both, since PEFT unties what it saves whole and factors by each layer's class.

    Raises:
        SurgeryError: changed tensors a PEFT adapter cannot hold: at the top level (no module to
            save), or a module to save whole that holds LoRA layers.

    Example:
        >>> extract_layout(["fc.weight", "fc.bias", "norm.weight"], {"fc.weight": (4, 8), "fc.bias": (4,),
        ...     "norm.weight": (4,), "norm.bias": (4,)}).modules
        ['norm']
    """
    lora = {
        n: layout for n in changed if n not in tied and (layout := lora_layout(n, shapes[n], fan_in_fan_out))
    }
    layers = {n.rpartition(".")[0] for n in lora}
    biases = [n for n in changed if n not in lora and n.endswith(".bias") and n.rpartition(".")[0] in layers]
    rest = [n for n in changed if n not in lora and n not in biases]
    problems = [f"{n} (a tensor of no module)" for n in rest if "." not in n]
    modules = list(dict.fromkeys(n.rpartition(".")[0] for n in rest if "." in n))
    for module in modules:
        inside = [m for m in layers if m == module or m.startswith(module + ".")]
        if inside:
            problems.append(f"{module} (changed whole, yet it holds the LoRA layer {inside[0]})")
    if problems:
        shown = "; ".join(problems[:SHOWN]) + (
            f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        )
        raise SurgeryError(
            "extract",
            f"a PEFT adapter cannot hold {shown}",
            hint="leave them out with --exclude (they are then not in the adapter)",
        )
    whole = [n for n in shapes if n.rpartition(".")[0] in modules]
    return ExtractLayout(lora, biases, modules, whole)
