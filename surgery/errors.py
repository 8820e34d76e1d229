"""The failures a user can meet, each with its message and exit code.

Every message names the file (or argument) at fault and, where one helps, the
fix. The CLI prints `error: <where>: <message>` and exits with `exit_code`.
"""

from __future__ import annotations

from typing import Any


class SurgeryError(Exception):
    """Base of every user-facing failure."""

    exit_code = 1

    def __init__(self, where: object, message: str, *, hint: str | None = None):
        super().__init__(f"{where}: {message}")
        self.where = str(where)
        self.message = message
        self.hint = hint
        self.findings: list[Any] = []  # what was seen before the failure


class UsageError(SurgeryError):
    """The command line or a call's arguments are wrong."""

    exit_code = 2


class BadArgument(UsageError):
    """One argument has a value that cannot work. `param` is its name in the library call
    (`strip_prefix`); the CLI shows the flag it came from (`--strip-prefix`)."""

    def __init__(self, param: str, message: str, *, hint: str | None = None):
        super().__init__(param, message, hint=hint)
        self.param = param


class NotFound(SurgeryError):
    """The path does not exist, or a folder holds no checkpoint."""


class NotACheckpoint(SurgeryError):
    """The bytes are not any checkpoint format surgery reads."""


class CorruptCheckpoint(SurgeryError):
    """The file is a checkpoint but damaged or inconsistent."""


class UnsupportedTensor(SurgeryError):
    """A tensor kind that surgery lists but cannot rebuild from its bytes."""
