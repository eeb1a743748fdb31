"""Usage errors: bad input ends the job with one line on stderr and exit code 2, never a traceback.

The boundary is `exits_cleanly_on_usage_error` around every job's `main`. It catches only UsageError and
JobStopped: library errors are turned into UsageErrors where they arise, naming the flag or file and the fix
(argparse and HfArgumentParser in trainer.config.parsing, output paths in trainer.engine.jobs, data files and columns
in trainer.data.loading, models and tokenizers in trainer.models.loading, a full disk in
trainer.checkpoint.checkpointer). A job prepares its data inside `trainer.distributed.collectives.main_process_first`,
which hands a rank's UsageError to the ranks waiting for it. Anything else is a bug in trainer and keeps its traceback
(exit code 1).
"""
from __future__ import annotations

import datetime
import functools
import os
import signal
import sys
import time


class UsageError(Exception):
    """Something the user asked for cannot work; the message names the problem and the fix."""


class DataSourceFailed(Exception):
    """The training data failed during the run (a streamed file became unreadable, or the stream ran out before
    --max_steps): the engine stops with one line naming it and the last good checkpoint (exit code 2)."""


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
            leave_together_under_torchrun()
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        except JobStopped as stop:
            print(f"{'error: ' if stop.exit_code else ''}{stop}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)

    return wrapper


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def leave_together_under_torchrun(wait_seconds: float = 30.0) -> None:
    """Called by a rank about to exit 2 on bad input. The ranks fail on the same input at about the same time
    (a bad argument on every rank; a data error shared by `main_process_first`), but torchrun SIGTERMs the
    others as soon as the first has exited, and a rank still importing or tearing down then reports -15 instead
    of its own exit code 2 and message. So each failing rank ignores SIGTERM (it is leaving anyway) and waits,
    at most `wait_seconds`, until every rank has counted itself in torchrun's store: then they all print and
    exit 2. Best effort: without a reachable store the rank leaves at once."""
    import torch.distributed as dist  # here: importing the errors must not import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        key = f"trainer/leaving_on_usage_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.add(key, 1)
        deadline = time.monotonic() + wait_seconds
        while store.add(key, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, ValueError, KeyError, OSError):  # no store to meet in: leave now
        return
