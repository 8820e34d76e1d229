"""Comparing two checkpoints: keys, shapes, dtypes, then values one tensor at a time.

Headers are compared first (instant at any size). Tensors in both are compared
as bytes where both lie in their files as plain contiguous data (no torch, a
memcmp of the mapped ranges); only when the bytes differ, or cannot be compared
as they lie, are the values read, in chunks, to measure the difference. Memory
follows the chunk, not the checkpoint.
"""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from surgery.commands.requests import Request, given
from surgery.errors import BadArgument, SurgeryError
from surgery.formats.checkpoint import Checkpoint, TensorInfo, open_checkpoint, open_trusted
from surgery.names import wrapper_prefixes
from surgery.plans.keys import KeyRules
from surgery.text import human_bytes

CHUNK = 1 << 22  # elements compared at a time: 32 MiB as float64
# Views that repeat stored bytes along the same dimensions (stride 0 in both) are compared
# once along them. Any other comparison reading more than this many times the bytes both
# files hold for the tensor (plus a floor) is refused: a 1.6 KB file can view 4 bytes as
# 2**40 floats, and comparing them one by one would take days.
MAX_EXPANSION = 4
EXPANSION_FREE = 256 << 20


@dataclass(frozen=True)
class Difference:
    """A tensor in both checkpoints whose shape, dtype or values differ."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    max_abs: float | None = None  # None when the values were not compared
    max_rel: float | None = None  # |a - b| / |a|, over elements where a != 0
    differing: int | None = None  # elements that differ (NaN against NaN is equal)
    nan: int = 0  # of them, NaN on one side only
    inf: int = 0  # of them, infinite on one side only (or both, of opposite signs)
    nan_both: int = 0  # NaN on both sides at the same place: equal, said apart

    @property
    def moved(self) -> bool:
        """Whether any value differs, or is NaN on both sides (equal, but not a number)."""
        return bool(self.differing or self.nan or self.nan_both)

    @property
    def kind(self) -> str:
        if self.shape_a != self.shape_b:
            return "shape"
        return "dtype" if self.dtype_a != self.dtype_b else "values"

    def describe(self) -> str:
        if self.kind == "shape":
            return f"{self.name}: shape {list(self.shape_a)} vs {list(self.shape_b)}"
        text = f"{self.name}: "
        if self.kind == "dtype":
            text += f"dtype {self.dtype_a} vs {self.dtype_b}"
            if self.max_abs is not None:
                text += ", "
        if self.max_abs is not None and not self.differing and not self.nan:
            text += (
                "values equal" if self.kind == "dtype" else "equal values, other bits (-0.0 or NaN payloads)"
            )
        elif self.max_abs is not None:
            numel = math.prod(self.shape_a)
            text += f"{self.differing:,} of {numel:,} differ"
            if self.inf:
                text += f" ({self.inf:,} inf on one side)"
            text += f", max abs {self.max_abs:.3g}"
            if self.max_rel is not None:
                text += f", max rel {self.max_rel:.3g}"
        if self.nan:
            text += f", {self.nan:,} NaN on one side"
        if self.nan_both:
            text += f", {self.nan_both:,} NaN in both"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": [list(self.shape_a), list(self.shape_b)],
            "dtype": [self.dtype_a, self.dtype_b],
            "max_abs": _finite(self.max_abs),
            "max_rel": _finite(self.max_rel),
            "differing": self.differing,
            "nan": self.nan,
            "inf": self.inf,
            "nan_both": self.nan_both,
        }


@dataclass(frozen=True)
class DiffReport:
    a: str
    b: str
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    differences: tuple[Difference, ...]
    identical: int  # tensors in both with the same shape, dtype and bytes
    compared: int  # tensors in both
    structure_only: bool = False
    bytes_read: int = 0
    seconds: float = 0.0
    steps: tuple[str, ...] = ()

    @property
    def same(self) -> bool:
        return not (self.only_a or self.only_b or self.differences)

    def summary(self) -> str:
        if self.same:
            what = "same names, shapes and dtypes" if self.structure_only else "identical"
            return f"{what}: {self.compared} tensors"
        kinds = [d.kind for d in self.differences]
        counts = [(len(self.only_a), "only in A"), (len(self.only_b), "only in B")]
        counts += [(kinds.count("shape"), "other shape"), (kinds.count("dtype"), "other dtype")]
        if self.structure_only:
            counts.append((self.compared - len(kinds), "alike (values not read)"))
        else:
            counts += [(kinds.count("values"), "other values"), (self.identical, "identical")]
        parts = [f"{n} {what}" for n, what in counts if n]
        return "differ: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "a": self.a,
            "b": self.b,
            "same": self.same,
            "summary": self.summary(),
            "structure_only": self.structure_only,
            "steps": list(self.steps),
            "only_in_a": list(self.only_a),
            "only_in_b": list(self.only_b),
            "differences": [d.to_json() for d in self.differences],
            "identical": None if self.structure_only else self.identical,
            "in_both": self.compared,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class DiffRequest(Request):
    """What `surgery diff` compares, as one value (flags, a TOML file, or a script). The key
    rules apply to both sides."""

    a: str
    b: str
    keys: KeyRules = KeyRules()
    structure_only: bool = False
    trust: bool = False

    FILE_FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "a": str,
        "b": str,
        **KeyRules.FILE_FIELDS,
        "structure_only": bool,
    }

    def __post_init__(self) -> None:
        for side in ("a", "b"):
            if not getattr(self, side):
                raise BadArgument(side, "name both checkpoints to compare")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, file: str | None = None, from_file: frozenset = frozenset()
    ) -> DiffRequest:
        fields = given(fields)
        return cls(
            str(fields.get("a") or ""),
            str(fields.get("b") or ""),
            KeyRules.from_fields(fields),
            bool(fields.get("structure_only")),
            bool(fields.get("trust")),
        )


def diff(
    a: str | Path | Checkpoint,
    b: str | Path | Checkpoint,
    *,
    structure_only: bool = False,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    add_prefix: str | None = None,
    rename: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    trust: bool = False,
) -> DiffReport:
    """Compare two checkpoints of any formats (`diff_files` with a request; `a` and `b`
    may also be opened checkpoints).

    Args:
        structure_only: compare names, shapes and dtypes from the headers; read no data.
        key: the container to compare in both (else each file's own state_dict).
        strip_prefix, add_prefix, rename: applied to the names on both sides (`module.`).
        include, exclude: globs over the names after those rules.
        trust: compare the tensors of files with unsafe findings (never executed).
    """
    rules = KeyRules.parse(
        key=key,
        strip_prefix=strip_prefix,
        add_prefix=add_prefix,
        rename=rename,
        include=include,
        exclude=exclude,
    )
    return _diff(a, b, rules, structure_only=structure_only, trust=trust)


def diff_files(request: DiffRequest) -> DiffReport:
    """`surgery diff` as a library call."""
    return _diff(
        request.a, request.b, request.keys, structure_only=request.structure_only, trust=request.trust
    )


def _diff(
    a: str | Path | Checkpoint,
    b: str | Path | Checkpoint,
    rules: KeyRules,
    *,
    structure_only: bool,
    trust: bool,
) -> DiffReport:
    started = time.perf_counter()
    key = rules.key
    if structure_only:  # headers only: nothing is loaded, so nothing needs trust
        ca = a if isinstance(a, Checkpoint) else open_checkpoint(a, key=key)
        cb = b if isinstance(b, Checkpoint) else open_checkpoint(b, key=key)
    else:
        ca = open_trusted(a, key=key, trust=trust, purpose="compare")
        cb = open_trusted(b, key=key, trust=trust, purpose="compare")
    names_a, names_b, steps = _aligned(ca, cb, rules)
    info_a, info_b = ca.tensors_by_name, cb.tensors_by_name
    in_b = {new: old for old, new in names_b.items()}
    in_a = set(names_a.values())
    differences: list[Difference] = []
    identical = read = 0
    both = [(old, new) for old, new in names_a.items() if new in in_b]
    for old_a, name in both:
        ta, tb = info_a[old_a], info_b[in_b[name]]
        if structure_only or ta.shape != tb.shape:
            if ta.shape != tb.shape or ta.dtype != tb.dtype:
                differences.append(Difference(name, ta.shape, tb.shape, ta.dtype, tb.dtype))
            continue
        found = _compare(ca, cb, ta, tb, name)
        read += (ta.nbytes + tb.nbytes) // _repeats(ca, ta.name, cb, tb.name)[1]
        if found is None:
            identical += 1
        else:
            differences.append(found)
    return DiffReport(
        str(ca.path),
        str(cb.path),
        tuple(new for new in names_a.values() if new not in in_b),
        tuple(new for new in names_b.values() if new not in in_a),
        tuple(differences),
        identical,
        len(both),
        structure_only,
        read,
        time.perf_counter() - started,
        tuple(steps),
    )


def _aligned(
    ca: Checkpoint, cb: Checkpoint, rules: KeyRules
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Both sides' names after the rules; without a prefix to strip, a wrapper prefix
    (`module.`, `_orig_mod.`, `model.`) on one side only is stripped when that makes names meet."""

    def side(ckpt: Checkpoint, label: str, strip: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
        kept, done = replace(rules, strip_prefix=strip).apply(t.name for t in ckpt.tensors)
        return kept, [f"{label}: {d}" for d in done]

    if rules.strip_prefix:
        (a, done_a), (b, done_b) = side(ca, "A", rules.strip_prefix), side(cb, "B", rules.strip_prefix)
        return a, b, done_a + done_b
    plain_a, plain_b = side(ca, "A", ())[0], side(cb, "B", ())[0]
    (wrapped_a, done_a), (wrapped_b, done_b) = (
        side(c, label, tuple(p for p, _ in wrapper_prefixes(c.prefix))) for c, label in ((ca, "A"), (cb, "B"))
    )
    best = (len(set(plain_a.values()) & set(plain_b.values())), plain_a, plain_b, [])
    for a, b, done in (
        (wrapped_a, plain_b, done_a),
        (plain_a, wrapped_b, done_b),
        (wrapped_a, wrapped_b, done_a + done_b),
    ):
        common = len(set(a.values()) & set(b.values()))
        if common > best[0]:
            best = (common, a, b, done)
    return best[1], best[2], [d for d in best[3] if "--include" not in d]


def _compare(ca: Checkpoint, cb: Checkpoint, ta: TensorInfo, tb: TensorInfo, name: str) -> Difference | None:
    """None when both tensors hold the same bytes; else how their values differ."""
    if ta.dtype == tb.dtype and same_tensor(ca, ta.name, cb, tb.name):
        return None
    try:
        return _measure(ca, cb, ta, tb, name)
    finally:
        ca.release(ta.name)
        cb.release(tb.name)


def same_tensor(ca: Checkpoint, a: str, cb: Checkpoint, b: str, *, cast: str | None = None) -> bool:
    """Whether tensor `b` of `cb` holds exactly the bytes of tensor `a` of `ca` (cast to the
    dtype `cast` first, when given). Byte ranges are compared without torch where both lie as
    plain data, else the tensors piece by piece; memory follows the piece."""
    ta, tb = ca.tensors_by_name[a], cb.tensors_by_name[b]
    want = cast or ta.dtype
    if ta.shape != tb.shape or tb.dtype != want:
        return False
    try:
        ra, rb = ca.byte_range(a), cb.byte_range(b)
        if want == ta.dtype and ra is not None and rb is not None:
            return _same_range(ra, rb)
        import torch

        from surgery.formats.tensors import same_bytes

        dtype = getattr(torch, want)
        dims, _ = _repeats(ca, a, cb, b)
        pairs = zip(ca.pieces(a, CHUNK, collapse=dims), cb.pieces(b, CHUNK, collapse=dims), strict=True)
        return all(same_bytes(pa.to(dtype), pb) for pa, pb in pairs)
    finally:
        ca.release(a)
        cb.release(b)


def _repeats(ca: Checkpoint, a: str, cb: Checkpoint, b: str) -> tuple[frozenset[int], int]:
    """The dimensions along which both tensors repeat one value, compared at index 0 only,
    and how many times each compared element counts.

    Raises:
        SurgeryError: the comparison left would read far more than the files hold for the
            tensors (views that repeat along different dimensions, or overlap).
    """
    ta, tb = ca.tensors_by_name[a], cb.tensors_by_name[b]
    dims = ca.repeated_dims(a) & cb.repeated_dims(b)
    weight = math.prod(ta.shape[d] for d in dims)
    work = (ta.nbytes + tb.nbytes) // weight
    held = ca.span(a) + cb.span(b)
    if work > MAX_EXPANSION * held + EXPANSION_FREE:
        side, name = (ca, a) if ta.nbytes * cb.span(b) >= tb.nbytes * ca.span(a) else (cb, b)
        raise SurgeryError(
            side.path,
            f"tensor {name!r} is {human_bytes(side.tensors_by_name[name].nbytes)} viewed from "
            f"{human_bytes(side.span(name))} of the file: comparing it would read {human_bytes(work)}",
            hint=f"leave it out with --exclude {name}",
        )
    return dims, weight


def _same_range(ra: tuple[str, int, int], rb: tuple[str, int, int]) -> bool:
    """Two byte ranges compared through read-only mappings, 16 MiB at a time."""
    (pa, oa, n), (pb, ob, nb) = ra, rb
    if n != nb:
        return False
    step = 16 << 20
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        for start in range(0, n, step):
            size = min(step, n - start)
            if _window(fa, oa + start, size) != _window(fb, ob + start, size):
                return False
    return True


def _window(f, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`, through a mapping of only those pages."""
    if size == 0:
        return b""
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(f.fileno(), size + offset - base, access=mmap.ACCESS_READ, offset=base) as mm:
        return mm[offset - base : offset - base + size]


def _measure(ca: Checkpoint, cb: Checkpoint, ta: TensorInfo, tb: TensorInfo, name: str) -> Difference | None:
    """Max absolute and relative difference, counted piece by piece (memory follows the
    piece). NaN on both sides at the same place counts as equal (as `equal_nan`), and is
    counted apart; elements infinite on one side are counted too (a cast that overflowed).
    Values are compared in float32 when both dtypes fit in it exactly, as int64 when both
    are integers, else in float64."""
    import torch

    from surgery.formats.tensors import same_bytes

    work = _working_dtype(ta.dtype, tb.dtype)
    max_abs = max_rel = 0.0
    differing = nan = inf = nan_both = 0
    bitwise, rel_seen = True, False
    dims, weight = _repeats(ca, ta.name, cb, tb.name)  # each element compared stands for `weight`
    pieces_a = ca.pieces(ta.name, CHUNK, collapse=dims)
    for pa, pb in zip(pieces_a, cb.pieces(tb.name, CHUNK, collapse=dims), strict=True):
        if ta.dtype == tb.dtype and same_bytes(pa, pb):
            if pa.is_floating_point():
                nan_both += int(torch.isnan(pa).sum()) * weight
            continue
        bitwise = False
        x, y = pa.to(work), pb.to(work)
        both_nan = torch.isnan(x) & torch.isnan(y)
        nan_both += int(both_nan.sum()) * weight
        unequal = x != y
        if not bool(unequal.any()):
            continue
        one_nan = (torch.isnan(x) | torch.isnan(y)) & ~both_nan
        unequal &= ~both_nan
        differing += int(unequal.sum()) * weight
        nan += int(one_nan.sum()) * weight
        inf += int((unequal & (torch.isinf(x) | torch.isinf(y))).sum()) * weight
        delta = (x - y).abs()
        delta.masked_fill_(~unequal | one_nan, 0)
        max_abs = max(max_abs, float(delta.max()))
        size = x.abs()
        nonzero = size > 0
        if bool(nonzero.any()):
            rel_seen = True
            rel = delta / size  # where A is infinite the relative difference is undefined: left out
            max_rel = max(max_rel, float(rel.masked_fill_(~nonzero | ~torch.isfinite(size), 0).max()))
        del x, y, delta, size
    if bitwise and ta.dtype == tb.dtype:
        return None
    return Difference(
        name,
        ta.shape,
        tb.shape,
        ta.dtype,
        tb.dtype,
        max_abs,
        max_rel if rel_seen else None,
        differing,
        nan,
        inf,
        nan_both,
    )


def _working_dtype(a: str, b: str):
    """The dtype two tensors' values are compared in: exact for both, as small as that allows."""
    import torch

    if a.startswith("complex") or b.startswith("complex"):
        return torch.complex128
    if {a, b} <= {"float32", "float16", "bfloat16", "int8", "uint8", "int16", "bool"}:
        return torch.float32
    integers = {"int8", "uint8", "int16", "int32", "int64", "uint16", "uint32", "bool"}
    return torch.int64 if {a, b} <= integers else torch.float64


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None
