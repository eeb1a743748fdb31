"""Pre-emption: a stop signal makes every rank save a checkpoint at the same optimizer-step boundary and exit.

Slurm, Kubernetes and most schedulers send SIGTERM (Slurm `--signal=USR1@120` sends SIGUSR1) some time before
they kill a job. The handler only records the signal; the engine asks `should_stop()` after every optimizer
step, which reduces the flag over all ranks (see `distributed.collectives.any_rank`), so a signal that reached one
rank stops all of them at the same step instead of leaving the others hanging in the next collective.

torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers by default. To forward SIGUSR1/2 start
it with `torchrun --signals-to-handle SIGTERM,SIGUSR1,SIGUSR2 ...` or signal the worker processes directly
(e.g. `scancel --signal=USR1 --full`). torchrun itself exits non-zero after forwarding a signal, even when the
workers have saved and exited 0; resume by starting the same command again.
"""
from __future__ import annotations

import signal
from typing import Optional

from trainer.distributed.collectives import any_rank

STOPPED_EXIT_CODE = 0  # the job did what it was asked: checkpoint and leave; a scheduler may requeue it


class StopSignals:
    def __init__(self, names: list[str]):
        self.received: Optional[str] = None
        for name in names:
            signal.signal(signal.Signals[name], self.record)

    def record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        return any_rank(self.received is not None)
