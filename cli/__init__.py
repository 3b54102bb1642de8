"""The ``datamanip`` command line (installed as the ``datamanip.cli`` package).

Each subcommand only parses and checks its options, then calls one library function.
"""

from datamanip.cli import data, report, run, weight  # noqa: E402,F401  (registers the subcommands)
from datamanip.cli.app import app, main

__all__ = ["app", "main"]
