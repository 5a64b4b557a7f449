"""The one exception type for bad user input.

Anything the user can fix (a missing file, an unknown config key, a corrupt shard, a batch size that does not
divide) raises :class:`UserError` with a one-line message naming the problem and the fix. Entry points turn it
into ``error: <message>`` on stderr and exit code 2. Bugs in our own code raise ordinary exceptions and keep
their traceback.
"""

import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


EXIT_USER_ERROR = 2


def report(error: UserError) -> int:
    """Prints ``error: <message>`` on stderr (the entry points' one line) and returns the exit code, 2."""
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C


def report_interrupted(state: str) -> int:
    """Ctrl-C's one line, ``error: interrupted; <state>`` (what is kept and how to go on) instead of a
    KeyboardInterrupt traceback; returns the exit code, 130."""
    print(f"error: interrupted; {state}", file=sys.stderr)
    return EXIT_INTERRUPTED


def first_and_more(names: list[str]) -> str:
    """``names[0]``, followed by " and N more" when there are others: how a message names a list it cannot print."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
