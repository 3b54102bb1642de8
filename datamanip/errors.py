"""The one error type users see.

Anything raised as :class:`DatamanipError` is bad input or a bad state the user can fix; the CLI
prints its message on one line and exits with status 2, without a traceback.
"""


class DatamanipError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
