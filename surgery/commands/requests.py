"""Requests read from files: a TOML file's fields, checked against a command's table.

Each command's request (`PortRequest`, ...) declares the fields a file may hold and
their TOML types; this reads and checks them, naming the file and the field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from surgery.errors import UsageError


def read_fields(path: str | Path, types: Mapping[str, type]) -> dict[str, Any]:
    """The fields of a TOML file, checked: unknown fields and wrong types are errors.

    Raises:
        UsageError: naming the file, and the fields or the type at fault.
    """
    import tomllib

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(path, "no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(path, f"not a TOML file ({exc})") from None
    unknown = sorted(set(doc) - set(types))
    if unknown:
        raise UsageError(
            path,
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
            hint=f"fields: {', '.join(types)}",
        )
    for name, value in doc.items():
        expected = types[name]
        ok = isinstance(value, expected) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok or (expected is int and isinstance(value, bool)):
            raise UsageError(
                path, f"field {name!r} should be {expected.__name__}, not {type(value).__name__}"
            )
    return doc
