"""What a floating-point cast lost beyond rounding: finite values made infinite (overflow),
finite values made NaN, non-zero values made zero (flushed). Counted from the bits of a piece
before and after the cast, so a cast made by torch and one made by numpy are judged alike,
without importing torch (numpy has no bfloat16: every dtype is read as unsigned words).

`convert` and `port` count every narrowing cast piece by piece and refuse an output that lost
values unless the caller allows it (`--allow-lossy-cast`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Union

from surgery.errors import SurgeryError

Buffer = Union[bytes, bytearray, memoryview]  # a piece's raw bytes (anything numpy.frombuffer reads)


class _Bits(NamedTuple):
    word: str  # numpy's little-endian unsigned word of this width
    exponent: int  # exponent bits
    mantissa: int  # stored mantissa bits
    infinity: int  # the bits of +inf: magnitudes above it are NaN

    @property
    def magnitude(self) -> int:
        """Every bit but the sign."""
        return self.infinity | ((1 << self.mantissa) - 1)


FLOATS = {
    "float64": _Bits("<u8", 11, 52, 0x7FF0000000000000),
    "float32": _Bits("<u4", 8, 23, 0x7F800000),
    "float16": _Bits("<u2", 5, 10, 0x7C00),
    "bfloat16": _Bits("<u2", 8, 7, 0x7F80),
}


@dataclass(frozen=True)
class CastLosses:
    """Elements of one tensor that a cast from `source` to `target` changed past rounding."""

    source: str
    target: str
    overflow: int = 0  # finite -> +-inf
    nan: int = 0  # finite -> NaN
    flushed: int = 0  # non-zero -> +-0

    def __bool__(self) -> bool:
        return bool(self.overflow or self.nan or self.flushed)

    def __add__(self, other: CastLosses) -> CastLosses:
        return CastLosses(
            self.source,
            self.target,
            self.overflow + other.overflow,
            self.nan + other.nan,
            self.flushed + other.flushed,
        )

    @property
    def change(self) -> str:
        return f"{self.source} -> {self.target}"

    def describe(self) -> str:
        """`3 overflow to inf, 1 flushed to zero`."""
        parts = [
            (self.overflow, "overflow to inf"),
            (self.nan, "became NaN"),
            (self.flushed, "flushed to zero"),
        ]
        return ", ".join(f"{n:,} {what}" for n, what in parts if n) or "nothing lost"

    def to_json(self) -> dict[str, Any]:
        return {"cast": self.change, "overflow": self.overflow, "nan": self.nan, "flushed": self.flushed}


def may_lose(source: str, target: str) -> bool:
    """Whether casting `source` to `target` can overflow, make NaN or flush to zero: both
    floating, and `target` lacks exponent or mantissa bits of `source` (float32 -> bfloat16
    overflows by rounding up near the top; float16 -> bfloat16 never loses)."""
    if source == target or source not in FLOATS or target not in FLOATS:
        return False
    s, t = FLOATS[source], FLOATS[target]
    if t.exponent >= s.exponent and t.mantissa >= s.mantissa:
        return False  # every value is exact
    return (source, target) != ("float16", "bfloat16")  # wider range both ways: only rounding


def count_losses(source: Buffer, cast: Buffer, source_dtype: str, target_dtype: str) -> CastLosses:
    """Count what casting one piece lost, from its little-endian bytes before (`source`) and
    after (`cast`) the cast, element for element.

    The cast piece is scanned for zeros, infinities and NaNs (rare in weights) in three
    passes; only when there are some are they located and looked up in the source.

    Raises:
        ValueError: a dtype that is not float64/32/16 or bfloat16, or pieces of other lengths.

    Example:
        >>> x = np.array([-1e9, 1e-8, 1.0], np.float32)
        >>> count_losses(x.tobytes(), x.astype(np.float16).tobytes(), "float32", "float16").describe()
        '1 overflow to inf, 1 flushed to zero'
    """
    import numpy as np

    if source_dtype not in FLOATS or target_dtype not in FLOATS:
        raise ValueError(f"not a floating cast: {source_dtype} -> {target_dtype}")
    s, t = FLOATS[source_dtype], FLOATS[target_dtype]
    before = np.frombuffer(source, dtype=s.word)
    after = np.frombuffer(cast, dtype=t.word)
    if before.size != after.size:
        raise ValueError(f"{before.size} elements before the cast, {after.size} after")
    word = after.dtype.type
    # 0 and every magnitude >= inf, in one comparison: magnitude - 1 wraps 0 round to the top.
    special = np.bitwise_and(after, word(t.magnitude))
    np.subtract(special, word(1), out=special)
    if special.size == 0 or special.max() < t.infinity - 1:  # a reduction: no mask made
        return CastLosses(source_dtype, target_dtype)
    where = np.flatnonzero(special >= word(t.infinity - 1))
    was = before[where] & before.dtype.type(s.magnitude)
    now = after[where] & word(t.magnitude)
    finite = was < s.infinity
    return CastLosses(
        source_dtype,
        target_dtype,
        overflow=int(np.count_nonzero(finite & (now == t.infinity))),
        nan=int(np.count_nonzero(finite & (now > t.infinity))),
        flushed=int(np.count_nonzero(finite & (was != 0) & (now == 0))),
    )


def tally(lossy: dict[str, CastLosses], name: str, lost: CastLosses) -> None:
    """Add one piece's losses to tensor `name`'s in `lossy` (a tensor is cast piece by piece)."""
    if lost:
        lossy[name] = lossy[name] + lost if name in lossy else lost


class LossyCast(SurgeryError):
    """A cast lost values (overflow, NaN, flushed to zero) and the caller did not allow it:
    nothing was written. The report (convert's or port's) rides on it."""

    def __init__(self, where: object, report: Any, losses: dict[str, CastLosses]):
        worst = max(losses, key=lambda name: (losses[name].overflow + losses[name].nan, losses[name].flushed))
        where_lost = f"in {len(losses)} tensors, most in {worst}" if len(losses) > 1 else f"in {worst}"
        super().__init__(
            where,
            f"the cast {losses[worst].change} loses values {where_lost}: {losses[worst].describe()}",
            hint="nothing was written: pass --allow-lossy-cast to write it anyway, or cast to a dtype with "
            "more range (bf16 has float32's)",
        )
        self.report = report
        self.losses = losses
