"""The values every layer shares: a tensor's entry (name, shape, dtype), a finding about
a file, and which names are one tensor (tied weights). Pure and dependency-free."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from surgery.dtypes import BY_NAME

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """A key with its shape and dtype, on either side."""

    name: str
    shape: Shape
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of its data, sub-byte dtypes packed."""
        return (self.numel * BY_NAME[self.dtype].bits + 7) // 8


@dataclass(frozen=True)
class Finding:
    severity: str
    message: str
    where: str = ""

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "message": self.message, "where": self.where}

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.severity}: {self.message}{where}"


def ties(views: Iterable[tuple[str, Hashable]]) -> dict[str, str]:
    """Names that are the very same tensor as an earlier name: alias -> the first name.

    One rule for every side (a file's tensors, a built model's state_dict): two names
    are one tensor when they view the same storage at the same offset with the same
    shape, stride and dtype, which is what `view` must identify. Parts of one storage
    (views of different rows) are not ties.

    Example:
        >>> ties([("embed.weight", (1, 0)), ("lm_head.weight", (1, 0)), ("fc.bias", (2, 0))])
        {'lm_head.weight': 'embed.weight'}
    """
    first: dict[Hashable, str] = {}
    out: dict[str, str] = {}
    for name, view in views:
        if view in first:
            out[name] = first[view]
        else:
            first[view] = name
    return out


def both_ways(aliases: dict[str, str]) -> dict[str, str]:
    """Each tied name -> another name of the same tensor, the first name included
    (so a lookup from either side finds the other)."""
    out = dict(aliases)
    for alias, kept in aliases.items():
        out.setdefault(kept, alias)
    return out
