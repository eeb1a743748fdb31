"""The tracking section of the command line: which trackers get the metrics, the run's name in them, and how
often the engine logs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require
from trainer.tracking import tracker_names


@dataclass
class TrackingArguments:
    _argument_group_name = "tracking"

    logging_steps: int = arg(50, "Log loss, learning rate, grad norm and throughput every N optimizer steps.")
    report_to: str = arg("tensorboard", "Trackers that get the metrics, besides the log: a comma list of "
                         "tensorboard, wandb, mlflow, trackio; all (every one whose package is installed) or none.")
    run_name: Optional[str] = arg(None, "The run's name in W&B, MLflow and trackio. Unset: the --output_dir folder "
                                        "name.")

    def __post_init__(self):
        tracker_names(self.report_to)
        require(self.logging_steps > 0, f"--logging_steps must be positive, got {self.logging_steps}")
        require(self.run_name is None or bool(self.run_name.strip()),
                "--run_name is empty; give a name or leave it out (the --output_dir folder name)")
