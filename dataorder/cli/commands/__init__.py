"""Subcommands of the ``dataorder`` CLI, one module each (see :mod:`dataorder.cli.main`)."""
