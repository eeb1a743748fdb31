"""The tracking section of the command line: where metrics go besides the log, and how often."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config.parsing import arg
from trainer.errors import require


@dataclass
class TrackingArguments:
    _argument_group_name = "tracking"

    logging_steps: int = arg(50, "Log loss, learning rate, grad norm and throughput every N optimizer steps.")
    report_to: str = arg("tensorboard", "Where metrics go besides the log: tensorboard or none.",
                         choices=["tensorboard", "none"])

    def __post_init__(self):
        require(self.logging_steps > 0, f"--logging_steps must be positive, got {self.logging_steps}")
