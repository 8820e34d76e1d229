"""PEFT LoRA adapters as plans: which base tensor each adapter tensor changes and how, decided
from names, shapes and the adapter's `adapter_config.json` alone (no torch, no peft).

A LoRA layer adds s · B A to its base layer's weight, in the layout of the layer:

    linear          W (out, in)          += s · B A         A (r, in)        B (out, r)
    fan_in_fan_out  W (in, out)          += s · (B A)ᵀ      GPT-2's Conv1D, `fan_in_fan_out: true`
    conv            W (out, in, k, ...)  += s · B A         A (r, in, k, ...) B (out, r, 1, ...)
    embedding       W (num, dim)         += s · (B A)ᵀ      A (r, num)        B (dim, r)
    bias            b (out,)             += s · B.bias      `lora_bias: true`

with s = alpha / r (alpha / √r with `use_rslora`), r and alpha per module from `rank_pattern` and
`alpha_pattern` as PEFT resolves them. Every other tensor of the adapter (`modules_to_save`, biases
trained with `bias: all | lora_only`) replaces the base's tensor of that name whole.

Every adapter tensor must land on a base tensor of a fitting shape: one that lands on nothing is
the adapter that silently changes nothing (diffusers#14005), and is refused with the list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import SurgeryError
from surgery.names import group_names
from surgery.text import plural

PEFT_PREFIX = "base_model.model."  # every key PEFT saves starts with it: the PeftModel's own path
SHOWN = 4  # names shown in an error
# Suffixes of the low-rank factors: the suffix -> (factor, layer kind).
FACTORS = {
    ".lora_A.weight": ("A", "layer"),
    ".lora_B.weight": ("B", "layer"),
    ".lora_B.bias": ("bias", "layer"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
# Tensors of other PEFT methods or LoRA variants whose merge is not a plain low-rank sum.
UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    "trainable_tokens": "trainable tokens",
    "lora_E": "AdaLoRA",
    "hada_w1": "LoHa",
    "lokr_w1": "LoKr",
    "ia3_l": "IA3",
}


@dataclass(frozen=True)
class LoraConfig:
    """What of `adapter_config.json` a merge needs."""

    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Any, where: str) -> LoraConfig:
        """The config of a LoRA adapter.

        Raises:
            SurgeryError: not a LoRA config, DoRA, or a field of the wrong type.
        """
        if not isinstance(doc, dict):
            raise SurgeryError(where, "is not a PEFT adapter config (a JSON object)")
        kind = doc.get("peft_type")
        if kind != "LORA":
            raise SurgeryError(where, f"peft_type is {kind!r}: surgery merges LoRA adapters only")
        if doc.get("use_dora"):
            raise SurgeryError(
                where, "a DoRA adapter (use_dora): its merge rescales each column, not a low-rank sum"
            )
        try:
            config = cls(
                r=_count(doc.get("r"), "r"),
                alpha=_number(doc.get("lora_alpha"), "lora_alpha"),
                rslora=bool(doc.get("use_rslora") or False),
                fan_in_fan_out=bool(doc.get("fan_in_fan_out") or False),
                rank_pattern={
                    str(k): _count(v, f"rank_pattern[{k!r}]") for k, v in _dict(doc, "rank_pattern")
                },
                alpha_pattern={
                    str(k): _number(v, f"alpha_pattern[{k!r}]") for k, v in _dict(doc, "alpha_pattern")
                },
            )
            for pattern in (*config.rank_pattern, *config.alpha_pattern):
                re.compile(pattern)
        except (TypeError, ValueError, re.error) as e:
            raise SurgeryError(where, f"not a valid LoRA config: {e}") from None
        return config

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """The module's rank and its scaling, as PEFT resolves them: the first pattern of
        `rank_pattern` / `alpha_pattern` that matches the end of its name, else `r` / `lora_alpha`."""
        r = self.rank_pattern.get(_pattern_of(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_of(self.alpha_pattern, module), self.alpha)
        return r, alpha / (math.sqrt(r) if self.rslora else r)

    def describe(self) -> str:
        parts = [f"r {self.r}", f"alpha {self.alpha:g}"]
        if self.rank_pattern or self.alpha_pattern:
            parts.append(f"{plural(len(self.rank_pattern) + len(self.alpha_pattern), 'pattern')}")
        if self.rslora:
            parts.append("rslora")
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out")
        return ", ".join(parts)


def _pattern_of(patterns: Mapping[str, Any], module: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern matching the end of the name, at a dot."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), module)


def _dict(doc: dict, name: str) -> list[tuple[Any, Any]]:
    value = doc.get(name) or {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} is {type(value).__name__}, not an object")
    return list(value.items())


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} is {value!r}, not a positive integer")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is {value!r}, not a number")
    return float(value)


@dataclass(frozen=True)
class AdapterTensors:
    """One adapter as the plan sees it: its config and its tensors' shapes (keys as saved)."""

    path: str
    config: LoraConfig
    shapes: Mapping[str, tuple[int, ...]]
    weight: float = 1.0  # its delta's factor; negative to unmerge


@dataclass(frozen=True)
class AdapterUse:
    """One adapter as the report shows it: its config, its weight, what it does to the base."""

    path: str
    format: str
    config: LoraConfig
    weight: float
    layouts: dict[str, int]  # linear | fan_in_fan_out | conv | embedding | bias -> tensors changed
    replaced: int
    steps: tuple[str, ...] = ()

    def describe(self) -> str:
        changed = sum(self.layouts.values())
        kinds = ", ".join(f"{k} {n}" for k, n in self.layouts.items())
        parts = [f"{self.path} ({self.format}): {self.config.describe()}", f"weight {self.weight:g}"]
        parts.append(f"changes {plural(changed, 'tensor')}" + (f" ({kinds})" if kinds else ""))
        if self.replaced:
            parts.append(f"replaces {plural(self.replaced, 'tensor')} whole")
        return "; ".join(parts + list(self.steps))

    def to_json(self) -> dict[str, Any]:
        config = self.config
        return {
            "path": self.path,
            "format": self.format,
            "r": config.r,
            "lora_alpha": config.alpha,
            "use_rslora": config.rslora,
            "fan_in_fan_out": config.fan_in_fan_out,
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "weight": self.weight,
            "changed": self.layouts,
            "replaced": self.replaced,
            "steps": list(self.steps),
        }


@dataclass(frozen=True)
class Delta:
    """s · B A (or s · B.bias) added to one base tensor."""

    adapter: int  # index into the adapters
    layout: str  # linear | fan_in_fan_out | conv | embedding | bias
    a: str | None  # the adapter's key of A (None for a bias)
    b: str  # the adapter's key of B (or of B's bias)
    rank: int
    scaling: float  # alpha / r, times the adapter's weight

    def describe(self) -> str:
        return f"{self.layout}, r {self.rank}, x {self.scaling:.4g}"


@dataclass(frozen=True)
class Replacement:
    """A base tensor replaced whole by an adapter's (`modules_to_save`, trained biases)."""

    adapter: int
    key: str


@dataclass(frozen=True)
class AdapterPlan:
    """What each adapter does to the base, by the base's names."""

    deltas: dict[str, list[Delta]]  # base name -> the deltas added to it, in adapter order
    replaced: dict[str, Replacement]  # base name -> the adapter tensor that replaces it
    renamed: tuple[str, ...] = ()  # how adapter names were aligned with the base's, in words


@dataclass(frozen=True)
class _Layer:
    """One LoRA layer of one adapter: its factors' keys by role."""

    module: str
    kind: str  # "layer" or "embedding"
    keys: dict[str, str]  # "A", "B", "bias" -> adapter key


def plan_adapters(
    adapters: Sequence[AdapterTensors],
    base: Mapping[str, tuple[int, ...]],
    *,
    unmerge: bool = False,
) -> AdapterPlan:
    """Which base tensors the adapters change, and how.

    Args:
        adapters: each adapter's config and tensor shapes, keys as PEFT saved them.
        base: the base checkpoint's names (after the key rules) and shapes.
        unmerge: subtract the deltas; refused for adapters that replace tensors whole.

    Returns:
        An `AdapterPlan`. Adapter names that miss the base by a prefix the base's names all
        carry or lack (`transformer.` when the base is a GPT2Model) are aligned, and said so.

    Raises:
        SurgeryError: an adapter tensor that lands on no base tensor (all listed), factors that
            do not fit the base tensor's shape or the config's rank, a LoRA variant whose merge
            is not a low-rank sum, two adapters replacing one tensor, or an unmerge that cannot be.

    Example:
        >>> config = LoraConfig(r=2, alpha=4)
        >>> shapes = {"base_model.model.fc.lora_A.weight": (2, 8), "base_model.model.fc.lora_B.weight": (4, 2)}
        >>> plan = plan_adapters([AdapterTensors("a", config, shapes)], {"fc.weight": (4, 8), "fc.bias": (4,)})
        >>> plan.deltas["fc.weight"][0].describe()
        'linear, r 2, x 2'
    """
    parsed = [_parse(adapter) for adapter in adapters]
    for adapter, (layers, replaced) in zip(adapters, parsed, strict=True):
        if not layers and not replaced:
            raise SurgeryError(adapter.path, "holds no tensors: an adapter that changes nothing")
    targets = [name for layers, replaced in parsed for name in [*_targets(layers), *replaced]]
    strip, add, renamed = _alignment(targets, base)

    def on_base(name: str) -> str:
        return add + name.removeprefix(strip)

    missing = [(i, n) for i, (layers, replaced) in enumerate(parsed) for n in [*_targets(layers), *replaced]]
    missing = [(i, n) for i, n in missing if on_base(n) not in base]
    if missing:
        raise _missing(adapters, missing, base)
    deltas: dict[str, list[Delta]] = {}
    replaced: dict[str, Replacement] = {}
    problems: list[str] = []
    for i, (adapter, (layers, replacing)) in enumerate(zip(adapters, parsed, strict=True)):
        for layer in layers:
            for name, delta in _deltas(i, adapter, layer, base, on_base, problems):
                deltas.setdefault(name, []).append(delta)
        for name, key in replacing.items():
            target = on_base(name)
            if tuple(adapter.shapes[key]) != tuple(base[target]):
                problems.append(
                    f"{key} is {list(adapter.shapes[key])}, the base's {target} is {list(base[target])}"
                )
            elif target in replaced:
                problems.append(
                    f"{target} is replaced by two adapters ({adapters[replaced[target].adapter].path})"
                )
            else:
                replaced[target] = Replacement(i, key)
    if problems:
        raise SurgeryError(
            adapters[0].path if len(adapters) == 1 else "--adapter",
            f"does not fit the base: {_few(problems)}",
            hint="an adapter trained on another model (or another size of it) cannot be merged into this base",
        )
    if unmerge and replaced:
        raise SurgeryError(
            adapters[replaced[next(iter(replaced))].adapter].path,
            f"cannot be unmerged: it replaces {plural(len(replaced), 'tensor')} whole "
            f"({_few(group_names(list(replaced)))}; modules_to_save or trained biases), and the base's own are gone",
            hint="unmerge needs an adapter of low-rank factors only",
        )
    return AdapterPlan(deltas, replaced, renamed)


def _parse(adapter: AdapterTensors) -> tuple[list[_Layer], dict[str, str]]:
    """The adapter's LoRA layers, and its tensors that replace a base tensor (name -> key).

    Raises:
        SurgeryError: a tensor of a PEFT method or LoRA variant that is not merged by a low-rank sum.
    """
    layers: dict[str, _Layer] = {}
    replaced: dict[str, str] = {}
    for key in adapter.shapes:
        name = key.removeprefix(PEFT_PREFIX)
        for segment, what in UNSUPPORTED.items():
            if f".{segment}" in f".{name}":
                raise SurgeryError(
                    adapter.path, f"tensor {key!r} is {what}: surgery merges LoRA factors only"
                )
        suffix = next((s for s in FACTORS if name.endswith(s)), None)
        if suffix is not None:
            role, kind = FACTORS[suffix]
            module = name.removesuffix(suffix)
            layer = layers.setdefault(module, _Layer(module, kind, {}))
            if layer.kind != kind:
                raise SurgeryError(adapter.path, f"{module} holds both linear and embedding factors")
            layer.keys[role] = key
            continue
        for wrapper in (".modules_to_save.default.", ".modules_to_save.", ".base_layer."):
            name = name.replace(wrapper, ".")
        replaced[name] = key
    for layer in layers.values():
        if "A" not in layer.keys or "B" not in layer.keys:
            have = "B" if "B" in layer.keys else "A"
            raise SurgeryError(adapter.path, f"{layer.module} has lora_{have} but not its other factor")
    return list(layers.values()), replaced


def _targets(layers: Sequence[_Layer]) -> list[str]:
    return [
        f"{layer.module}.{p}"
        for layer in layers
        for p in ("weight", *(["bias"] if "bias" in layer.keys else []))
    ]


def _deltas(
    i: int,
    adapter: AdapterTensors,
    layer: _Layer,
    base: Mapping[str, tuple[int, ...]],
    on_base,
    problems: list[str],
) -> list[tuple[str, Delta]]:
    """The deltas of one LoRA layer on the base (weight, and bias with lora_bias); a shape that
    does not fit goes into `problems`."""
    a, b = tuple(adapter.shapes[layer.keys["A"]]), tuple(adapter.shapes[layer.keys["B"]])
    rank, scaling = adapter.config.rank_and_scaling(layer.module)
    target = on_base(f"{layer.module}.weight")
    shape = tuple(base[target])
    where = f"{layer.module} (lora_A {list(a)}, lora_B {list(b)})"
    if len(a) < 2 or len(b) < 2:
        problems.append(f"{where}: factors of fewer than 2 dimensions make no weight")
        return []
    if layer.kind == "embedding":
        layout, made = "embedding", (a[1], b[0]) if len(a) == 2 and len(b) == 2 else None
    elif len(a) > 2:
        layout, made = "conv", (b[0], *a[1:]) if len(b) == len(a) and not any(k != 1 for k in b[2:]) else None
    elif adapter.config.fan_in_fan_out and (b[0], a[1]) == shape != (a[1], b[0]):
        layout, made = "linear", shape  # an nn.Linear among Conv1Ds: PEFT takes it as it is
    elif adapter.config.fan_in_fan_out:
        layout, made = "fan_in_fan_out", (a[1], b[0]) if len(a) == len(b) == 2 else None  # Conv1D (in, out)
    else:
        layout, made = "linear", (b[0], a[1]) if len(a) == len(b) == 2 else None
    if a[0] != rank or b[1] != rank:
        problems.append(f"{where}: the config says rank {rank}")
        return []
    if made != shape:
        shown = "factors that make no weight" if made is None else f"make {list(made)}"
        problems.append(f"{where} {shown} as {layout}, the base's {target} is {list(shape)}")
        return []
    found = [(target, Delta(i, layout, layer.keys["A"], layer.keys["B"], rank, scaling * adapter.weight))]
    if "bias" in layer.keys:
        bias = on_base(f"{layer.module}.bias")
        if tuple(adapter.shapes[layer.keys["bias"]]) != tuple(base[bias]):
            problems.append(f"{layer.keys['bias']} does not fit the base's {bias} {list(base[bias])}")
            return []
        found.append((bias, Delta(i, "bias", None, layer.keys["bias"], rank, scaling * adapter.weight)))
    return found


def _alignment(targets: Sequence[str], base: Mapping[str, Any]) -> tuple[str, str, tuple[str, ...]]:
    """(strip, add, steps): the one prefix change that lands every adapter name on a base name
    when they miss it as they are (a base saved from the inner model, or with `module.`);
    ("", "", ()) when none does, or when several would (a guess could pair layers by luck)."""
    if not targets or all(t in base for t in targets):
        return "", "", ()
    first = next(t for t in targets if t not in base)
    parts = first.split(".")
    # strip a prefix of the adapter's names (a base saved from an inner module), or add one of the
    # base's (a base saved wrapped, `module.`), never both: the module's own name is always kept
    candidates = [(".".join(parts[:k]) + ".", "") for k in range(1, len(parts) - 1)]
    candidates += [("", n[: len(n) - len(first)]) for n in base if n.endswith("." + first)]
    fits = [
        (strip, add)
        for strip, add in dict.fromkeys(candidates)
        if all(t.startswith(strip) and add + t.removeprefix(strip) in base for t in targets)
    ]
    if len({tuple(add + t.removeprefix(strip) for t in targets) for strip, add in fits}) != 1:
        return "", "", ()  # none, or a guess between several: the names are listed instead
    strip, add = fits[0]
    said = [f"stripped {strip!r}"] * bool(strip) + [f"added {add!r}"] * bool(add)
    return strip, add, (f"adapter names: {' and '.join(said)} to match the base",)


def _missing(
    adapters: Sequence[AdapterTensors], missing: list[tuple[int, str]], base: Mapping[str, Any]
) -> SurgeryError:
    """The error for adapter tensors that land on nothing: every one, grouped, per adapter."""
    first = missing[0][0]
    names = [n for i, n in missing if i == first]
    others = {i for i, _ in missing} - {first}
    more = f"; {plural(len(others), 'more adapter')} too" if others else ""
    example = next(iter(base), "")
    return SurgeryError(
        adapters[first].path,
        f"{plural(len(names), 'tensor')} match nothing in the base: {_few(group_names(names))}{more}",
        hint=f"an adapter for another model? The base's names look like {example!r}; "
        "--strip-prefix/--add-prefix/--rename change the base's names",
    )


def _few(items: Sequence[str]) -> str:
    return "; ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
