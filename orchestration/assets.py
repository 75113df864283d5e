"""Dagster assets and blocking asset checks, one per stage of :data:`.pipeline.STAGES`.

Every asset is the same thin wrapper: build the stage environment from the resources, call
:func:`.stages.run_stage` and turn its outcome into metadata (counts, metrics, MLflow run id,
plots as markdown images). Deps come from the stage table, so the asset graph is the DVC graph.
"""


import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from pydantic import Field

from .checks import CHECKED_STAGES, CheckOutcome, run_checks
from .model_registry import pipeline_run_for_tag
from .pipeline import MODEL_STAGES, STAGES, StageSpec, report_path
from .resources import MlflowResource, RamflowStorage, TrainingLauncher, stage_env

GROUP = "ramflow"
_MAX_INLINE_PNG = 2_000_000  # bytes; bigger plots are shown by path


class StageRunConfig(dg.Config):
    """Run config of every asset: the params file (empty: the storage resource's) and
    overrides of the stage's params section, as a YAML mapping (e.g. ``max_steps: 2``)."""

    params_path: str = Field("", description="params.yaml to read (empty: RamflowStorage.params_path)")
    overrides_yaml: str = Field("", description="YAML mapping merged over the stage's params section")


def _overrides(config: StageRunConfig) -> dict | None:
    if not config.overrides_yaml.strip():
        return None
    data = yaml.safe_load(config.overrides_yaml)
    if not isinstance(data, dict):
        raise dg.Failure(f"overrides_yaml must be a YAML mapping, got {type(data).__name__}")
    return data


def png_markdown(path: str | Path, title: str | None = None) -> str:
    """A markdown image: inline base64 PNG when small enough, else the file path."""
    path = Path(path)
    title = title or path.stem
    data = path.read_bytes()
    if len(data) <= _MAX_INLINE_PNG:
        return f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})"
    return f"**{title}**: `{path}`"


def _metadata_value(value: Any) -> Any:
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    if value is None:
        return dg.MetadataValue.null()
    return dg.MetadataValue.text(str(value))


def outcome_metadata(outcome, root: Path) -> dict[str, Any]:
    """Stage outcome -> Dagster metadata (numbers stay numbers, so the UI plots them over runs)."""
    meta: dict[str, Any] = {k: _metadata_value(v) for k, v in outcome.metrics.items()}
    meta["report"] = dg.MetadataValue.path(str(report_path(root, outcome.stage)))
    meta["seconds"] = dg.MetadataValue.float(round(outcome.seconds, 2))
    if outcome.mlflow_run_id:
        meta["mlflow_run_id"] = dg.MetadataValue.text(outcome.mlflow_run_id)
    if outcome.plots:
        meta["plots"] = dg.MetadataValue.md("\n\n".join(png_markdown(p) for p in outcome.plots))
    table = outcome.details.get("table_md")
    if table:
        meta["evaluation_table"] = dg.MetadataValue.md(table)
    return meta


def _make_asset(spec: StageSpec, partitions_def: dg.PartitionsDefinition | None) -> dg.AssetsDefinition:
    @dg.asset(
        name=spec.name,
        deps=list(spec.upstream),
        partitions_def=partitions_def if spec.partitioned else None,
        group_name=GROUP,
        description=spec.description,
        kinds={"python"},
        tags={"ramflow/params": ".".join(spec.params)},
        metadata={"function": spec.function, "params_sections": ", ".join(spec.params),
                  "outputs": ", ".join(spec.outs)},
    )
    def _asset(context: dg.AssetExecutionContext, config: StageRunConfig, storage: RamflowStorage,
               mlflow: MlflowResource, launcher: TrainingLauncher) -> dg.MaterializeResult:
        if config.params_path:
            storage = RamflowStorage(params_path=config.params_path, data_root=storage.data_root)
        env = stage_env(storage, mlflow, launcher)
        if spec.name in MODEL_STAGES and not env.mlflow.parent_run_id:
            # one MLflow pipeline run per Dagster run or backfill: the parent of its training runs
            # (a backfill's runs share its id, so all its training runs share one parent)
            backfill = context.run.tags.get("dagster/backfill")
            parent = (pipeline_run_for_tag(env, "dagster.backfill", backfill) if backfill
                      else pipeline_run_for_tag(env, "dagster.run_id", context.run_id))
            env = dataclasses.replace(env, mlflow=dataclasses.replace(env.mlflow, parent_run_id=parent))
        keys = list(context.partition_keys) if spec.partitioned else None
        from .stages import run_stage  # lazy: Dagster loads the definitions without torch / mlflow (~6 s)

        outcome = run_stage(spec.name, env, keys, _overrides(config))
        context.log.info("%s: %s", spec.name, json.dumps(outcome.metrics, default=str)[:2000])
        return dg.MaterializeResult(metadata=outcome_metadata(outcome, env.data_root))

    return _asset


def _make_check(stage: str, check_name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=stage, name=check_name, blocking=True,
                    description=f"blocking gate on {stage} (thresholds: params.yaml checks/registry)")
    def _check(storage: RamflowStorage) -> dg.AssetCheckResult:
        outcomes: list[CheckOutcome] = run_checks(stage, storage.resolved_root(), storage.params_path)
        outcome = next(o for o in outcomes if o.name == check_name)
        return dg.AssetCheckResult(
            passed=outcome.passed, description=outcome.description,
            metadata={k: _metadata_value(v) for k, v in outcome.metadata.items()},
        )

    return _check


def build_assets(partitions_def: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    return [_make_asset(spec, partitions_def) for spec in STAGES]


def build_checks() -> list[dg.AssetChecksDefinition]:
    return [_make_check(stage, name) for stage, names in CHECKED_STAGES.items() for name in names]
