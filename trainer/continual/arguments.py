"""The continual-learning section of the command line: experience replay and Elastic Weight Consolidation."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from trainer.config.parsing import arg
from trainer.data.arguments import check_data_file
from trainer.errors import require
from trainer.layout import FISHER_FILE


@dataclass
class ContinualArguments:
    _argument_group_name = "continual learning"

    replay_file: Optional[str] = arg(
        None, "Experience replay: an earlier task's training data (same formats and columns as --train_file; for "
        "classify, labels among the training data's), prepared exactly as the training data and mixed into every "
        "global batch at --replay_ratio. The replay samples follow their own seeded order, cycling over the file, "
        "the same at any world size; checkpoints keep its position. Replay is the last source of the training "
        "mixture (see --train_files).")
    replay_ratio: Optional[float] = arg(
        None, "With --replay_file: the fraction R of every global batch of G sequences (per-device batch x processes "
        "x accumulation) taken from it: round(R x G) replay samples per step, halves up, and the rest new ones (at "
        "least one of each). An epoch is a pass over the new data alone.")
    save_fisher: bool = arg(False, f"After training, write {FISHER_FILE} beside the model: the diagonal empirical "
                                   "Fisher information of the trainable parameters over --fisher_samples training "
                                   "samples and the final weights as the anchor, for a later run's --ewc_from.")
    fisher_samples: int = arg(512, "Training samples (the first N in dataset order, each rank a shard) whose squared "
                                   "per-sample gradients average into the Fisher information of --save_fisher.")
    ewc_from: Optional[str] = arg(None, f"Elastic Weight Consolidation: the output directory of an earlier task's run "
                                        f"with --save_fisher ({FISHER_FILE} inside). Adds (L/2) sum_i F_i (theta_i - "
                                        f"theta*_i)^2 to the loss, once per optimizer step; logged as "
                                        f"train_ewc_penalty. Needs --ewc_lambda.")
    ewc_lambda: Optional[float] = arg(None, "L, the EWC penalty's strength with --ewc_from (>= 0; no default: it "
                                            "depends on the Fisher's scale). Larger keeps the earlier task better and "
                                            "learns the new one less; try powers of ten against both tasks' metrics.")

    def __post_init__(self):
        self.check_replay()
        self.check_ewc()

    def check_replay(self) -> None:
        if self.replay_file is not None:
            check_data_file(self.replay_file, "replay_file")
        require((self.replay_file is None) == (self.replay_ratio is None),
                "--replay_file and --replay_ratio go together: give both (e.g. --replay_ratio 0.25) or neither")
        require(self.replay_ratio is None or 0 < self.replay_ratio < 1,
                f"--replay_ratio must be between 0 and 1 (exclusive), got {self.replay_ratio}")

    def check_ewc(self) -> None:
        require(self.fisher_samples > 0, f"--fisher_samples must be positive, got {self.fisher_samples}")
        require((self.ewc_from is None) == (self.ewc_lambda is None),
                "--ewc_from DIR and --ewc_lambda L go together: give both (EWC) or neither")
        if self.ewc_from is None:
            return
        require(math.isfinite(self.ewc_lambda) and self.ewc_lambda >= 0,
                f"--ewc_lambda must be a number >= 0, got {self.ewc_lambda}")
        require(os.path.isdir(self.ewc_from), f"--ewc_from {self.ewc_from}: no such directory")
        require(os.path.isfile(os.path.join(self.ewc_from, FISHER_FILE)),
                f"--ewc_from {self.ewc_from} holds no {FISHER_FILE}; train the earlier task with --save_fisher")
