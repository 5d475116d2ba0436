"""The ends a user sees as one line, and warnings: what every module may raise or say.

A UserError is reported as one `error: ...` line and exit status 1 (cli.run_main); Interrupted,
a training run stopped by Ctrl-C and saved, as one line and exit status 130; a warning is one
line on stderr, once per process."""
import os
import sys


class UserError(Exception):
    """A problem the user can fix (a flag, a file); reported as one line, no traceback."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) asked the run to stop: raised between two steps, `step` steps into
    epoch `epoch` (0-based), so that the script saves the run there and exits."""

    def __init__(self, epoch: int, step: int, ckpt_path) -> None:
        super().__init__(f"Interrupted in epoch {epoch + 1} after step {step}; checkpoint saved to {ckpt_path}. "
                         "Continue with the same command plus --resume.")
        self.epoch, self.step = epoch, step


warned = set()  # what this process has said


def warn(message: str) -> None:
    """One line on stderr, once per process however often the cause is met (under torchrun,
    from the first process of each machine only)."""
    if message not in warned and int(os.environ.get("LOCAL_RANK", 0)) == 0:  # torchrun's, as distributed.local_rank
        warned.add(message)
        print(f"warning: {message}", file=sys.stderr)
