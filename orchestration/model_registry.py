"""MLflow glue of the pipeline: the pipeline (parent) run and the registry promotion gate.

The gate: a new model version gets the ``challenger`` alias; it also gets ``champion`` when
there is no champion yet or ``challenger metric >= champion metric - tolerance``. The metric
of each version is stored as a version tag (``registry.metric``, e.g. ``mAP``), so the gate
compares numbers measured by the evaluation stage, never re-computed ones.

Registration is idempotent: each version is tagged ``ramflow.fingerprint`` (the model file's
content hash and the evaluation it was gated on, :func:`registration_fingerprint`); registering
the same fingerprint again returns that version and moves no alias, unless ``force`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ram_model.tracking import mlflow_store

from .settings import RegistryConfig, StageEnv

log = logging.getLogger(__name__)

PIPELINE_RUN_FILE = "pipeline_run.json"
FINGERPRINT_TAG = "ramflow.fingerprint"


def _client(env: StageEnv):
    """A client bound to this data root's store (MLflow's process-wide URIs are left alone)."""
    import mlflow  # lazy: mlflow, CLI start-up

    return mlflow.MlflowClient(env.tracking_uri(), env.tracking_uri())


def experiment_id(env: StageEnv) -> str:
    client = _client(env)
    exp = client.get_experiment_by_name(env.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = (env.data_root / "mlflow" / "artifacts").as_uri()
    return client.create_experiment(env.mlflow.experiment, artifact_location=artifacts)


def start_pipeline_run(env: StageEnv, name: str = "pipeline") -> str:
    """Create a new pipeline (parent) run and make it this data root's current one."""
    client = _client(env)
    run = client.create_run(experiment_id(env), run_name=name, tags={"ramflow.pipeline": "true"})
    path = env.data_root / "mlflow" / PIPELINE_RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run.info.run_id}), encoding="utf-8")
    log.info("pipeline run %s (%s)", run.info.run_id, env.tracking_uri())
    return run.info.run_id


def pipeline_run_id(env: StageEnv) -> str:
    """The parent run training runs nest under: the configured one, else the data root's
    current pipeline run (created on first use, so DVC stages in separate processes share it)."""
    if env.mlflow.parent_run_id:
        return env.mlflow.parent_run_id
    path = env.data_root / "mlflow" / PIPELINE_RUN_FILE
    if path.exists():
        run_id = json.loads(path.read_text(encoding="utf-8"))["run_id"]
        try:
            _client(env).get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - a run from a deleted tracking db: start a new one
            log.warning("pipeline run %s not in %s: starting a new one", run_id, env.tracking_uri())
    return start_pipeline_run(env)


def pipeline_run_for_tag(env: StageEnv, tag: str, value: str) -> str:
    """The pipeline run tagged ``tag=value`` (e.g. one per Dagster run), created if missing."""
    client = _client(env)
    found = client.search_runs([experiment_id(env)], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id(env), run_name=f"pipeline-{value[:8]}",
                            tags={"ramflow.pipeline": "true", tag: value})
    log.info("pipeline run %s for %s=%s", run.info.run_id, tag, value)
    return run.info.run_id


def end_pipeline_run(env: StageEnv, run_id: str, status: str = "FINISHED") -> None:
    _client(env).set_terminated(run_id, status)


@dataclass
class RegistryDecision:
    model_name: str
    version: str
    model_uri: str
    metric: str
    challenger_value: float
    champion_version: str | None
    champion_value: float | None
    tolerance: float
    promoted: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def gate(challenger: float, champion: float | None, tolerance: float) -> tuple[bool, str]:
    """The promotion rule, as a pure function (tested directly)."""
    if not math.isfinite(challenger):
        return False, f"challenger metric is {challenger}"
    if champion is None:
        return True, "no champion yet"
    if challenger >= champion - tolerance:
        return True, f"{challenger:.4f} >= champion {champion:.4f} - {tolerance:g}"
    return False, f"{challenger:.4f} < champion {champion:.4f} - {tolerance:g}"


def champion(env: StageEnv, cfg: RegistryConfig) -> tuple[str, float] | None:
    """``(version, metric)`` of the current champion, or None."""
    client = _client(env)
    try:
        mv = client.get_model_version_by_alias(cfg.model_name, cfg.champion_alias)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None
    value = mv.tags.get(cfg.metric)
    return mv.version, float(value) if value is not None else float("-inf")


def registration_fingerprint(model_sha256: str, metric: str, value: float, evaluation: dict | None = None) -> str:
    """Short sha256 naming one registration: the model file's content hash, the gate's metric and
    value and the evaluation metrics measured on the test data (the data/params side)."""
    spec = {"model": model_sha256, "metric": metric, "value": repr(float(value)), "evaluation": evaluation or {}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_version(env: StageEnv, cfg: RegistryConfig, fingerprint: str):
    """The newest version of ``cfg.model_name`` tagged with ``fingerprint``, or None."""
    client = _client(env)
    try:
        versions = client.search_model_versions(f"name='{cfg.model_name}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    hits = [mv for mv in versions if mv.tags.get(FINGERPRINT_TAG) == fingerprint]
    return max(hits, key=lambda mv: int(mv.version)) if hits else None


def _reused_decision(env: StageEnv, cfg: RegistryConfig, mv, model_uri: str, value: float) -> RegistryDecision:
    current = champion(env, cfg)
    promoted = mv.tags.get("ramflow.promoted") == "true"
    log.info("%s v%s already holds this model and evaluation (%s): no new version, aliases unchanged",
             cfg.model_name, mv.version, mv.tags.get(FINGERPRINT_TAG))
    return RegistryDecision(
        model_name=cfg.model_name, version=str(mv.version), model_uri=model_uri, metric=cfg.metric,
        challenger_value=float(value), champion_version=current[0] if current else None,
        champion_value=current[1] if current else None, tolerance=cfg.tolerance, promoted=promoted,
        reason=f"unchanged: v{mv.version} already registered for this model and evaluation "
               f"({'promoted' if promoted else 'not promoted'} then); set force to register again",
    )


def register_and_gate(env: StageEnv, cfg: RegistryConfig, model_uri: str, value: float,
                      run_id: str | None = None, fingerprint: str | None = None) -> RegistryDecision:
    """Register ``model_uri`` as a new version (alias challenger) and apply the gate.

    With ``fingerprint`` (:func:`registration_fingerprint`), a version already tagged with it is
    returned as it is (no new version, no alias moved) unless ``cfg.force``."""
    import mlflow  # lazy: mlflow, CLI start-up

    client = _client(env)
    if fingerprint and not cfg.force:
        existing = find_version(env, cfg, fingerprint)
        if existing is not None:
            return _reused_decision(env, cfg, existing, model_uri, value)
    current = champion(env, cfg)
    tags = {cfg.metric: repr(float(value)), **({FINGERPRINT_TAG: fingerprint} if fingerprint else {})}
    with mlflow_store(env.tracking_uri()):
        mv = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    client.set_registered_model_alias(cfg.model_name, cfg.challenger_alias, mv.version)
    promoted, reason = gate(float(value), current[1] if current else None, cfg.tolerance)
    if promoted:
        client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, mv.version)
    decision = RegistryDecision(
        model_name=cfg.model_name, version=str(mv.version), model_uri=model_uri, metric=cfg.metric,
        challenger_value=float(value), champion_version=current[0] if current else None,
        champion_value=current[1] if current else None, tolerance=cfg.tolerance,
        promoted=promoted, reason=reason,
    )
    client.set_model_version_tag(cfg.model_name, mv.version, "ramflow.promoted", str(promoted).lower())
    if run_id:
        client.set_tag(run_id, "ramflow.registered_version", str(mv.version))
    log.info("registered %s v%s (%s): %s", cfg.model_name, mv.version,
             "champion" if promoted else "challenger only", reason)
    return decision


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return path
