"""Typed, one-line errors.

Every error a user can cause is an ``OnecardError`` whose message names the
problem and the fix in one line; the CLI prints it without a traceback and
exits with code 2. Library callers can catch the specific subclass.
"""

from __future__ import annotations


class OnecardError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` is one line."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            raise AssertionError("OnecardError messages must be one line")
        super().__init__(message)


class ModelFolderError(OnecardError):
    """The model folder is missing, incomplete or corrupt."""


class UnsupportedModelError(OnecardError):
    """The architecture or format is one onecard does not run."""


class DoesNotFitError(OnecardError):
    """The job needs more GPU memory than is available; says how much and what would fit."""


class BadInputError(OnecardError, ValueError):
    """A user-supplied value is out of range or malformed (also a ValueError)."""


class MissingExtraError(OnecardError, ImportError):
    """An optional dependency group is not installed."""


class NotBuiltYetError(OnecardError, NotImplementedError):
    """A job or option that onecard does not implement yet (never a fake result)."""


def require_extra(module: str, extra: str) -> None:
    """Import-check an optional dependency and raise a one-line install hint if absent."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"'{module}' is not installed; install it with: pip install 'onecard[{extra}]'"
        )
