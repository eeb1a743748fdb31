"""`MetricsLog`: the one object the engine logs to. Rank 0 writes every number to the console, to
`log_history.jsonl` and to each chosen tracker; other ranks do nothing. Nothing is written until the first number
is logged, so a run refused before that leaves no output directory and starts no tracker run."""
from __future__ import annotations

from typing import Optional

from trainer.tracking.base import Tracker, curve_name
from trainer.tracking.console import format_number, logger
from trainer.tracking.history import History


class MetricsLog:
    def __init__(self, output_dir: str, enabled: bool, trackers: list[Tracker], config: dict):
        self.enabled = enabled
        self.history = History(output_dir)
        self.trackers = trackers if enabled else []
        self.config = config  # the arguments with secrets redacted: what the trackers are given
        self.started = self.closed = False
        self.saved_states: dict = {}  # the trackers' states in the checkpoint resumed from
        self.resumed_step: Optional[int] = None

    # --------------------------------------------------------------------------------------------- logging
    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        named = {f"{prefix}{key}": value for key, value in metrics.items()}
        self.history.append(step, named)
        if not self.started:
            self.started = True
            for tracker in list(self.trackers):
                resumed = (None if self.resumed_step is None else
                           {**self.saved_states.get(tracker.name, {}), "resumed_step": self.resumed_step})
                self.call(tracker, "start", self.config, resumed)
        curves = {curve_name(key): value for key, value in named.items()}
        for tracker in list(self.trackers):
            self.call(tracker, "log", step, curves)
        logger.info("step %d: %s", step, "  ".join(f"{k}={format_number(v)}" for k, v in named.items()))

    def call(self, tracker: Tracker, method: str, *args) -> None:
        """A tracker that fails is dropped with one warning; training goes on."""
        try:
            getattr(tracker, method)(*args)
        except Exception as error:
            self.trackers.remove(tracker)
            logger.warning("--report_to %s failed in %s (%s: %s); it is disabled and training goes on",
                           tracker.name, method, type(error).__name__, (str(error).strip().splitlines() or [""])[0])

    def close(self, completed: bool = True) -> None:
        """End every tracker's run (once)."""
        if self.started and not self.closed:
            for tracker in list(self.trackers):
                self.call(tracker, "finish", completed)
        self.closed = True

    def tracker(self, name: str) -> Optional[Tracker]:
        """The working tracker called `name`, or None."""
        return next((tracker for tracker in self.trackers if tracker.name == name), None)

    # ---------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Each tracker's run (e.g. its id), for the checkpoint; a disabled one keeps what it resumed from."""
        live = {tracker.name: tracker.state_dict() for tracker in self.trackers} if self.started else {}
        return {**self.saved_states, **{name: state for name, state in live.items() if state}}

    def load_state_dict(self, saved: dict) -> None:
        self.saved_states = dict(saved)

    def forget_after(self, step: int) -> None:
        """On resume from `step`: drop what the interrupted run logged after its checkpoint, which is redone; the
        trackers continue their runs from there."""
        self.resumed_step = step
        if self.enabled:
            self.history.forget_after(step)
