"""MLflow tracking for training runs (rank 0 only; other ranks get a no-op tracker).

Default store: ``sqlite:///{data_root}/mlflow/mlflow.db`` with artifacts under
``{data_root}/mlflow/artifacts``; ``MLFLOW_TRACKING_URI`` (or an explicit uri) overrides it.
Runs are made through an explicit :class:`mlflow.MlflowClient` (no fluent global "active run"),
so a stage can nest under a pipeline run created by another process: pass its id as
``parent_run_id`` and the stage run is tagged ``mlflow.parentRunId`` in the parent's experiment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "ramflow"
STORE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # what mlflow.set_*_uri export


def tracking_uri(data_root: str | Path, uri: str | None = None) -> str:
    """Explicit uri, else ``$MLFLOW_TRACKING_URI``, else the sqlite store in the data folder."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(data_root).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_root(data_root: str | Path) -> str:
    path = Path(data_root).resolve() / "mlflow" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


@contextlib.contextmanager
def mlflow_store(uri: str | None):
    """MLflow's process-wide tracking and registry URIs set to ``uri`` for the block, then put back
    as they were (``uri=None``: left alone).

    MLflow's fluent calls (``mlflow.pyfunc.log_model``, ``mlflow.register_model``: the only ones
    that resolve ``runs:/`` and ``models:/`` URIs) read the process-wide URIs, and setting them
    also exports ``$MLFLOW_TRACKING_URI`` / ``$MLFLOW_REGISTRY_URI``, which :func:`tracking_uri`
    honours. Setting them only around those calls keeps one data root's logging from redirecting
    what the process tracks afterwards (another data root, a notebook, the tests). The state
    before is read from those variables: MLflow exports every URI it is given there."""
    if uri is None:
        yield
        return
    import mlflow  # lazy: mlflow (~1.5 s); tracking loads light for the CLIs

    before = {name: os.environ.get(name) for name in STORE_ENV}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None: MLflow's default again
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])  # None: follows the tracking URI
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _client(uri: str):
    from mlflow import MlflowClient  # lazy: mlflow (~1.5 s); tracking loads light for the CLIs

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_or_create_experiment(client, name: str, data_root: str | Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(data_root))
    except Exception:  # another process created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_pipeline_run(data_root: str | Path, name: str = "pipeline", uri: str | None = None,
                       experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create a parent "pipeline" run (left running) and return its id."""
    client = _client(tracking_uri(data_root, uri))
    exp = get_or_create_experiment(client, experiment, data_root)
    return client.create_run(exp, run_name=name, tags={"ramflow.pipeline": "true"}).info.run_id


def run_is_finished(data_root: str | Path, run_id: str, uri: str | None = None) -> bool:
    """True when ``run_id`` is a FINISHED run of the tracking store (a stage reuses its stored
    result only while the run it names is still there)."""
    try:
        run = _client(tracking_uri(data_root, uri)).get_run(run_id)
    except Exception:  # noqa: BLE001 - unknown run or a store without it
        return False
    return run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


class RunTracker:
    """One MLflow run. On ranks other than 0 every method is a no-op (``active`` is False)."""

    def __init__(self, data_root: str | Path, run_name: str, *, uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, rank: int = 0, run_id: str | None = None) -> None:
        self.active = rank == 0
        self.run_id: str = ""
        self.uri = tracking_uri(data_root, uri) if self.active else ""
        self._pending: list = []
        if not self.active:
            return
        from mlflow.entities import RunStatus  # lazy: mlflow (~1.5 s); tracking loads light for the CLIs

        self.client = _client(self.uri)
        if run_id:  # resuming: keep logging into the same run
            self.run_id = run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        exp = get_or_create_experiment(self.client, experiment, data_root)
        all_tags = dict(tags or {})
        if parent_run_id:
            exp = self.client.get_run(parent_run_id).info.experiment_id  # child lives with its parent
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(exp, run_name=run_name, tags=all_tags).info.run_id
        log.info("MLflow run %s (%s)", self.run_id, self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param  # lazy: mlflow (~1.5 s); tracking loads light for the CLIs

        flat: dict[str, str] = {}
        _flatten("", params, flat)
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in sorted(flat.items()) if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, flush: bool = True) -> None:
        """Queue metrics (non-finite values dropped) and send them when ``flush``."""
        if not self.active:
            return
        from mlflow.entities import Metric  # lazy: mlflow (~1.5 s); tracking loads light for the CLIs

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
                self._pending.append(Metric(k, float(v), now, step or 0))
        if flush:
            self.flush()

    def flush(self) -> None:
        if not self.active or not self._pending:
            return
        for i in range(0, len(self._pending), 500):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + 500])
        self._pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
            self.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.flush()
            self.client.set_terminated(self.run_id, status=status)


def plot_loss_curves(history: Sequence[Mapping[str, float]], out_path: Path,
                     keys: Sequence[str] = ("loss", "loss_tag", "loss_caption"), smooth: int = 10) -> Path:
    """Loss curve PNG: raw per-step losses (faint) and a moving average (solid)."""
    import matplotlib  # lazy: matplotlib (Agg set first), only for plots

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # lazy: matplotlib (Agg set first), only for plots

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array([h["step"] for h in history])
    for key in keys:
        vals = np.array([h.get(key, np.nan) for h in history], dtype=float)
        if np.all(np.isnan(vals)):
            continue
        line = ax.plot(steps, vals, alpha=0.25)[0]
        if len(vals) >= smooth > 1:
            avg = np.convolve(vals, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1 :], avg, color=line.get_color(), label=f"{key} (avg {smooth})")
        else:
            line.set_label(key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
