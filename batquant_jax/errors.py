"""The two kinds of failure every command reports in one line.

``UserError`` (a ValueError): bad input -- a flag, a path, a damaged file, a model the library
cannot read; the commands print ``error: <message>`` and exit with 2. ``RunError`` (a
RuntimeError): a run that could not finish its job -- a failed write, a non-finite result; exit
1. Every error class of the package derives from one of them, so a caller (or a command) catches
one base instead of a list.
"""


class UserError(ValueError):
    """Bad input; the message is one line."""


class RunError(RuntimeError):
    """The run could not finish; the message is one line."""
