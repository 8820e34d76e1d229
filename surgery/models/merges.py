"""The merge methods on tensors: averages, task arithmetic, TIES and SLERP, in float64.

A method reads each checkpoint's tensor as a stream of flat floating pieces (a `Stream`: called
again, it reads the tensor again), computes in float64, and yields the merged tensor's pieces in
order, float64, for the caller to cast and write. Memory follows the piece, not the tensor, except where a method
needs a figure of the whole tensor first: SLERP's angle (a first pass over the pieces) and TIES'
magnitude threshold (each task vector whole, one at a time). The same functions merge whole
tensors (`merge_tensors`: one piece each), which is how they are tested.

    mean              (1/n) Σ θᵢ
    weighted          Σ wᵢ θᵢ / Σ wᵢ  (the weights normalised: 1,1,2 is 25%, 25%, 50%)
    task-arithmetic   base + λ Σ (θᵢ - base)                      (Ilharco et al. 2023)
    ties              base + λ · disjoint mean of the trimmed task vectors agreeing with
                      the elected sign                             (Yadav et al. 2023)
    slerp             sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω the angle between a and b;
                      lerp when they are nearly colinear           (Shoemake 1985, as mergekit)
    lora              base + Σ wᵢ sᵢ Bᵢ Aᵢ, each adapter's delta in its layer's layout
                      (Hu et al. 2021, as PEFT's merge_and_unload)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Stream = Callable[[], Iterator["torch.Tensor"]]  # a tensor's flat pieces, read afresh at each call

# SLERP between nearly colinear tensors is lerp: sin Ω is too small to divide by (mergekit's
# thresholds: |cos Ω| above 0.9995, norms below 1e-8 left unnormalised).
COLINEAR = 0.9995
NORM_EPS = 1e-8


@dataclass(frozen=True)
class MergeParams:
    """A method's parameters: what `--weights`, `--scale`, `--density` and `--t` set."""

    weights: tuple[float, ...] = ()  # weighted: one per input, normalised to sum 1
    scale: float = 1.0  # task-arithmetic, ties: λ, the task vectors' scale
    density: float = 0.2  # ties: the share of each task vector's elements kept (the paper's k = 20%)
    t: float = 0.5  # slerp: 0 is the first input, 1 the second


def aligned(streams: Sequence[Iterator[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
    """Flat piece streams of one tensor from several files, cut so each step holds the same
    elements of every stream (files cut a tensor into pieces at different places).

    Raises:
        ValueError: the streams hold different numbers of elements.
    """
    current: list[torch.Tensor | None] = [None] * len(streams)
    at = [0] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            while current[i] is None or at[i] == current[i].numel():
                current[i], at[i] = next(stream, None), 0
                if current[i] is None:
                    break
        if any(c is None for c in current):
            if not all(c is None for c in current):
                raise ValueError("the inputs hold different numbers of elements")
            return
        length = min(c.numel() - a for c, a in zip(current, at, strict=True))
        yield [c[a : a + length] for c, a in zip(current, at, strict=True)]
        at = [a + length for a in at]


# Each method accumulates in a float64 tensor of its own: adding a float32 or bfloat16 piece to it
# converts each element exactly on the way, with no float64 copy of the piece.
def _mean(inputs: Sequence[Stream], base: Stream | None, params: MergeParams) -> Iterator[torch.Tensor]:
    import torch

    for pieces in aligned([read() for read in inputs]):
        total = pieces[0].to(torch.float64, copy=True)
        for piece in pieces[1:]:
            total += piece
        yield total.div_(len(pieces))


def _weighted(inputs: Sequence[Stream], base: Stream | None, params: MergeParams) -> Iterator[torch.Tensor]:
    import torch

    weights = normalised(params.weights)
    for pieces in aligned([read() for read in inputs]):
        total = pieces[0].to(torch.float64, copy=True).mul_(weights[0])
        for piece, w in zip(pieces[1:], weights[1:], strict=True):
            total.add_(piece, alpha=w)
        yield total


def _task_arithmetic(
    inputs: Sequence[Stream], base: Stream | None, params: MergeParams
) -> Iterator[torch.Tensor]:
    assert base is not None
    for start, *tuned in aligned([base(), *(read() for read in inputs)]):
        start = start.double()
        tasks = tuned[0] - start
        for piece in tuned[1:]:
            tasks += piece - start
        yield tasks.mul_(params.scale).add_(start)


def _ties(inputs: Sequence[Stream], base: Stream | None, params: MergeParams) -> Iterator[torch.Tensor]:
    """Trim each task vector to its largest `density` share of elements by magnitude, elect
    each element's sign as that of the trimmed vectors' sum (+ where it is 0, as mergekit),
    average the trimmed values that agree with it (the disjoint mean), scale by λ, add to base."""
    import torch

    assert base is not None
    thresholds = [_threshold(base, read, params.density) for read in inputs]
    for start, *tuned in aligned([base(), *(read() for read in inputs)]):
        start = start.double()
        trimmed = torch.stack([piece - start for piece in tuned])
        for row, threshold in zip(trimmed, thresholds, strict=True):
            row[row.abs() < threshold] = 0
        elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
        agree = (trimmed * elected) > 0
        kept = torch.where(agree, trimmed, 0).sum(0)
        yield start + params.scale * kept / agree.sum(0).clamp(min=1)


def _threshold(base: Stream, tuned: Stream, density: float) -> float:
    """The least magnitude of a task vector's k = ⌊density · n⌋ largest elements (those at
    least as large are kept; inf when none is), found in streamed passes: a histogram of the
    magnitudes finds the bin that holds it, then only that bin's values are held and ranked.
    Memory follows a piece and one bin, not the tensor (a 2 GB embedding's task vector whole
    would be 4 GB of float64)."""
    import torch

    def magnitudes() -> Iterator[torch.Tensor]:
        for b, t in aligned([base(), tuned()]):
            yield (t - b.double()).abs()

    count, top = 0, 0.0
    for piece in magnitudes():
        count += piece.numel()
        top = max(top, float(piece.max())) if piece.numel() else top
    keep = int(density * count)
    if keep == 0:
        return math.inf
    if top == 0:
        return 0.0
    bins = torch.zeros(HISTOGRAM, dtype=torch.int64)
    for piece in magnitudes():
        bins += torch.bincount(_bin_of(piece, top), minlength=HISTOGRAM)
    above = bins.flip(0).cumsum(0).flip(0)  # elements in this bin or higher ones
    low = int(torch.nonzero(above >= keep).max())  # the highest bin holding the keep-th largest
    higher = int(above[low + 1]) if low + 1 < HISTOGRAM else 0
    inside = torch.cat([piece[_bin_of(piece, top) == low] for piece in magnitudes()])
    return float(inside.kthvalue(inside.numel() - (keep - higher) + 1).values)


HISTOGRAM = 1 << 16  # bins of TIES' magnitude histogram


def _bin_of(magnitudes: torch.Tensor, top: float) -> torch.Tensor:
    """Each magnitude's bin of [0, top] in HISTOGRAM equal bins (top in the last): the same
    rule in every pass, so the passes agree on which values a bin holds."""
    import torch

    return torch.clamp((magnitudes * (HISTOGRAM / top)).to(torch.int64), max=HISTOGRAM - 1)


def _slerp(inputs: Sequence[Stream], base: Stream | None, params: MergeParams) -> Iterator[torch.Tensor]:
    import torch

    first, second = inputs
    dot = norm_a = norm_b = 0.0
    for a, b in aligned([first(), second()]):  # the angle, from a first pass
        a, b = a.double(), b.double()
        dot += float(torch.dot(a, b))
        norm_a += float(torch.dot(a, a))
        norm_b += float(torch.dot(b, b))
    s0, s1 = slerp_coefficients(dot, math.sqrt(norm_a), math.sqrt(norm_b), params.t)
    for a, b in aligned([first(), second()]):
        yield a.to(torch.float64, copy=True).mul_(s0).add_(b, alpha=s1)


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, t: float) -> tuple[float, float]:
    """(s0, s1) with slerp(a, b) = s0 a + s1 b: sin((1-t)Ω)/sin Ω and sin(tΩ)/sin Ω, Ω the
    angle between a and b; (1-t, t), lerp, when a and b are nearly colinear."""
    cos = dot / (norm_a if norm_a > NORM_EPS else 1.0) / (norm_b if norm_b > NORM_EPS else 1.0)
    if abs(cos) > COLINEAR:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _lora(inputs: Sequence[Stream], base: Stream | None, params: MergeParams) -> Iterator[torch.Tensor]:
    """The base plus each adapter's delta (`lora_delta`'s pieces, already scaled and weighted)."""
    import torch

    assert base is not None
    for start, *deltas in aligned([base(), *(read() for read in inputs)]):
        total = start.to(torch.float64, copy=True)
        for delta in deltas:
            total += delta
        yield total


def lora_delta(
    layout: str, a: torch.Tensor | None, b: torch.Tensor, scaling: float, elements: int
) -> Iterator[torch.Tensor]:
    """A LoRA delta, s · B A, in its base tensor's layout (`plans.adapters`), as flat float64
    pieces of whole rows, at most `elements` each (one row when a row is longer): never the
    whole delta at once.

    Example:
        >>> a, b = torch.ones(1, 3), torch.full((2, 1), 2.0)
        >>> torch.cat(list(lora_delta("linear", a, b, 0.5, 3)))
        tensor([1., 1., 1., 1., 1., 1.], dtype=torch.float64)
    """
    import torch

    b = b.to(torch.float64).reshape(b.shape[0], -1)  # (out, r); a bias: (out, 1)
    if a is None:  # lora_bias: s · B.bias
        yield b.reshape(-1) * scaling
        return
    a = a.to(torch.float64).reshape(a.shape[0], -1)  # (r, in · kernel)
    transposed = layout in ("fan_in_fan_out", "embedding")  # the base holds (B A)ᵀ
    count, width = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])  # rows of the base
    step = max(1, elements // max(1, width))
    for start in range(0, count, step):
        end = min(count, start + step)
        block = (b @ a[:, start:end]).T if transposed else b[start:end] @ a
        yield block.contiguous().reshape(-1).mul_(scaling)


def normalised(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights scaled to sum 1: a weighted average, not a weighted sum."""
    total = math.fsum(weights)
    return tuple(w / total for w in weights)


@dataclass(frozen=True)
class Method:
    """One merge method: what merges the pieces, whether it reads a base, how many inputs it takes."""

    merge: Callable[[Sequence[Stream], Stream | None, MergeParams], Iterator[torch.Tensor]]
    needs_base: bool
    inputs: int | None  # exactly this many inputs (slerp: 2); None: any number
    params: tuple[str, ...]  # the fields of MergeParams it reads


METHODS = {
    "mean": Method(_mean, False, None, ()),
    "weighted": Method(_weighted, False, None, ("weights",)),
    "task-arithmetic": Method(_task_arithmetic, True, None, ("scale",)),
    "ties": Method(_ties, True, None, ("scale", "density")),
    "slerp": Method(_slerp, False, 2, ("t",)),
    # the base (the one input) plus each adapter's delta: `surgery merge BASE --adapter DIR`
    "lora": Method(_lora, False, 1, ("weights",)),
}


def merge_pieces(
    method: str, inputs: Sequence[Stream], base: Stream | None, params: MergeParams
) -> Iterator[torch.Tensor]:
    """The merged tensor's flat float64 pieces, in order, from each checkpoint's pieces."""
    return METHODS[method].merge(inputs, base, params)


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    params: MergeParams = MergeParams(),
) -> torch.Tensor:
    """Whole tensors merged (float64, the shape of the first).

    Example:
        >>> merge_tensors("mean", [torch.ones(2), torch.zeros(2)])
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    import torch

    def stream(t: torch.Tensor) -> Stream:
        return lambda: iter([t.detach().reshape(-1).to(torch.float64)])

    pieces = list(
        merge_pieces(method, [stream(t) for t in tensors], stream(base) if base is not None else None, params)
    )
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
    return flat.reshape(tensors[0].shape)


def lora_factors(delta: torch.Tensor, layout: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors A, B in PEFT's shapes for the layout with B A ≈ delta (at scaling 1): the
    truncated SVD, the best rank-r approximation (Eckart-Young), zero rows past the matrix's own
    rank. Returns A, B (float32) and the relative error ‖delta - B A‖ / ‖delta‖ (0 for no change).

    Example:
        >>> a, b, error = lora_factors(torch.ones(4, 3), "linear", 2)
        >>> a.shape, b.shape, round(error, 6)
        (torch.Size([2, 3]), torch.Size([4, 2]), 0.0)
    """
    import torch

    matrix = delta.T if layout == "fan_in_fan_out" else delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    b = torch.zeros(matrix.shape[0], rank)
    a = torch.zeros(rank, matrix.shape[1])
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    total = float(s.double().square().sum())
    error = math.sqrt(float(s[kept:].double().square().sum()) / total) if total > 0 else 0.0
    if layout == "conv":  # A a conv of the layer's kernel, B a 1x1 conv
        a = a.reshape(rank, *delta.shape[1:])
        b = b.reshape(delta.shape[0], rank, *[1] * (delta.dim() - 2))
    return a, b, error
