"""The interface every experiment tracker implements (W&B, MLflow, trackio, TensorBoard), and what they share.

A tracker is one small module. `check` runs before any work, on every rank: a missing package or an unreachable
server is a `UsageError` (one line, exit code 2). Rank 0 alone starts and feeds the trackers, through
`trainer.tracking.log.MetricsLog`, which turns a failure inside `start`/`log`/`finish` into one warning and
disables that tracker: training goes on. Tracker modules import their library inside `check`/`start`, so that
`import trainer` never needs it.

Resume: `state_dict()` (e.g. the run id) is kept in each checkpoint; a resumed job hands it back to `start` with
`resumed_step`, the step of the checkpoint, added, and the tracker continues the same run. Steps up to the
checkpoint are never logged again; steps after it that the interrupted run had logged (a crash between
checkpoints) are redone by the resumed run, and a tracker whose store keeps every value (MLflow, trackio) skips
the (metric, step) pairs it already holds, so each step is in it once (`Tracker.already_logged`).
"""
from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import urlsplit

from trainer.errors import UsageError


class Tracker:
    name: str = ""
    package: Optional[str] = None  # the library it needs (None: always available)

    def __init__(self, run_name: str, output_dir: str):
        self.run_name = run_name
        self.output_dir = output_dir
        self.already_logged: dict[str, int] = {}  # metric -> the last step the run already holds (on resume)
        self.run = None  # the library's run, where it has one

    def check(self) -> None:
        """Before any work: the package is installed and the server answers; else a UsageError."""
        if self.package is not None:
            import_package(self.package, self.name)

    def start(self, config: dict, resumed_state: Optional[dict]) -> None:
        """Begin the run, or continue it on resume: `resumed_state` is then the tracker's `state_dict()` from the
        checkpoint (empty if it was not used before) with `resumed_step` added; None on a fresh run. `config`:
        the arguments, secrets redacted."""

    def log(self, step: int, metrics: dict) -> None:
        """By default the library's run object (W&B's, trackio's: `self.run`) takes the step's new numbers."""
        scalars = self.new_scalars(step, metrics)
        if scalars:
            self.run.log(scalars, step=step)

    def state_dict(self) -> dict:
        return {}

    def finish(self, completed: bool = True) -> None:
        """End the run: `completed` False when the job stopped early (a stop signal, a diverged loss)."""

    def new_scalars(self, step: int, metrics: dict) -> dict:
        """The numbers of `metrics` (text and tables are TensorBoard's only) that the run does not hold yet."""
        return {key: value for key, value in metrics.items()
                if isinstance(value, (int, float)) and step > self.already_logged.get(key, -1)}


def curve_name(name: str) -> str:
    """What every tracker calls a logged number: "train_loss" -> "train/loss" (a section per prefix). The
    evaluation before training ("init_eval_perplexity") goes on the same curve as every later one
    ("eval/perplexity", at step 0), so each curve starts where training starts."""
    return name.removeprefix("init_").replace("_", "/", 1)


def import_package(package: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise UsageError(f"--report_to {tracker}: the {package} package is not installed ({error}); "
                         f'pip install "trainer[{tracker}]" or drop {tracker} from --report_to') from None


def require_reachable(url: str, what: str, fix: str, timeout: float = 5.0) -> None:
    """A TCP connection to `url`'s host and port opens within `timeout` seconds; else a UsageError."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return
    except OSError as error:
        raise UsageError(f"{what} {parts.scheme}://{parts.hostname}:{port} is unreachable "
                         f"({error.strerror or type(error).__name__}); {fix}") from None
