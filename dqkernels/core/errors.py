"""The one error policy: bad input raises :class:`InputError`; everything else is a bug.

The command line prints an ``InputError`` (and an ``OSError``) as one ``Error:`` line; any other
exception keeps its traceback, because it means the tool itself is wrong.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input — a file, an argument or a config value the user can fix. The message names it."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type. Still a ``TypeError`` for callers that catch that."""


class EngineError(RuntimeError):
    """An engine produced an invalid result (not a partition, a non-finite score). A bug: the
    result is discarded and the message names the engine."""
