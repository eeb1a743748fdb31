"""trackio (Hugging Face's local-first tracker): project $TRACKIO_PROJECT (default "trainer"), stored in its
local database ($TRACKIO_DIR; a Space when $TRACKIO_SPACE_ID is set). The run's config is the redacted
arguments. trackio finds a run by its name, so a new run whose name the project holds already is called
<name>-2 (-3, ...)."""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import shlex
from typing import Optional

from trainer.tracking.base import Tracker
from trainer.tracking.console import logger


class TrackioTracker(Tracker):
    name = "trackio"
    package = "trackio"

    def __init__(self, run_name: str, output_dir: str):
        super().__init__(run_name, output_dir)
        self.project = os.environ.get("TRACKIO_PROJECT", "trainer")

    def start(self, config: dict, resumed_state: Optional[dict]) -> None:
        import trackio

        resumed = resumed_state if resumed_state and "run_name" in resumed_state else None  # else: a new run
        if resumed:
            self.project, name = resumed["project"], resumed["run_name"]
        else:  # trackio finds a run by its name: a new one gets a name of its own in the project
            taken = set(trackio.SQLiteStorage.get_runs(self.project))
            candidates = itertools.chain([self.run_name], (f"{self.run_name}-{n}" for n in itertools.count(2)))
            name = next(candidate for candidate in candidates if candidate not in taken)
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would break the log's one-line records
            self.run = trackio.init(project=self.project, name=name, config=config,
                                    resume="must" if resumed else "never", embed=False, auto_log_cpu=False,
                                    auto_log_gpu=False)
        logger.info("trackio: %s run %s in project %s (trackio show --project %s)",
                    "resumed" if resumed else "new", name, self.project, shlex.quote(self.project))
        if resumed:  # a crash after the checkpoint left steps that are now redone: each is kept once
            for record in trackio.SQLiteStorage.get_logs(self.project, self.run.name):
                for key in record:
                    self.already_logged[key] = max(self.already_logged.get(key, -1), record["step"])

    def state_dict(self) -> dict:
        return {"project": self.project, "run_name": self.run.name} if self.run is not None else {}

    def finish(self, completed: bool = True) -> None:
        if self.run is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                self.run.finish()
