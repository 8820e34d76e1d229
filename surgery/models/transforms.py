"""The rules' ops on tensors, and the source checkpoint as the rules present it.

`plans.ops` says what each op does to shapes; here it is done to tensors, one rule's
binding at a time: a fused qkv holds three tensors, never the checkpoint.
`MappedSource` is what loading and writing read: the file's own tensors under their
names, and each rule's outputs under the names the plan gave them, computed when first
asked for and let go once taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from surgery.plans.ops import Op, split_sizes
from surgery.plans.rules import Derived

if TYPE_CHECKING:
    import torch

    from surgery.formats.checkpoint import Checkpoint

TargetValue = Callable[[str], "torch.Tensor"]  # a target key -> the target's own tensor


def run_ops(
    ops: Sequence[Op],
    tensors: list[torch.Tensor],
    targets: Sequence[tuple[str, tuple[int, ...]]],
    target_value: TargetValue | None = None,
) -> list[torch.Tensor]:
    """The ops in order on a rule's tensors; `targets` (key, shape) size the ops that fit
    themselves to their target. Outputs are contiguous tensors of their own."""
    shapes = [shape for _, shape in targets]
    for i, op in enumerate(ops):
        last = i == len(ops) - 1
        if op.name in MANY:
            tensors = MANY[op.name](op, tensors, shapes, last)
        else:
            paired = list(targets) if len(targets) == len(tensors) else [None] * len(tensors)
            tensors = [
                EACH[op.name](op, t, where, target_value) for t, where in zip(tensors, paired, strict=True)
            ]
    return [t.contiguous() for t in tensors]


# -- ops on a list ------------------------------------------------------------------
def _cat(op: Op, ts: list, shapes: Sequence, last: bool) -> list:
    import torch

    return [torch.cat(ts, op["dim"])]


def _stack(op: Op, ts: list, shapes: Sequence, last: bool) -> list:
    import torch

    return [torch.stack(ts, op["dim"])]


def _split(op: Op, ts: list, shapes: Sequence, last: bool) -> list:
    (t,) = ts
    return list(t.split(split_sizes(op, tuple(t.shape), shapes, last), op["dim"]))


def _unstack(op: Op, ts: list, shapes: Sequence, last: bool) -> list:
    (t,) = ts
    return list(t.unbind(op["dim"]))


MANY = {"cat": _cat, "stack": _stack, "split": _split, "unstack": _unstack}


# -- ops on each tensor ---------------------------------------------------------------
def _transpose(op: Op, t: torch.Tensor, target: Any, value: Any) -> torch.Tensor:
    return t.transpose(op["dim0"], op["dim1"])


def _reshape(op: Op, t: torch.Tensor, target: Any, value: Any) -> torch.Tensor:
    shape = op["shape"]
    return t.reshape(target[1] if shape == "target" else shape)


def permute_rope(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's rotary layout (each head's rows in interleaved pairs) to Hugging Face's (each
    head's first halves, then its second halves), as transformers' conversion script does."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_rope(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary layout back to Meta's: `permute_rope` undone, bit for bit."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _scale(op: Op, t: torch.Tensor, target: Any, value: Any) -> torch.Tensor:
    return (t.double() * op["factor"]).to(t.dtype) if t.is_floating_point() else t * op["factor"]


def _select_rows(op: Op, t: torch.Tensor, target: Any, value: Any) -> torch.Tensor:
    import torch

    return t.index_select(0, torch.tensor(op["index"]) % t.shape[0])


def _resize_rows(op: Op, t: torch.Tensor, target: Any, value: TargetValue | None) -> torch.Tensor:
    """Rows cut, or grown: new rows the mean of the old (computed in float64), zeros, or the
    target's own (its fresh initialisation)."""
    import torch

    name, shape = target
    rows = shape[0]
    if rows <= t.shape[0]:
        return t[:rows]
    init = op["init"]
    if init == "target":
        if value is None:
            raise ValueError(f"resize_rows(init='target'): the target's {name} is not at hand")
        new = value(name)[t.shape[0] :].to(t.dtype)
    elif init == "mean":
        new = t.double().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], *t.shape[1:])
    else:
        new = t.new_zeros(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, new])


def resample_pos_embed(t: torch.Tensor, shape: Sequence[int], prefix_tokens: int, mode: str) -> torch.Tensor:
    """A [1, prefix + h*w, dim] position embedding to another square grid: the prefix
    (class, register) tokens kept, the grid interpolated in float32 with antialiasing,
    as `timm.layers.resample_abs_pos_embed` does."""
    import torch
    import torch.nn.functional as F

    old, new = math.isqrt(t.shape[1] - prefix_tokens), math.isqrt(shape[1] - prefix_tokens)
    prefix, rest = t[:, :prefix_tokens], t[:, prefix_tokens:]
    grid = rest.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode=mode, antialias=mode != "nearest")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(t.dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_patch_embed(t: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """A patch embedding's kernel [out, in, h, w] to another size such that patches
    resized the same way give the same embedding (FlexiViT's pseudo-inverse of the resize,
    as `timm.layers.resample_patch_embed` does)."""
    import torch
    import torch.nn.functional as F

    (h, w), (nh, nw) = t.shape[-2:], tuple(size)
    basis = torch.eye(h * w).reshape(h * w, 1, h, w)
    resized = F.interpolate(basis, size=(nh, nw), mode=mode, antialias=mode != "nearest", align_corners=None)
    resize = resized.squeeze(1).permute(1, 2, 0).reshape(nh * nw, h * w)
    out = t.reshape(*t.shape[:2], h * w).float() @ torch.linalg.pinv(resize)
    return out.reshape(*t.shape[:2], nh, nw).to(t.dtype)


EACH: dict[str, Callable[..., torch.Tensor]] = {
    "transpose": _transpose,
    "reshape": _reshape,
    "permute_rope": lambda op, t, target, value: permute_rope(t, op["heads"]),
    "unpermute_rope": lambda op, t, target, value: unpermute_rope(t, op["heads"]),
    "scale": _scale,
    "select_rows": _select_rows,
    "resize_rows": _resize_rows,
    "resample_pos_embed": lambda op, t, target, value: resample_pos_embed(
        t, target[1], op["prefix_tokens"], op["mode"]
    ),
    "resample_patch_embed": lambda op, t, target, value: resample_patch_embed(t, target[1][-2:], op["mode"]),
}


# -- the source as the rules present it ----------------------------------------------------
class MappedSource:
    """A checkpoint with the rules' outputs among its tensors: what `load_into` and
    `Output` read in place of the file when a port has rules.

    A rule's binding is computed when one of its outputs is first asked for; its sources
    are released at once, its outputs each when taken (`release`), so memory holds one
    binding's tensors. A one-to-one rule without ops is the source tensor itself (its
    bytes can be copied as they lie). Everything else is the checkpoint's.
    """

    def __init__(self, ckpt: Checkpoint, derived: Sequence[Derived], target_value: TargetValue | None = None):
        self._ckpt = ckpt
        self.target_value = target_value
        self._by_name = {name: d for d in derived for name in d.names}
        self._ready: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)

    def _plain(self, name: str) -> bool:
        d = self._by_name.get(name)
        return d is None or (not d.ops and d.sources == (name,))

    def tensor(self, name: str) -> torch.Tensor:
        if self._plain(name):
            return self._ckpt.tensor(name)
        if name not in self._ready:
            d = self._by_name[name]
            try:
                inputs = [self._ckpt.tensor(s) for s in d.sources]
                made = run_ops(
                    d.ops, inputs, list(zip(d.targets, d.shapes[-1], strict=True)), self.target_value
                )
            finally:
                for s in d.sources:
                    self._ckpt.release(s)
            self._ready.update(zip(d.names, made, strict=True))
        return self._ready[name]

    def release(self, name: str) -> None:
        if self._plain(name):
            self._ckpt.release(name)
        else:
            self._ready.pop(name, None)

    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        return self._ckpt.byte_range(name) if self._plain(name) else None

    def pieces(self, name: str, elements: int = 1 << 22, **kwargs: Any) -> Iterator[torch.Tensor]:
        if self._plain(name):
            yield from self._ckpt.pieces(name, elements, **kwargs)
            return
        from surgery.formats.tensors import flat_pieces

        try:
            yield from flat_pieces(self.tensor(name), elements)
        finally:
            self.release(name)
