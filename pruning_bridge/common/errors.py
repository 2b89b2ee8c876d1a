"""The one kind of error that means "bad input": the message says what to do.

Command lines print a ``UsageError`` on one line and exit with status 2; any other exception is
a bug and keeps its traceback (exit 1). ``UsageError`` is a ``ValueError``, and the named errors
of the toolkit derive from it as well as from their natural built-in class.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input (an argument, a file, a model or data that cannot be used as given)."""


class OutOfRangeError(UsageError, IndexError):
    """An index (layer, head) outside the model."""
