"""Errors a user can fix.

A `UserError` is a problem with the user's input, config or files. The CLI prints it as one line and exits with
code 2, so a bad value never ends in a traceback. Anything else that escapes is a bug in cmkd.
"""


class UserError(Exception):
    """A problem with the user's input, config or files; the CLI prints it as one line and exits 2."""
