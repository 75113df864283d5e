"""Plain settings shared by the Dagster assets and ``ramflow stage`` (no Dagster import here).

``paths:`` and ``registry:`` of params.yaml are validated by :class:`PathsConfig` and
:class:`RegistryConfig`; the other sections belong to the stage packages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ramflow_io.params import default_params_path, load_params, params_section, stage_config, validate_section

from .checks import ChecksConfig


class PathsConfig(BaseModel):
    """``paths:`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")

    data_root: str = Field("data", description="every stage reads and writes below this folder")


class RegistryConfig(BaseModel):
    """``registry:`` in params.yaml: the MLflow registered model and its promotion gate."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = "ram-tagger"
    challenger_alias: str = "challenger"
    champion_alias: str = "champion"
    metric: str = Field("mAP", description="evaluation metric the gate compares")
    tolerance: float = Field(
        0.0, ge=0.0, description="promote when challenger metric >= champion metric - tolerance"
    )
    force: bool = Field(
        False, description="register a new version even when this model and evaluation already have one"
    )


def params_configs() -> dict[str, type[BaseModel]]:
    """params.yaml section -> the pydantic config that validates it.

    The stage packages are imported here rather than at module level for their cost (torch,
    spaCy: ~10 s), which the Dagster code location and the data stages do not pay.
    """
    # lazy: torch / spaCy / sklearn behind these configs (~5 s); settings loads without them
    from data_engine.coco_source import CocoSourceConfig  # lazy: see above
    from data_engine.corpus.config import CorpusConfig  # lazy: see above
    from data_engine.ingest.config import IngestConfig  # lazy: see above
    from data_engine.label_system import LabelSystemConfig  # lazy: see above
    from data_engine.parsing import ParseConfig  # lazy: see above
    from engine_rounds import EngineConfig  # lazy: see above
    from ram_model.evaluate import EvaluationConfig  # lazy: see above
    from ram_model.trainer import TrainStageConfig  # lazy: see above

    return {
        "paths": PathsConfig, "source": CocoSourceConfig, "corpus": CorpusConfig, "ingest": IngestConfig,
        "parse": ParseConfig, "label_system": LabelSystemConfig,
        "preliminary_model": TrainStageConfig, "engine": EngineConfig, "retrained_model": TrainStageConfig,
        "engine_refined": EngineConfig, "refined_model": TrainStageConfig, "finetuned_model": TrainStageConfig,
        "evaluation": EvaluationConfig, "registry": RegistryConfig, "checks": ChecksConfig,
    }


def validate_params(params_path: str | os.PathLike | None = None) -> dict[str, BaseModel]:
    """Every section of the params file validated by its config (``engine_refined`` alone: the
    keys it sets over ``engine``), so a misspelt key, a bad value or a section no stage reads
    fails before the first stage runs, not when its own stage starts hours later."""
    path = Path(params_path) if params_path is not None else default_params_path()
    params, configs = load_params(path), params_configs()
    unknown = sorted(set(params) - set(configs))
    if unknown:
        raise ValueError(f"{path}: sections no stage reads: {unknown} (known: {', '.join(configs)})")
    return {s: validate_section(configs[s], s, params_section(params, s, path), path) for s in params}


def paths_config(params_path: str | os.PathLike | None = None) -> PathsConfig:
    return stage_config(PathsConfig, "paths", params_path)


def registry_config(params_path: str | os.PathLike | None = None) -> RegistryConfig:
    return stage_config(RegistryConfig, "registry", params_path)


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str | None = None      # None: sqlite:///{data_root}/mlflow/mlflow.db
    experiment: str = "ramflow"
    parent_run_id: str | None = None     # None: the data root's pipeline run (created on demand)


Backend = Literal["torch", "deepspeed"]


class BackendConflictError(ValueError):
    """The launcher asks for another training backend than the stage's params section sets."""


@dataclass(frozen=True)
class LauncherSettings:
    """How training stages are launched. The backend itself is the stage's ``backend:`` in
    params.yaml; ``mode`` None leaves it to params, a set ``mode`` (``RAMFLOW_LAUNCHER``,
    ``--launcher``, the Dagster ``launcher`` resource) must agree with it."""

    mode: Backend | None = None
    nproc: int = 2               # DeepSpeed worker processes
    timeout_s: int = 3600


def training_backend(stage: str, params_backend: str, launcher: LauncherSettings) -> str:
    """The backend a training stage runs with: its params section's ``backend``.

    A launcher that names another backend is an error, never a silent replacement: one run
    must not train with DeepSpeed while params.yaml (and the model's saved config) say torch.
    """
    if launcher.mode is None or launcher.mode == params_backend:
        return params_backend
    raise BackendConflictError(
        f"training backend conflict for {stage!r}: params.yaml sets {stage}.backend: {params_backend}, "
        f"the launcher (RAMFLOW_LAUNCHER / --launcher / the Dagster launcher resource) asks for "
        f"{launcher.mode!r}; set {stage}.backend in the params file and leave the launcher mode unset")


@dataclass(frozen=True)
class StageEnv:
    """Everything a stage needs besides its own params section."""

    data_root: Path
    params_path: Path
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    launcher: LauncherSettings = field(default_factory=LauncherSettings)

    @classmethod
    def from_params(cls, params_path: str | os.PathLike | None = None, data_root: str | None = None,
                    mlflow: MlflowSettings | None = None,
                    launcher: LauncherSettings | None = None) -> StageEnv:
        params = Path(params_path) if params_path is not None else default_params_path()
        root = Path(data_root or paths_config(params).data_root).resolve()
        return cls(root, params, mlflow or MlflowSettings(), launcher or LauncherSettings())

    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.data_root / 'mlflow' / 'mlflow.db'}"
