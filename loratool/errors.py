"""Errors the library raises for bad input. The CLI renders them as one line plus a hint."""

from __future__ import annotations


class LoratoolError(Exception):
    """A problem with the user's input or environment, not a bug.

    Args:
        message: one line saying what is wrong (name the file / key / shapes).
        hint: one line saying what to try.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class FormatError(LoratoolError):
    """The file is not a readable model file (truncated, corrupt header, unknown container)."""


class UnsafePickleError(LoratoolError):
    """A pickle asked for a global outside the allow-list; nothing was executed."""


class DetectionError(LoratoolError):
    """The architecture, naming or adapter family could not be decided."""


class MappingError(LoratoolError):
    """Keys that map to no target weight, or targets whose shapes disagree."""


class OutputError(LoratoolError):
    """The output path is unusable: exists without --force, equals an input, cannot be written."""


class InternalError(Exception):
    """An invariant of loratool's own code failed: a bug, not bad input (exit code 1, "please report")."""


def listing(keys, limit: int = 8) -> str:
    """Render a few keys for an error message: ``a, b, c (+12 more)``."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f" (+{len(keys) - limit} more)"
    return shown
