"""The two kinds of error moeport raises on purpose, and the warning it gives.

A ``MoeportError`` is a *user* error: a bad path, a config we cannot read, a provider that is not
installed, a shapes string that does not parse. The CLI prints its message as one line and exits with
``exit_code`` and no traceback. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoeportError(Exception):
    """A problem the user can fix; the message says what it is and, where there is one, the fix."""

    exit_code = 1


class UsageError(MoeportError):
    """The command line itself is wrong (an option value that does not parse)."""

    exit_code = 2


class MoeportWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one ``warning:`` line)."""
