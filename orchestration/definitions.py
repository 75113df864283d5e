"""Dagster ``Definitions`` of the ramflow pipeline (``dagster dev -m orchestration.definitions``).

Assets (lineage from :data:`.pipeline.STAGES`)::

    raw_pairs -> parsed_tags -> label_system -> preliminary_model -> engine_cleaned_data
      -> retrained_model -> engine_refined_data -> refined_model -> finetuned_model
      -> evaluation_report -> registered_model

``raw_pairs`` and ``parsed_tags`` are partitioned by shard (``{split}-{i:06d}``, computed from
the params file: ``$RAMFLOW_PARAMS`` or ./params.yaml), so backfills run shards in parallel
runs; the unpartitioned assets downstream read all partitions.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from ramflow_io.params import default_params_path

from .assets import build_assets, build_checks
from .partitions import shard_keys
from .resources import MlflowResource, RamflowStorage, TrainingLauncher

JOB_NAME = "ramflow_pipeline"


def build_definitions(params_path: str | os.PathLike | None = None,
                      resources: dict[str, dg.ConfigurableResource] | None = None) -> dg.Definitions:
    """The definitions for one params file; ``resources`` replace the defaults by key."""
    params = Path(params_path) if params_path is not None else default_params_path()
    params = params.resolve()
    partitions = dg.StaticPartitionsDefinition(shard_keys(params))
    assets = build_assets(partitions)
    checks = build_checks()
    job = dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.all(),
                              description="the whole pipeline, raw pairs to registered champion")
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[job],
        resources={
            "storage": RamflowStorage(params_path=str(params), data_root=os.environ.get("RAMFLOW_DATA_ROOT", "")),
            "mlflow": MlflowResource(tracking_uri=os.environ.get("RAMFLOW_MLFLOW_URI", "")),
            "launcher": TrainingLauncher(mode=os.environ.get("RAMFLOW_LAUNCHER", "")),
            **(resources or {}),
        },
    )


defs = build_definitions()
