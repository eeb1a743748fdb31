"""Where numbers go: the console log, `log_history.jsonl` and the trackers chosen with --report_to.

One interface (`trainer.tracking.base.Tracker`), one small module per tracker; a new tracker is a module and an
entry in TRACKERS. The engine logs to one `MetricsLog` (trainer.tracking.log)."""
from __future__ import annotations

import importlib.util

from trainer.errors import require
from trainer.tracking.base import Tracker
from trainer.tracking.log import MetricsLog
from trainer.tracking.mlflow_tracker import MlflowTracker
from trainer.tracking.tensorboard import TensorBoardTracker
from trainer.tracking.trackio_tracker import TrackioTracker
from trainer.tracking.wandb_tracker import WandbTracker

TRACKERS: dict[str, type[Tracker]] = {tracker.name: tracker for tracker in
                                      (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)}
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")

__all__ = ["MetricsLog", "REPORT_TO_CHOICES", "TRACKERS", "Tracker", "check_trackers", "choose_trackers",
           "tracker_names"]


def tracker_names(report_to: str) -> list[str]:
    """--report_to as the transformers Trainer takes it: a comma list of trackers, `all` (every tracker whose
    package is installed) or `none`. A bad name is a UsageError naming the choices."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    require(bool(names), f"--report_to is empty; give a comma list of {', '.join(REPORT_TO_CHOICES)}")
    unknown = [name for name in names if name not in REPORT_TO_CHOICES]
    require(not unknown, f"--report_to {report_to}: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(REPORT_TO_CHOICES)} (comma-separated)")
    if "all" in names or "none" in names:
        require(len(names) == 1, f"--report_to {report_to}: all and none stand alone")
        return [] if names == ["none"] else [name for name, tracker in TRACKERS.items()
                                             if tracker.package is None or importlib.util.find_spec(tracker.package)]
    return list(dict.fromkeys(names))


def choose_trackers(report_to: str, run_name: str, output_dir: str) -> list[Tracker]:
    """The trackers --report_to names, each given the run's name and the output directory."""
    return [TRACKERS[name](run_name, output_dir) for name in tracker_names(report_to)]


def check_trackers(report_to: str) -> None:
    """Before any work: each tracker --report_to names checks its package and server (a UsageError if one cannot
    work)."""
    for tracker in choose_trackers(report_to, "", ""):
        tracker.check()
