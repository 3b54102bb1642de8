"""The ``datamanip`` command line (installed as the ``datamanip.cli`` package).

Each subcommand only parses and checks its options, then calls one library function.
"""

from datamanip.cli import augment, data, report, run, weight  # noqa: E402,F401  (registers)
from datamanip.cli.app import app, main

__all__ = ["app", "main"]
