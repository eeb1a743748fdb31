"""trackio (Hugging Face's local-first tracker): project $TRACKIO_PROJECT (default "trainer"), stored in its
local database ($TRACKIO_DIR; a Space when $TRACKIO_SPACE_ID is set). The run's config is the redacted
arguments."""
from __future__ import annotations

import os
from typing import Optional

from trainer.tracking.base import Tracker


class TrackioTracker(Tracker):
    name = "trackio"
    package = "trackio"

    def __init__(self, run_name: str, output_dir: str):
        super().__init__(run_name, output_dir)
        self.run = None
        self.project = os.environ.get("TRACKIO_PROJECT", "trainer")

    def start(self, config: dict, resumed_state: Optional[dict]) -> None:
        import trackio

        if resumed_state:
            self.project = resumed_state["project"]
        self.run = trackio.init(project=self.project, name=resumed_state["run_name"] if resumed_state else self.run_name,
                                config=config, resume="must" if resumed_state else "never", embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)
        if resumed_state:  # a crash after the checkpoint left steps that are now redone: each is kept once
            for record in trackio.SQLiteStorage.get_logs(self.project, self.run.name):
                for key in record:
                    self.already_logged[key] = max(self.already_logged.get(key, -1), record["step"])

    def log(self, step: int, metrics: dict) -> None:
        scalars = self.new_scalars(step, metrics)
        if scalars:
            self.run.log(scalars, step=step)

    def state_dict(self) -> dict:
        return {"project": self.project, "run_name": self.run.name} if self.run is not None else {}

    def finish(self, completed: bool = True) -> None:
        if self.run is not None:
            self.run.finish()
