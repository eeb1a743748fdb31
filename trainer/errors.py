"""Usage errors: bad input ends the job with one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import sys


class UsageError(Exception):
    """Something the user asked for cannot work; the message names the problem and the fix."""


def exits_cleanly_on_usage_error(main):
    """Wrap a job's `main` so that a UsageError prints `error: ...` and exits 2 (argparse's convention)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)
