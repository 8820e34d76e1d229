"""Requests: what a command does, as one value, from flags, a TOML file or a script.

Each command's request (`PortRequest`, `ConvertRequest`, `DiffRequest`) declares the
fields a file may hold with their TOML types, and builds itself from flat fields (the
flags' long names). A file never holds what only its caller may decide (`trust`,
`force`, `dry_run`). Errors name the file and the field, or the parameter at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from surgery.errors import UsageError


class Request:
    """The shape every command's request shares: `from_fields`, `from_file`."""

    # The fields a request file may hold, with their TOML types (a tuple: any of them).
    FILE_FIELDS: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, file: str | None = None, from_file: frozenset = frozenset()
    ):
        """The request from flat fields; `file` and `from_file` say which came from a file."""
        raise NotImplementedError

    @classmethod
    def check_file(cls, path: Path, doc: dict[str, Any]) -> None:
        """Checks of a file's fields beyond their types (none by default)."""

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any):
        """A request file's request; `overrides` (the flags given, None for unset) win."""
        doc = read_fields(path, cls.FILE_FIELDS)
        cls.check_file(Path(path), doc)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_fields({**doc, **given}, file=str(path), from_file=frozenset(set(doc) - set(given)))


def given(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that were given: those set to None are left at their defaults."""
    return {k: v for k, v in fields.items() if v is not None}


def read_fields(path: str | Path, types: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
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
        expected = types[name] if isinstance(types[name], tuple) else (types[name],)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        ok = ok or (float in expected and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            wanted = " or ".join(t.__name__ for t in expected)
            raise UsageError(path, f"field {name!r} should be {wanted}, not {type(value).__name__}")
    return doc
