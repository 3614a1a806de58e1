"""The ``dataorder`` command (the ``[cli]`` extra: ``pip install 'dataorder[cli]'``).

:func:`main` is the console script; each subcommand is a module of
:mod:`dataorder.cli.commands` with ``configure(parser)`` and ``run(args) -> int``.

>>> from dataorder.cli import main
>>> callable(main)
True
"""

from dataorder.cli.errors import UsageError
from dataorder.cli.main import main

__all__ = ["UsageError", "main"]
