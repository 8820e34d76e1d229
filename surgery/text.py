"""Words for numbers and names, shared by every report: sizes, counts, shares, and names
from files made safe to print. Pure and dependency-free."""

from __future__ import annotations

import math


def printable(text: str) -> str:
    """`text` as it may reach a terminal or a log: characters with no glyph written as escapes.

    Names come from the file: an escape code in one would clear the screen or
    forge a line, a bidi override would reorder what is read, a lone surrogate
    cannot be encoded at all. Control characters, surrogates, format and
    private-use characters and separators other than the space become Python
    escapes (`\\x1b`, `\\n`, `\\ud800`, `\\u202e`); every printable character,
    CJK included, stays as it is. Every renderer and error line goes through here.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def human_count(n: int) -> str:
    """11689512 -> '11.7M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def human_bytes(n: int) -> str:
    """46758912 -> '44.6 MiB'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def percent(share: float) -> str:
    """0.99991 -> '99.99%': never rounds a partial share up to 100% (0.999998 -> '99.99%')."""
    text = f"{share:.1%}"
    if text != "100.0%" or share >= 1:
        return text
    text = f"{share:.2%}"
    return f"{math.floor(share * 10000) / 100:.2f}%" if text == "100.00%" else text  # 99.99% at most
