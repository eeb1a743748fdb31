"""Usage errors: bad input ends the job with one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import sys


class UsageError(Exception):
    """Something the user asked for cannot work; the message names the problem and the fix."""


class JobStopped(Exception):
    """Training ended early: on a stop signal (after a checkpoint) or on a non-finite loss (keeping the last good
    checkpoint). The job exits with `exit_code` and the message, without a traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def exits_cleanly_on_usage_error(main):
    """Wrap a job's `main` so that a UsageError prints `error: ...` and exits 2 (argparse's convention), and
    a JobStopped exits with its own code and message."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        except JobStopped as stop:
            print(f"{'error: ' if stop.exit_code else ''}{stop}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)

    return wrapper


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)
