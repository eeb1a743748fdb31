"""TensorBoard scalars (and text, e.g. generated samples or a confusion matrix) under `output_dir/runs`."""
from __future__ import annotations

import json
import os
from typing import Optional

from trainer.layout import TENSORBOARD_DIR
from trainer.tracking.base import Tracker


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_name: str, output_dir: str):
        super().__init__(run_name, output_dir)
        self.directory = os.path.join(output_dir, TENSORBOARD_DIR)
        self.writer = None

    def start(self, config: dict, resumed_state: Optional[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume TensorBoard drops the events the interrupted run wrote after the checkpoint (they are redone).
        purge_step = resumed_state["resumed_step"] + 1 if resumed_state else None
        self.writer = SummaryWriter(self.directory, purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
            else:  # e.g. a confusion matrix: shown in TensorBoard's text tab
                self.writer.add_text(key, f"    {json.dumps(value)}", step)
        self.writer.flush()

    def finish(self, completed: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()

