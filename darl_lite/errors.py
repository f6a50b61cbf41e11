"""The errors darl-lite raises on purpose.

Every error says what was expected, what came, and how to fix it. Callers that embed the runtime
catch :class:`DarlLiteError` to tell our documented failures from bugs.
"""

from __future__ import annotations


class DarlLiteError(Exception):
    """Base class of every error darl-lite raises deliberately."""


class InputError(DarlLiteError, ValueError):
    """A query, an item or a parameter passed to the runtime breaks a documented rule."""


class DataError(DarlLiteError, ValueError):
    """A data file (pairs or teacher outputs) is malformed; the message names the line and field."""


class BundleError(DarlLiteError):
    """A bundle directory is missing a file, has been tampered with, or has an unknown format."""


class MissingExtraError(DarlLiteError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    @classmethod
    def for_module(cls, module: str, extra: str) -> MissingExtraError:
        return cls(
            f"{module!r} is not installed; it comes with the {extra!r} extra: "
            f'pip install "darl-lite[{extra}]"'
        )
