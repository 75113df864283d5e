"""Dagster resources: where data lives, where runs are tracked, how training is launched.

Each resource turns into the plain settings object the stage layer (:mod:`.stages`) takes, so
the same settings drive ``ramflow stage NAME`` (DVC) and the Dagster assets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from ramflow_io.params import default_params_path

from .settings import LauncherSettings, MlflowSettings, StageEnv, paths_config


class RamflowStorage(dg.ConfigurableResource):
    """The data root every stage reads and writes below, and the params file that sets it.

    ``data_root`` empty means ``paths.data_root`` of the params file (relative paths are
    resolved against the working directory, as DVC does).
    """

    params_path: str = Field(default_factory=lambda: str(default_params_path()))
    data_root: str = ""

    def resolved_root(self) -> Path:
        root = self.data_root or paths_config(self.params_path).data_root
        return Path(root).resolve()


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking: uri, experiment and the pipeline (parent) run training runs nest under.

    ``tracking_uri`` empty means ``sqlite:///{data_root}/mlflow/mlflow.db``. ``parent_run_id``
    empty means one pipeline run per data root, created on first use (see :mod:`.tracking_glue`).
    """

    tracking_uri: str = ""
    experiment: str = "ramflow"
    parent_run_id: str = ""

    def settings(self) -> MlflowSettings:
        return MlflowSettings(
            tracking_uri=self.tracking_uri or None,
            experiment=self.experiment,
            parent_run_id=self.parent_run_id or None,
        )


class TrainingLauncher(dg.ConfigurableResource):
    """How training stages run: in this process (``torch``) or DeepSpeed workers via torchrun.

    The backend is each training section's ``backend:`` in params.yaml; ``mode`` empty leaves it
    there, a set ``mode`` must agree with it (a conflict fails the stage, see
    :func:`.settings.training_backend`).
    """

    mode: Literal["", "torch", "deepspeed"] = ""
    nproc: int = 2
    timeout_s: int = 3600

    def settings(self) -> LauncherSettings:
        return LauncherSettings(mode=self.mode or None, nproc=self.nproc, timeout_s=self.timeout_s)


def stage_env(storage: RamflowStorage, mlflow: MlflowResource, launcher: TrainingLauncher) -> StageEnv:
    """The stage layer's view of the three resources."""
    return StageEnv(
        data_root=storage.resolved_root(),
        params_path=Path(storage.params_path),
        mlflow=mlflow.settings(),
        launcher=launcher.settings(),
    )
