"""Typed errors that callers (and the CLI) tell apart by class, never by message text.

>>> from dataorder.errors import MissingExtraError, require
>>> require("math", extra="cli").sqrt(4.0)
2.0
>>> try:
...     require("no_such_package_xyz", extra="cli", feature="dataorder score")
... except MissingExtraError as error:
...     print(error)
dataorder score needs the optional package 'no_such_package_xyz': pip install 'dataorder[cli]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DataorderError", "MissingExtraError", "require"]


class DataorderError(Exception):
    """Base of the errors dataorder defines for callers to catch by class."""


class MissingExtraError(DataorderError, ImportError):
    """An optional package of an extra (``dataorder[cli]``, ``[plot]``) is not installed."""

    def __init__(self, module: str, extra: str, feature: str | None = None) -> None:
        self.module, self.extra = module, extra
        what = feature or "this feature"
        super().__init__(f"{what} needs the optional package {module!r}: pip install 'dataorder[{extra}]'")


def require(module: str, *, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.partition(".")[0]
        if error.name is not None and error.name.partition(".")[0] == top:
            raise MissingExtraError(top, extra, feature) from None
        raise
