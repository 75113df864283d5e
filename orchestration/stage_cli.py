"""``ramflow stage NAME`` (one stage, as dvc.yaml runs it) and ``ramflow run`` (the whole
pipeline through Dagster, in process, ending with the registered champion)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from data_engine.ingest import IngestSummary

from . import dvc_yaml
from .checks import run_checks
from .model_registry import end_pipeline_run, start_pipeline_run
from .partitions import shard_keys
from .pipeline import FORCEABLE, STAGES, format_stage_times, report_path, stage_seconds
from .settings import LauncherSettings, MlflowSettings, StageEnv, validate_params

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)",
                              epilog="stages (orchestration/pipeline.py): " + "; ".join(
                                  f"{s.name}: {s.description}" for s in STAGES))
    p.add_argument("name", choices=[s.name for s in STAGES])
    _common(p)
    p.add_argument("--keys", default="", help="comma-separated shard partitions (partitioned stages; default all)")
    p.add_argument("--no-checks", action="store_true", help="skip the stage's blocking quality gates")
    p.add_argument("--force", action="store_true",
                   help="training stages and registered_model: redo even when inputs are unchanged "
                        "(new MLflow run / registry version)")
    p.set_defaults(func=_cmd_stage)

    r = subparsers.add_parser("run", help="materialize the whole pipeline with Dagster (in process)")
    _common(r)
    r.add_argument("--dagster-home", default=None,
                   help="Dagster instance folder (default: $DAGSTER_HOME, else ./.dagster_home)")
    r.set_defaults(func=_cmd_run)

    dvc_yaml.register(subparsers)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None, help="params file (default: $RAMFLOW_PARAMS or params.yaml)")
    p.add_argument("--data-root", default=None, help="override paths.data_root")
    p.add_argument("--launcher", choices=("torch", "deepspeed"), default=os.environ.get("RAMFLOW_LAUNCHER") or None,
                   help="default: each training section's backend in params; set: must agree with it")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed worker processes")
    p.add_argument("--tracking-uri", default=os.environ.get("RAMFLOW_MLFLOW_URI") or None,
                   help="MLflow tracking uri (default sqlite:///{data_root}/mlflow/mlflow.db)")


def _env(args):
    return StageEnv.from_params(args.params, args.data_root, MlflowSettings(tracking_uri=args.tracking_uri),
                                LauncherSettings(mode=args.launcher, nproc=args.nproc))


def _cmd_stage(args) -> int:
    from .stages import run_stage  # lazy: torch + mlflow, CLI start-up

    env = _env(args)
    keys = [k for k in args.keys.split(",") if k] or None
    if args.force and args.name not in FORCEABLE:
        raise SystemExit(f"--force applies to {', '.join(FORCEABLE)}, not {args.name}")
    outcome = run_stage(args.name, env, keys, {"force": True} if args.force else None)
    print(json.dumps({"stage": args.name, "seconds": round(outcome.seconds, 1), **outcome.metrics}, default=str))
    if args.no_checks:
        return 0
    failed = 0
    for check in run_checks(args.name, env.data_root, env.params_path):
        print(f"check {check.name}: {'PASSED' if check.passed else 'FAILED'} - {check.description}")
        failed += not check.passed
    return 1 if failed else 0


def ensure_dagster_home(path: str | os.PathLike | None = None) -> Path:
    """``$DAGSTER_HOME`` (or ``path`` / ./.dagster_home) with a dagster.yaml that turns telemetry off."""
    home = Path(path or os.environ.get("DAGSTER_HOME") or ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def run_pipeline(params: str | os.PathLike | None = None, data_root: str | None = None,
                 launcher: str | None = None, nproc: int = 2, tracking_uri: str | None = None,
                 instance=None, raise_on_error: bool = True):
    """Materialize every asset (all shard partitions in one run) under a fresh MLflow
    pipeline run; returns ``(ExecuteInProcessResult, pipeline_run_id)``."""
    import dagster as dg  # lazy: dagster, CLI start-up

    from .definitions import JOB_NAME, build_definitions  # lazy: dagster, CLI start-up
    from .resources import MlflowResource, RamflowStorage, TrainingLauncher  # lazy: dagster, CLI start-up

    env = StageEnv.from_params(params, data_root, MlflowSettings(tracking_uri=tracking_uri),
                               LauncherSettings(mode=launcher, nproc=nproc))
    validate_params(env.params_path)  # a misspelt key in any section fails now, not when its stage starts
    env.data_root.mkdir(parents=True, exist_ok=True)
    parent = start_pipeline_run(env, name="ramflow run")
    resources = {
        "storage": RamflowStorage(params_path=str(env.params_path.resolve()), data_root=str(env.data_root)),
        "mlflow": MlflowResource(tracking_uri=tracking_uri or "", parent_run_id=parent),
        "launcher": TrainingLauncher(mode=launcher or "", nproc=nproc),
    }
    defs = build_definitions(env.params_path, resources=resources)
    keys = shard_keys(env.params_path)
    instance = instance or dg.DagsterInstance.get()
    job = defs.resolve_job_def(JOB_NAME)
    result = job.execute_in_process(
        instance=instance, raise_on_error=raise_on_error,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1],
              "ramflow/mlflow_pipeline_run": parent},
    )
    end_pipeline_run(env, parent, "FINISHED" if result.success else "FAILED")
    return result, parent, env


def engine_labels_line(report: Path) -> str | None:
    """The label quality an engine round's report measured against the corpus truth, in one line."""
    if not report.exists():
        return None
    metrics = json.loads(report.read_text()).get("metrics", {})
    steps = [(step, metrics.get(f"metrics/{step}/precision"), metrics.get(f"metrics/{step}/recall"))
             for step in ("parsed", "generated", "cleaned")]
    parts = [f"{step} P {p:.3f} R {r:.3f}" for step, p, r in steps if p is not None and r is not None]
    return "labels vs truth: " + ", ".join(parts) if parts else None


def run_stage_times(run_id: str, wall: float, instance=None) -> str:
    """Each stage's seconds in Dagster run ``run_id`` (its step events) and the run's wall time."""
    import dagster as dg  # lazy: dagster, CLI start-up

    instance = instance or dg.DagsterInstance.get()
    events = [(e.step_key, e.dagster_event.event_type_value, e.timestamp) for e in instance.all_logs(run_id)
              if e.dagster_event is not None and e.step_key]
    return format_stage_times(stage_seconds(events), wall)


def _cmd_run(args) -> int:
    ensure_dagster_home(args.dagster_home)
    start = time.perf_counter()
    result, parent, env = run_pipeline(args.params, args.data_root, args.launcher, args.nproc,
                                       args.tracking_uri, raise_on_error=False)
    wall = time.perf_counter() - start
    raw = report_path(env.data_root, "raw_pairs")
    if raw.exists():
        print(IngestSummary.model_validate(json.loads(raw.read_text())["details"]["summary"]).format(), "\n")
    for stage in ("engine_cleaned_data", "engine_refined_data"):
        line = engine_labels_line(report_path(env.data_root, stage))
        if line:
            print(f"{stage}: {line}")
    evaluation = report_path(env.data_root, "evaluation_report")
    if evaluation.exists():
        print(json.loads(evaluation.read_text()).get("details", {}).get("table_md", ""))
    registry = report_path(env.data_root, "registered_model")
    if registry.exists():
        d = json.loads(registry.read_text())["decision"]
        print(f"\nregistry: {d['model_name']} v{d['version']} "
              f"{'is champion' if d['promoted'] else 'is challenger only'} ({d['reason']})")
    print("\n" + run_stage_times(result.run_id, wall))
    print(f"pipeline {'SUCCEEDED' if result.success else 'FAILED'}: dagster run {result.run_id}, "
          f"MLflow pipeline run {parent}, wall time {wall:.1f}s")
    return 0 if result.success else 1


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main())
