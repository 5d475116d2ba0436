"""The one kind of error a user can fix, and warnings: what every module may raise or say.

A UserError is reported as one `error: ...` line and exit status 1 (cli.run_main); a warning is
one line on stderr, once per process."""
import os
import sys


class UserError(Exception):
    """A problem the user can fix (a flag, a file); reported as one line, no traceback."""


warned = set()  # what this process has said


def warn(message: str) -> None:
    """One line on stderr, once per process however often the cause is met (under torchrun,
    from the first process of each machine only)."""
    if message not in warned and int(os.environ.get("LOCAL_RANK", 0)) == 0:  # torchrun's, as distributed.local_rank
        warned.add(message)
        print(f"warning: {message}", file=sys.stderr)
