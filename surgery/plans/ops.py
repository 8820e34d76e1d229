"""The ops a rule applies to its tensors, on shapes alone: what each takes, what it makes.

A rule's tensors flow through its ops as a list: `cat` and `stack` make one tensor of
many, `split` and `unstack` many of one, every other op works on each tensor of the list.
The shapes the ops make are known before any tensor is read, so a rule that does not fit
fails at planning (`--dry-run` shows every step) and never halfway through writing.
`models.transforms` does the same ops on tensors; a test holds the two to each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from surgery.values import Shape

REQUIRED = object()


class OpError(ValueError):
    """An op that cannot be applied: a bad parameter, or shapes it does not fit."""


@dataclass(frozen=True)
class Op:
    """One step of a rule: its name and its parameters (resolved: no `{name}` left)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]

    def to_json(self) -> dict[str, Any]:
        return {"op": self.name, **dict(self.params)}

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Spec:
    """What an op accepts (parameter -> (type, default)) and what it does to a list of shapes."""

    params: Mapping[str, tuple[type | tuple[type, ...], Any]]
    shapes: Callable[[Op, list[Shape], Sequence[Shape]], list[Shape]]
    arity: str = "each"  # each | many->one | one->many
    changes_layout: bool = False  # the module's outputs change too (rows moved, picked, added)


def _dim(op: Op, shape: Shape, key: str = "dim") -> int:
    dim = op[key]
    if not -len(shape) <= dim < len(shape):  # a 0-d tensor has no dimension to name
        raise OpError(f"{op.name}: {key}={dim} is out of range for a tensor of shape {list(shape)}")
    return dim % len(shape)


def _whole(values: Any) -> bool:
    """Whether `values` is a list of whole numbers (sizes, rows): not bools, floats or strings."""
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _cat(op: Op, shapes: list[Shape], targets: Sequence[Shape]) -> list[Shape]:
    dim = _dim(op, shapes[0])
    rest = {s[:dim] + s[dim + 1 :] for s in shapes}
    if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
        raise OpError(f"cat(dim={dim}): shapes {[list(s) for s in shapes]} differ outside dim {dim}")
    first = shapes[0]
    return [(*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1 :])]


def _stack(op: Op, shapes: list[Shape], targets: Sequence[Shape]) -> list[Shape]:
    if len(set(shapes)) > 1:
        raise OpError(f"stack: shapes {[list(s) for s in shapes]} differ")
    dim = op["dim"]
    if not -len(shapes[0]) - 1 <= dim <= len(shapes[0]):
        raise OpError(f"stack: dim={dim} is out of range for tensors of shape {list(shapes[0])}")
    dim %= len(shapes[0]) + 1
    return [(*shapes[0][:dim], len(shapes), *shapes[0][dim:])]


def split_sizes(op: Op, shape: Shape, targets: Sequence[Shape], last: bool) -> list[int]:
    """The sizes `split` cuts `shape` into: `sizes` when given; else, as the last op, the
    targets' own sizes along `dim` when they add up (grouped-query q, k, v differ); else
    equal parts, one per target."""
    dim = _dim(op, shape)
    total = shape[dim]
    sizes = dict(op.params).get("sizes")
    if sizes is not None and not _whole(sizes):
        raise OpError(f"split(dim={dim}): sizes={sizes!r} is not a list of sizes")
    fits = last and targets and all(len(t) == len(shape) for t in targets)
    if sizes is None and fits and sum(t[dim] for t in targets) == total:
        sizes = [t[dim] for t in targets]
    if sizes is None:
        if not targets or total % len(targets):
            raise OpError(
                f"split(dim={dim}): {total} does not split into {len(targets)} equal parts; give sizes"
            )
        sizes = [total // len(targets)] * len(targets)
    if sum(sizes) != total or any(s <= 0 for s in sizes):
        raise OpError(f"split(dim={dim}): sizes {list(sizes)} do not add up to {total}")
    return list(sizes)


def _split(op: Op, shapes: list[Shape], targets: Sequence[Shape], last: bool = True) -> list[Shape]:
    (shape,) = shapes
    dim = _dim(op, shape)
    return [(*shape[:dim], n, *shape[dim + 1 :]) for n in split_sizes(op, shape, targets, last)]


def _unstack(op: Op, shapes: list[Shape], targets: Sequence[Shape]) -> list[Shape]:
    (shape,) = shapes
    dim = _dim(op, shape)
    return [shape[:dim] + shape[dim + 1 :]] * shape[dim]


def _transpose(op: Op, shape: Shape, target: Shape | None) -> Shape:
    if len(shape) < 2:
        raise OpError(f"transpose: a tensor of shape {list(shape)} has fewer than two dimensions")
    a, b = _dim(op, shape, "dim0"), _dim(op, shape, "dim1")
    out = list(shape)
    out[a], out[b] = out[b], out[a]
    return tuple(out)


def _reshape(op: Op, shape: Shape, target: Shape | None) -> Shape:
    wanted = op["shape"]
    if wanted == "target":
        if target is None:
            raise OpError("reshape(shape='target'): no target tensor to take the shape of here")
        wanted = list(target)
    if not _whole(wanted) or any(n < -1 for n in wanted) or wanted.count(-1) > 1:
        raise OpError(f"reshape: shape={wanted!r} is not a list of sizes (one may be -1) or 'target'")
    numel = math.prod(shape)
    known = math.prod(n for n in wanted if n != -1)
    if -1 in wanted:
        if known == 0 or numel % known:
            raise OpError(f"reshape: {list(shape)} cannot become {wanted}")
        wanted = [numel // known if n == -1 else n for n in wanted]
    if math.prod(wanted) != numel:
        raise OpError(f"reshape: {list(shape)} ({numel} values) cannot become {wanted}")
    return tuple(wanted)


def _rope(op: Op, shape: Shape, target: Shape | None) -> Shape:
    heads = op["heads"]
    if heads <= 0 or not shape or shape[0] % (2 * heads):
        raise OpError(
            f"{op.name}(heads={heads}): {shape[0] if shape else 0} rows are not {heads} heads of pairs"
        )
    if len(shape) > 2:
        raise OpError(f"{op.name}: a weight or a bias, not a tensor of shape {list(shape)}")
    return shape


def _same(op: Op, shape: Shape, target: Shape | None) -> Shape:
    return shape


def _needs_target(op: Op, target: Shape | None) -> Shape:
    if target is None:
        raise OpError(f"{op.name}: sizes itself to its target tensor, so it must make the rule's outputs")
    return target


def grid(tokens: int, name: str) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise OpError(f"resample_pos_embed: {tokens} {name} tokens are not a square grid")
    return side, side


def _pos_embed(op: Op, shape: Shape, target: Shape | None) -> Shape:
    target = _needs_target(op, target)
    prefix = op["prefix_tokens"]
    if prefix < 0:
        raise OpError(f"resample_pos_embed: prefix_tokens={prefix} is not a count of tokens")
    if len(shape) != 3 or len(target) != 3 or shape[0] != 1 or shape[2] != target[2] or target[0] != 1:
        raise OpError(
            f"resample_pos_embed: [1, tokens, dim] to [1, tokens, dim] of the same dim, "
            f"not {list(shape)} to {list(target)}"
        )
    if min(shape[1], target[1]) <= prefix:
        raise OpError(f"resample_pos_embed: prefix_tokens={prefix} leaves no grid in {list(shape)}")
    grid(shape[1] - prefix, "source")
    grid(target[1] - prefix, "target")
    return target


def _patch_embed(op: Op, shape: Shape, target: Shape | None) -> Shape:
    target = _needs_target(op, target)
    if len(shape) != 4 or len(target) != 4 or shape[:2] != target[:2]:
        raise OpError(
            f"resample_patch_embed: a conv weight [out, in, h, w] to another kernel size, "
            f"not {list(shape)} to {list(target)}"
        )
    return target


def _resize_rows(op: Op, shape: Shape, target: Shape | None) -> Shape:
    target = _needs_target(op, target)
    if op["init"] not in ROW_INITS:
        raise OpError(f"resize_rows: init={op['init']!r} is not one of {', '.join(ROW_INITS)}")
    if not shape or len(shape) != len(target) or shape[1:] != target[1:]:
        raise OpError(f"resize_rows: only rows differ, not {list(shape)} against {list(target)}")
    return target


def _select_rows(op: Op, shape: Shape, target: Shape | None) -> Shape:
    index = op["index"]
    if not _whole(index) or not index:
        raise OpError(f"select_rows: index={index!r} is not a list of row numbers")
    if not shape or not all(-shape[0] <= i < shape[0] for i in index):
        raise OpError(f"select_rows: an index is out of range for {shape[0] if shape else 0} rows")
    return (len(index), *shape[1:])


ROW_INITS = ("mean", "zeros", "target")


def each(
    fn: Callable[[Op, Shape, Shape | None], Shape],
) -> Callable[[Op, list[Shape], Sequence[Shape]], list[Shape]]:
    """An op on each tensor of the list; the i-th pairs with the i-th target when the counts agree."""

    def shapes(op: Op, shapes: list[Shape], targets: Sequence[Shape]) -> list[Shape]:
        paired = list(targets) if len(targets) == len(shapes) else [None] * len(shapes)
        return [fn(op, s, t) for s, t in zip(shapes, paired, strict=True)]

    return shapes


INT, NUM = int, (int, float)
OPS: dict[str, Spec] = {
    "cat": Spec({"dim": (INT, 0)}, _cat, "many->one"),
    "stack": Spec({"dim": (INT, 0)}, _stack, "many->one"),
    "split": Spec({"dim": (INT, 0), "sizes": (list, None)}, _split, "one->many"),
    "unstack": Spec({"dim": (INT, 0)}, _unstack, "one->many"),
    "transpose": Spec({"dim0": (INT, 0), "dim1": (INT, 1)}, each(_transpose)),
    "reshape": Spec({"shape": ((list, str), REQUIRED)}, each(_reshape)),
    "permute_rope": Spec({"heads": (INT, REQUIRED)}, each(_rope), changes_layout=True),
    "unpermute_rope": Spec({"heads": (INT, REQUIRED)}, each(_rope), changes_layout=True),
    "scale": Spec({"factor": (NUM, REQUIRED)}, each(_same), changes_layout=True),
    "select_rows": Spec({"index": (list, REQUIRED)}, each(_select_rows), changes_layout=True),
    "resize_rows": Spec({"init": (str, "mean")}, each(_resize_rows), changes_layout=True),
    "resample_pos_embed": Spec(
        {"prefix_tokens": (INT, 1), "mode": (str, "bicubic")}, each(_pos_embed), changes_layout=True
    ),
    "resample_patch_embed": Spec({"mode": (str, "bicubic")}, each(_patch_embed), changes_layout=True),
}
MODES = ("bicubic", "bilinear", "nearest")


def make_op(name: Any, params: Mapping[str, Any], *, unresolved: Collection[str] = ()) -> Op:
    """An op from a rule file's table, its parameters checked and defaulted.

    Args:
        unresolved: parameters written as a `"{name}"` whose value is not known yet: only
            their names are checked now (their value is None in the op), the rest once known.

    Raises:
        OpError: an unknown op or parameter, a missing or mistyped value (None only where
            None is the default).
    """
    spec = OPS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise OpError(f"unknown op {name!r} (ops: {', '.join(OPS)})")
    unknown = sorted((set(params) | set(unresolved)) - set(spec.params))
    if unknown:
        raise OpError(
            f"{name}: unknown parameter {unknown[0]!r} (parameters: {', '.join(spec.params) or 'none'})"
        )
    out = []
    for key, (kind, default) in spec.params.items():
        if key in unresolved:
            out.append((key, None))
            continue
        value = params.get(key, default)
        if value is REQUIRED:
            raise OpError(f"{name}: needs {key}")
        if (value is not None or default is not None) and (
            not isinstance(value, kind) or isinstance(value, bool)
        ):
            raise OpError(f"{name}: {key}={value!r} is not {_kind(kind)}")
        out.append((key, value))
    op = Op(name, tuple(out))
    if name.startswith("resample") and op["mode"] is not None and op["mode"] not in MODES:
        raise OpError(f"{name}: mode={op['mode']!r} is not one of {', '.join(MODES)}")
    return op


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"int": "an integer", "float": "a number", "list": "a list", "str": "a string"}[k.__name__]
        for k in kinds
    )


def run_shapes(ops: Sequence[Op], shapes: list[Shape], targets: Sequence[Shape]) -> list[list[Shape]]:
    """The list of shapes before the ops and after each one; the targets' shapes size the
    ops that fit themselves to their target (resample, resize_rows, split without sizes).

    Raises:
        OpError: an op that does not fit the shapes it gets, or a count that does not match.
    """
    steps = [list(shapes)]
    for i, op in enumerate(ops):
        spec = OPS[op.name]
        now = steps[-1]
        if spec.arity == "one->many" and len(now) != 1:
            raise OpError(f"{op.name}: takes one tensor, gets {len(now)} (cat or stack them first)")
        if spec.arity == "many->one" and len(now) < 2:
            raise OpError(f"{op.name}: takes several tensors, gets {len(now)}")
        if op.name == "split":
            now = _split(op, now, targets, last=i == len(ops) - 1)
        else:
            now = spec.shapes(op, now, targets)
        steps.append(now)
    return steps


def changes_layout(ops: Sequence[Op]) -> bool:
    """Whether the ops change what a module computes from its input, not only how its
    tensors are stored: such modules are not compared one to one by `--check`."""
    return any(OPS[op.name].changes_layout for op in ops)
