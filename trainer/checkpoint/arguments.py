"""The checkpointing section of the command line: where the run's outputs go, how often it saves, what it
resumes from and which signals make it save and stop."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.errors import require
from trainer.layout import checkpoint_name


@dataclass
class CheckpointArguments:
    _argument_group_name = "output and checkpoints"

    output_dir: str = arg("output", "Where the model, logs, TensorBoard runs and checkpoints go.")
    overwrite_output_dir: bool = arg(False, "Allow writing into a non-empty --output_dir.")
    save_steps: Optional[int] = arg(None, f"Save a checkpoint (output_dir/{checkpoint_name('<step>')}) every N "
                                          f"optimizer steps; one is always saved at the end.")
    save_total_limit: Optional[int] = arg(None, "Keep only the newest N checkpoints (plus the best one with "
                                                "--load_best_model_at_end).")
    resume_from_checkpoint: Optional[str] = arg(
        None, "A checkpoint directory to resume from, or 'latest' for the newest complete one in --output_dir. "
        "Unset: an --output_dir holding checkpoints resumes from its newest complete one.")
    stop_signals: list[str] = arg(["SIGTERM", "SIGUSR1", "SIGUSR2"], "Signals that make the job save a checkpoint "
                                  "at the next optimizer step and exit with code 0.", nargs="*")

    def __post_init__(self):
        for flag in ("save_steps", "save_total_limit"):
            value = getattr(self, flag)
            require(value is None or value > 0, f"--{flag} must be positive, got {value}")
        for name in self.stop_signals:
            require(name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"),
                    f"--stop_signals: {name} is not a signal this job can catch (e.g. SIGTERM, SIGUSR1)")
        require(self.resume_from_checkpoint is None or self.resume_from_checkpoint == "latest"
                or os.path.isdir(self.resume_from_checkpoint),
                f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such directory (give a checkpoint "
                f"directory or 'latest')")
