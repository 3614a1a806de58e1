"""The CLI's own error: a user mistake shown as one line.

>>> from dataorder.cli.errors import UsageError
>>> str(UsageError("--runs must be >= 1, got 0"))
'--runs must be >= 1, got 0'
"""

from __future__ import annotations

from dataorder.errors import DataorderError

__all__ = ["UsageError"]


class UsageError(DataorderError):
    """A user mistake: printed as one line, exit status 2, no traceback."""
