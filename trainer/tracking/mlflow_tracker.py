"""MLflow, through `MlflowClient` on $MLFLOW_TRACKING_URI (MLflow's default store when unset); experiment
$MLFLOW_EXPERIMENT_NAME (default "Default"). The run's parameters are the redacted arguments."""
from __future__ import annotations

import os
import time
from typing import Optional

from trainer.tracking.base import Tracker, import_package, require_reachable
from trainer.tracking.console import logger

MAX_BATCH = 100  # MLflow's limit of parameters per log_batch call


class MlflowTracker(Tracker):
    name = "mlflow"
    package = "mlflow"

    def __init__(self, run_name: str, output_dir: str):
        super().__init__(run_name, output_dir)
        self.client, self.run_id = None, None

    def check(self) -> None:
        mlflow = import_package(self.package, self.name)
        uri = mlflow.get_tracking_uri()
        if uri.startswith(("http://", "https://")):
            require_reachable(uri, "--report_to mlflow: the MLflow tracking server",
                              "check MLFLOW_TRACKING_URI and that the server runs")

    def start(self, config: dict, resumed_state: Optional[dict]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        resumed = resumed_state if resumed_state and "run_id" in resumed_state else None  # else: a new run
        self.client = client = MlflowClient()
        if resumed:
            self.run_id = resumed["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            logger.info("MLflow: resumed run %s", self.run_id)
            # A crash after the checkpoint left steps that are now redone: each (metric, step) is kept once.
            self.already_logged = {key: max(m.step for m in client.get_metric_history(self.run_id, key))
                                   for key in client.get_run(self.run_id).data.metrics}
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "Default")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        logger.info("MLflow: new run %s in experiment %s", self.run_id, name)
        params = [Param(key, str(value)[:6000]) for key, value in sorted(config.items())]
        for start in range(0, len(params), MAX_BATCH):
            client.log_batch(self.run_id, params=params[start:start + MAX_BATCH])

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        scalars = self.new_scalars(step, metrics)
        if scalars:
            self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                        for key, value in scalars.items()])

    def state_dict(self) -> dict:
        return {"run_id": self.run_id} if self.run_id else {}

    def finish(self, completed: bool = True) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, "FINISHED" if completed else "KILLED")
