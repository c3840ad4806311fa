"""MLflow: ``MLFLOW_TRACKING_URI`` when set, else a local ``<results>/mlruns`` file store.

MLflow 3 keeps its file store only behind ``MLFLOW_ALLOW_FILE_STORE=true``; vqabench sets that
(unless the user set it) only when it picked the file store itself. Experiment
``MLFLOW_EXPERIMENT_NAME`` or "vqabench"; the session label is the run's ``session`` tag.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vqabench.trackers import flat_config

#: MLflow's limits: parameters per log_batch call and characters of a parameter's value.
_PARAMS_PER_BATCH, _PARAM_CHARS = 100, 6000
_STATUS = {"done": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


class MlflowTracker:
    def __init__(self, results_dir: Path) -> None:
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (results_dir / "mlruns").resolve().as_uri()
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client: Any = None
        self.run_id = ""
        self.step = 0

    def start(self, name: str, group: str, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vqabench"
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(experiment_name)
        )
        run = self.client.create_run(experiment_id, run_name=name, tags={"session": group})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _PARAMS_PER_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])
        self.step = max(self.step, step)

    def finish(self, summary: dict[str, float], status: str) -> None:
        try:
            if summary:
                self.log(summary, self.step)
        finally:
            self.client.set_terminated(self.run_id, _STATUS.get(status, "FAILED"))
