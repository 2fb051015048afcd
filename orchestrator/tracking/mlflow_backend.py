"""MLflow (3.x, through ``MlflowClient``: explicit run ids, so several fold runs stay open at once from one driver
without MLflow's global active-run state). Child runs are nested under the parent with the ``mlflow.parentRunId`` tag,
which is how the MLflow UI nests runs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

# A tracking server that is down must cost a warning line, not minutes: MLflow's own default retries an HTTP request
# 7 times with exponential backoff (over 2 minutes). A value the user set wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
BATCH = 100  # MLflow's log_batch accepts at most 100 params and 1,000 metrics per call
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a parameter value


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its files: beside a ``sqlite:///`` database (``mlartifacts/``, as ``mlflow server``
    does), rather than in ``./mlruns`` of whatever folder the command ran in; elsewhere the server decides (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()


class MlflowBackend:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        for name in ("mlflow", "alembic"):  # a new sqlite store logs its table migrations at INFO: not the console's
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.target = f"{uri}#{experiment}"
        exp = self.client.get_experiment_by_name(experiment)  # the first call: an unreachable server raises here
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            experiment, artifact_location=artifact_location(uri))
        self.runs: dict[str | None, str] = {}  # None = the parent run
        self.saved_children: dict[str, str] = {}

    def open_run(self, key: str | None, name: str, params: dict[str, str], job_type: str, *,
                 resume_id: str | None = None, config: dict | None = None) -> None:
        if resume_id is not None:
            try:
                self.client.get_run(resume_id)
            except Exception:  # noqa: BLE001 - deleted on the server: start a new one
                resume_id = None
            else:
                self.client.update_run(resume_id, status="RUNNING")
                self.runs[key] = resume_id
                return
        tags = {"job_type": job_type}
        if key is not None:
            tags["mlflow.parentRunId"] = self.runs[None]
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.runs[key] = run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[i:i + BATCH])

    def log(self, key: str | None, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.runs[key], metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, key: str | None, values: dict[str, float]) -> None:
        self.log(key, values, 0)

    def artifacts(self, key: str | None, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.runs[key], str(p))

    def close(self, key: str | None, ok: bool) -> None:
        if key in self.runs:
            self.client.set_terminated(self.runs[key], status="FINISHED" if ok else ("KILLED" if key else "FAILED"))
