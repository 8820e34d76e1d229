"""Running the source and the target model on the same input, to see that a port kept what
the network computes.

A port between implementations can load every tensor and still compute something else (a
fused projection split in the wrong order, a missing rotary permutation): only running both
models shows it. `check` feeds both the same seeded probe (token ids for a language model,
images for a vision model), compares the outputs, and through forward hooks on paired modules
names the first module, in the target's execution order, whose output differs from its source
partner's.

Everything torch is imported inside the functions: `import surgery` stays light.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery.errors import BadArgument, UsageError
from surgery.plans.keys import strings
from surgery.text import plural, printable

if TYPE_CHECKING:
    import torch
    from torch import nn

BATCH = 2  # a probe's batch: two different rows also catch ops that mix the batch
TOKENS = 16  # a language model probe's sequence length, when the model takes that many
IMAGE_SIZE = 224  # when the model does not say its own
# A module holding position embeddings rather than a vocabulary's (`wpe`, `pos_emb`,
# `position_embeddings`, `embed_positions`): its rows bound the sequence length.
POSITION_NAME = re.compile(r"wpe|pos", re.IGNORECASE)
PROBE_HINT = "give the input's shape (probe_shape) or the input itself (probe)"


class ProbeFailed(UsageError):
    """A model raised on the probe input, or returned no tensor to compare."""


@dataclass(frozen=True)
class Probe:
    """The input both models ran on, as the report says it."""

    kind: str  # "tokens", "images", "values" (drawn here from `seed`) or "given"
    shape: tuple[int, ...]  # of the tensor, or a given dict's first tensor
    dtype: str
    seed: int | None  # None for a given probe
    high: int | None = None  # token ids are drawn from [0, high)
    names: tuple[str, ...] = ()  # a given dict's keyword arguments

    def describe(self) -> str:
        """`token ids int64 [2, 16] in [0, 100), seed 0`."""
        what = {"tokens": "token ids", "images": "images", "values": "values"}.get(
            self.kind, "the given input"
        )
        if self.names:
            what = f"the given {', '.join(map(printable, self.names))}:"
        text = f"{what} {self.dtype} {list(self.shape)}"
        if self.high is not None:
            text += f" in [0, {self.high})"
        return text if self.seed is None else f"{text}, seed {self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "seed": self.seed,
            "high": self.high,
            "names": list(self.names),
        }


@dataclass(frozen=True)
class Divergence:
    """A target module whose output differs from its source partner's beyond the tolerance."""

    source: str
    target: str
    max_abs: float
    max_rel: float

    def describe(self) -> str:
        partner = "" if self.source == self.target else f" (source {printable(self.source)})"
        return f"first divergence at {printable(self.target)}{partner}, max abs {self.max_abs:.2g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "max_abs": _finite(self.max_abs),
            "max_rel": _finite(self.max_rel),
        }


@dataclass(frozen=True)
class CheckResult:
    """Both models' outputs on one probe compared, and the first module that diverged."""

    passed: bool  # same output shape, and |target - source| <= atol + rtol * |source| everywhere
    max_abs: float | None  # None when the output shapes differ
    max_rel: float | None  # |target - source| / |source|
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    probe: Probe
    atol: float
    rtol: float
    compared: int  # module pairs whose outputs were compared
    skipped: int  # pairs not compared: layout changed, other shapes, or a module not run
    first_divergence: Divergence | None
    constant: bool = False  # the source's output is one value everywhere (a zero-initialised head)

    def summary(self) -> str:
        """One line: `outputs equal within atol 1e-05, rtol 0.0001 (max abs 3.1e-07, ...); ...`."""
        pairs = f"{plural(self.compared, 'module pair')} compared"
        if self.skipped:
            pairs += f", {self.skipped} skipped"
        tolerance = f"atol {self.atol:g}, rtol {self.rtol:g}"
        constant = (
            "; the source's output is constant, so only the modules compared tell" if self.constant else ""
        )
        measured = f"max abs {_g(self.max_abs)}, max rel {_g(self.max_rel)}"
        if self.passed:
            return f"outputs equal within {tolerance} ({measured}); {pairs}{constant}"
        if self.max_abs is None:
            head = (
                f"outputs differ in shape: source {list(self.source_shape)}, target {list(self.target_shape)}"
            )
        elif self.max_abs is not None and self.max_abs <= self.atol and self.first_divergence is not None:
            head = f"outputs equal ({measured}) but modules differ"
        else:
            head = f"outputs differ: {measured} ({tolerance})"
        where = self.first_divergence.describe() if self.first_divergence else "no compared module diverges"
        return f"{head}; {where}; {pairs}{constant}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "max_abs": _finite(self.max_abs),
            "max_rel": _finite(self.max_rel),
            "output_shape": {"source": list(self.source_shape), "target": list(self.target_shape)},
            "atol": self.atol,
            "rtol": self.rtol,
            "probe": self.probe.to_json(),
            "compared": self.compared,
            "skipped": self.skipped,
            "first_divergence": self.first_divergence.to_json() if self.first_divergence else None,
            "constant_output": self.constant,
        }


def check(
    source_model: nn.Module,
    target_model: nn.Module,
    *,
    modules: Mapping[str, str] | None = None,
    layout_changed: Collection[str] = (),
    probe: torch.Tensor | dict[str, Any] | None = None,
    probe_shape: Sequence[int] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
) -> CheckResult:
    """Run both models on the same probe and compare what they compute.

    Both run in eval mode without gradients; their train/eval modes are restored and every
    hook removed afterwards, whatever happens.

    Args:
        source_model: the reference, holding the weights as they were.
        target_model: the model the weights were ported into.
        modules: source module path -> target module path, the pairs whose outputs are
            compared to find the first divergence. None: the paths both models have, among
            modules holding parameters.
        layout_changed: target module paths whose output layout a port op changed on purpose
            (rotary row permutation, row selection): never compared.
        probe: the input, a tensor or a dict of keyword arguments. None: drawn from `seed`,
            token ids for a language model, images for a vision model.
        probe_shape: the shape of the drawn probe (default (2, 16) tokens, (2, C, H, W) images).
        atol, rtol: outputs are equal where |target - source| <= atol + rtol * |source|.
        seed: seeds the probe's generator.

    Returns:
        CheckResult: `passed`, the largest differences and the first diverging module pair.

    Raises:
        BadArgument: an argument that cannot work, naming it.
        ProbeFailed: a model raised on the probe or returned no tensor, in one line.

    Example:
        >>> result = surgery.check(torchvision_vit, timm_vit, modules=pairs)
        >>> result.summary()
        'outputs equal within atol 1e-05, rtol 0.0001 (max abs 2.4e-07, max rel 3e-06); 38 module pairs compared'
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise BadArgument(name, f"a tolerance is a number >= 0, got {value!r}")
    pairs = _pairs(source_model, target_model, modules)
    unchecked = set(strings(layout_changed, "layout_changed"))
    _exist(target_model, unchecked, "layout_changed", "target")
    inputs, described = make_probe(source_model, target_model, probe, probe_shape, seed)

    partners: dict[str, list[str]] = {}
    for source_path, target_path in pairs:
        partners.setdefault(target_path, []).append(source_path)
    recorded: dict[str, torch.Tensor] = {}
    divergences: list[Divergence] = []
    compared = 0

    def keep(path: str, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None:
            recorded[path] = tensor.detach().to("cpu", copy=True)

    def compare(path: str, output: Any) -> None:
        nonlocal compared
        tensor = _first_tensor(output)
        if path in unchecked or tensor is None:
            return
        for source_path in partners[path]:
            reference = recorded.get(source_path)
            if reference is None or reference.shape != tensor.shape:
                continue
            compared += 1
            max_abs, max_rel, close = difference(tensor, reference, atol, rtol)
            if not close:
                divergences.append(Divergence(source_path, path, max_abs, max_rel))

    source_out = _run("source", source_model, inputs, described, {s for s, _ in pairs}, keep)
    target_out = _run("target", target_model, inputs, described, set(partners), compare)
    same_shape = source_out.shape == target_out.shape
    max_abs, max_rel, close = (
        difference(target_out, source_out, atol, rtol) if same_shape else (None, None, False)
    )
    constant = bool(source_out.numel()) and bool((source_out == source_out.flatten()[0]).all())
    return CheckResult(
        passed=close and not divergences,  # equal outputs from modules that differ are luck (a zero head)
        max_abs=max_abs,
        max_rel=max_rel,
        source_shape=tuple(source_out.shape),
        target_shape=tuple(target_out.shape),
        probe=described,
        atol=float(atol),
        rtol=float(rtol),
        compared=compared,
        skipped=len(pairs) - compared,
        first_divergence=divergences[0] if divergences else None,
        constant=constant,
    )


def difference(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[float, float, bool]:
    """The largest |a - b|, the largest |a - b| / |b|, and whether |a - b| <= atol + rtol * |b|
    everywhere (torch.allclose's rule, `b` the reference; equal infinities are equal, NaN is not).

    Measured in float64 on the CPU, so a float16 output is not judged by float16 rounding.
    """
    import torch

    tiny = torch.finfo(b.dtype if b.dtype.is_floating_point else torch.float32).tiny
    x = a.detach().to("cpu", torch.float64)
    y = b.detach().to("cpu", torch.float64)
    if x.numel() == 0:
        return 0.0, 0.0, True
    diff = torch.where(x == y, 0.0, (x - y).abs())
    scale = y.abs()
    close = bool((diff <= atol + rtol * scale).all())
    return float(diff.max()), float((diff / scale.clamp_min(tiny)).max()), close


# -- the probe -----------------------------------------------------------------------------
def make_probe(
    source: nn.Module,
    target: nn.Module,
    probe: Any = None,
    probe_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[Any, Probe]:
    """The input for both models and its description: `probe` as given, or drawn from `seed`
    in the kind of input the models take (token ids within both vocabularies and position
    counts, images of the size and channels the model says, or values for a plain MLP).

    Raises:
        BadArgument: a probe of another type, a shape that cannot work, or models whose
            input cannot be told (naming `probe`).
    """
    import torch

    if probe is not None:
        if probe_shape is not None:
            raise BadArgument("probe_shape", "give probe_shape or probe, not both")
        return probe, _given(probe)
    shape = _shape(probe_shape)
    kind = _kind(source, target)
    generator = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        vocabulary = min((v for v in (_vocabulary(source), _vocabulary(target)) if v), default=None)
        if vocabulary is None:
            raise BadArgument(
                "probe", "the models name no vocabulary to draw token ids from", hint=PROBE_HINT
            )
        positions = [p for p in (_positions(source), _positions(target)) if p is not None]
        longest = min(positions, default=TOKENS)
        shape = shape or (BATCH, min(TOKENS, longest))
        if shape[-1] > longest:
            raise BadArgument(
                "probe_shape", f"{shape[-1]} tokens, but the models take at most {longest} positions"
            )
        ids = torch.randint(0, vocabulary, shape, generator=generator, dtype=torch.int64)
        return ids, Probe("tokens", shape, "int64", seed, high=vocabulary)
    if kind == "images":
        shape = shape or (BATCH, *_image(source, target))
    elif kind == "values":
        shape = shape or (BATCH, _in_features(source, target))
    elif shape is None:
        raise BadArgument(
            "probe",
            f"cannot tell what input {type(source).__name__} takes (no embedding, convolution or "
            "linear layer first)",
            hint=PROBE_HINT,
        )
    else:
        kind = "values"
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    return values, Probe(kind, shape, "float32", seed)


def _given(probe: Any) -> Probe:
    import torch

    if isinstance(probe, torch.Tensor):
        return Probe("given", tuple(probe.shape), _dtype_name(probe.dtype), None)
    if isinstance(probe, Mapping) and all(isinstance(k, str) for k in probe):
        first = next((v for v in probe.values() if isinstance(v, torch.Tensor)), None)
        shape, dtype = (tuple(first.shape), _dtype_name(first.dtype)) if first is not None else ((), "none")
        return Probe("given", shape, dtype, None, names=tuple(probe))
    raise BadArgument("probe", f"a tensor or a dict of keyword arguments, got {type(probe).__name__}")


def _shape(probe_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if probe_shape is None:
        return None
    if isinstance(probe_shape, (str, bytes)) or not isinstance(probe_shape, Sequence):
        raise BadArgument("probe_shape", f"a list of sizes, got {probe_shape!r}")
    if not probe_shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in probe_shape):
        raise BadArgument("probe_shape", f"sizes are whole numbers >= 1, got {list(probe_shape)}")
    return tuple(probe_shape)


def _kind(source: nn.Module, target: nn.Module) -> str | None:
    """The input both models take: the source's kind, the target's if the source's cannot be
    told; refused when they clearly take different inputs."""
    kinds = _model_kind(source), _model_kind(target)
    if None not in kinds and kinds[0] != kinds[1]:
        raise BadArgument(
            "probe",
            f"the source {type(source).__name__} takes {kinds[0]}, the target "
            f"{type(target).__name__} {kinds[1]}: give the input both take",
            hint=PROBE_HINT,
        )
    return kinds[0] or kinds[1]


def _model_kind(model: nn.Module) -> str | None:
    """ "tokens" for a language model (an embedding first, or a config with a vocabulary),
    "images" for a model with a 2-d convolution, "values" for one starting with a linear layer."""
    from torch import nn

    first = _first_parameterised(model)
    if isinstance(first, nn.Embedding) or isinstance(_config(model, "vocab_size"), int):
        return "tokens"
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "images"
    return "values" if isinstance(first, nn.Linear) else None


def _first_parameterised(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)


def _in_features(source: nn.Module, target: nn.Module) -> int:
    """The input width of the first of the models that starts with a linear layer."""
    from torch import nn

    firsts = (_first_parameterised(source), _first_parameterised(target))
    return next(m.in_features for m in firsts if isinstance(m, nn.Linear))


def _config(model: nn.Module, name: str) -> Any:
    return getattr(getattr(model, "config", None), name, None)


def _vocabulary(model: nn.Module) -> int | None:
    """The model's smallest token count: its first embedding (not of positions) and its config."""
    from torch import nn

    counts = [_config(model, "vocab_size")]
    counts += [
        next(
            (
                m.num_embeddings
                for name, m in model.named_modules()
                if isinstance(m, nn.Embedding) and not POSITION_NAME.search(name.rpartition(".")[2])
            ),
            None,
        )
    ]
    return min((c for c in counts if isinstance(c, int) and c > 0), default=None)


def _positions(model: nn.Module) -> int | None:
    """The longest sequence the model takes: its config, or its position embedding's rows."""
    from torch import nn

    counts = [_config(model, "n_positions"), _config(model, "max_position_embeddings")]
    counts += [
        m.num_embeddings
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and POSITION_NAME.search(name.rpartition(".")[2])
    ]
    return min((c for c in counts if isinstance(c, int) and c > 0), default=None)


def _image(source: nn.Module, target: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width): the first 2-d convolution's input channels, and the image
    size the model says (torchvision ViT `image_size`, timm `patch_embed.img_size`, a Hugging
    Face config's `image_size`), the source's first, else 224."""
    from torch import nn

    channels = next(
        m.in_channels for model in (source, target) for m in model.modules() if isinstance(m, nn.Conv2d)
    )
    for model in (source, target):
        for size in (
            getattr(model, "image_size", None),
            getattr(getattr(model, "patch_embed", None), "img_size", None),
            _config(model, "image_size"),
        ):
            if isinstance(size, int) and size > 0:
                return channels, size, size
            if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(n, int) for n in size):
                return channels, size[0], size[1]
    return channels, IMAGE_SIZE, IMAGE_SIZE


# -- running ---------------------------------------------------------------------------------
def _run(
    role: str,
    model: nn.Module,
    inputs: Any,
    probe: Probe,
    watched: set[str],
    on_output: Callable[[str, Any], None],
) -> torch.Tensor:
    """`model`'s output tensor on `inputs`, in eval mode without gradients, calling
    `on_output(path, output)` at the first call of each watched module (a shared module is
    compared at its first call). Hooks removed and modes restored whatever happens.

    Raises:
        ProbeFailed: the model raised, or returned no tensor.
    """
    import torch

    where = f"{role} model {type(model).__name__}"
    named = dict(model.named_modules(remove_duplicate=False))
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for path in watched:
            handles.append(named[path].register_forward_hook(_first_call(path, on_output)))
        model.eval()
        fed = _fed(inputs, model)
        with torch.no_grad():
            try:
                output = model(**fed) if isinstance(fed, Mapping) else model(fed)
            except Exception as error:
                raise ProbeFailed(
                    where, f"fails on {probe.describe()}: {_one_line(error)}", hint=PROBE_HINT
                ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    tensor = _first_tensor(output, logits=True)
    if tensor is None:
        raise ProbeFailed(where, f"returned {type(output).__name__}, which holds no tensor to compare")
    return tensor


def _first_call(path: str, on_output: Callable[[str, Any], None]) -> Callable[..., None]:
    seen = False

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal seen
        if not seen:
            seen = True
            on_output(path, output)

    return hook


def _fed(inputs: Any, model: nn.Module) -> Any:
    """The probe on the model's device, floating tensors in its floating dtype (a bfloat16
    model gets bfloat16 images): both models see the same values."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point() and dtype is not None:
            return value.to(device, dtype)
        return value.to(device)

    return {k: move(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else move(inputs)


def _first_tensor(output: Any, *, logits: bool = False) -> torch.Tensor | None:
    """The tensor an output stands for: itself, a model output's `.logits` (transformers), or
    the first tensor in a tuple, list or dict (nanoGPT returns `(logits, loss)`)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if logits and isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, Mapping):
        output = list(output.values())
    if not isinstance(output, (tuple, list)):
        return None
    return next((t for t in map(_first_tensor, output) if t is not None), None)


# -- the module pairs ------------------------------------------------------------------------
def _pairs(source: nn.Module, target: nn.Module, modules: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """(source path, target path) pairs to watch: as given, or the paths both models have
    among callable modules holding parameters (the model itself left out: its output is
    compared anyway)."""
    if modules is None:
        theirs = {name for name, m in source.named_modules() if name and _holds_parameters(m)}
        return [(n, n) for n, m in target.named_modules() if n in theirs and _holds_parameters(m)]
    if not isinstance(modules, Mapping):
        raise BadArgument(
            "modules", f"a mapping of source to target module paths, got {type(modules).__name__}"
        )
    for path in (*modules.keys(), *modules.values()):
        if not isinstance(path, str):
            raise BadArgument("modules", f"module paths are strings, got {path!r}")
    _exist(source, set(modules), "modules", "source")
    _exist(target, set(modules.values()), "modules", "target")
    return list(modules.items())


def _holds_parameters(module: nn.Module) -> bool:
    """Whether a module holds parameters and can be called (a ModuleList never runs)."""
    from torch import nn

    callable_ = not isinstance(module, (nn.ModuleList, nn.ModuleDict))
    return callable_ and next(module.parameters(), None) is not None


def _exist(model: nn.Module, paths: set[str], param: str, role: str) -> None:
    missing = sorted(paths - dict(model.named_modules(remove_duplicate=False)).keys())
    if missing:
        shown = ", ".join(repr(printable(p)) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise BadArgument(param, f"the {role} {type(model).__name__} has no module {shown}{more}")


# -- words -----------------------------------------------------------------------------------
def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = printable(lines[0] if lines else "")
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None
