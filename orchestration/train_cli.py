"""``ramflow train STAGE``: one training stage with its inputs changeable (labels, start model,
output folder, workers), in process or via torchrun.

The stage's default inputs are the pipeline's own wiring (:func:`.stages.train_inputs`, the one
place it is written); ``ramflow stage STAGE`` runs the same stage exactly as Dagster and DVC do
(report, MLflow pipeline run, skip when unchanged), this command is for trying a variant of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ramflow_io import formats
from ramflow_io.params import load_params, stage_config

from .pipeline import MODEL_STAGES


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def default_inputs(stage: str, data_root: Path) -> tuple[list[Path], Path | None]:
    """(label files, init model folder) ``stage`` reads by default, from :func:`.stages.train_inputs`."""
    from .stages import train_inputs  # lazy: torch + mlflow, CLI start-up

    wired = train_inputs(stage, data_root)
    return [wired.labels], formats.model_dir(data_root, wired.init_stage) if wired.init_stage else None


def cmd_train(args: argparse.Namespace) -> int:
    from ram_model.train_stage import TrainStageConfig, launch_train_stage, train_stage  # lazy: torch, CLI start-up

    params = load_params(args.params)
    data_root = Path(args.data_root or (params.get("paths") or {}).get("data_root", "data"))
    overrides = dict(kv.split("=", 1) for kv in args.set or [])
    overrides = {k: _value(v) for k, v in overrides.items()}
    if args.backend:
        overrides["backend"] = args.backend
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg = stage_config(TrainStageConfig, args.stage, args.params, **overrides)
    labels, init = default_inputs(args.stage, data_root)
    labels = [Path(p) for p in args.labels] if args.labels else labels
    init = Path(args.init_from) if args.init_from else init
    if args.scratch:
        init = None
    out_dir = Path(args.out_dir) if args.out_dir else formats.model_dir(data_root, args.stage)
    if args.nproc > 1:
        result = launch_train_stage(cfg, data_root, out_dir, labels, init, args.parent_run_id, nproc=args.nproc,
                                    evaluate_after=not args.no_eval)
    else:
        result = train_stage(cfg, data_root, out_dir, labels, init, args.parent_run_id,
                             evaluate_after=not args.no_eval)
    print(json.dumps(result.to_json(), indent=1, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one model stage with changeable inputs (ramflow stage: as the "
                                            "pipeline runs it)")
    p.add_argument("stage", choices=MODEL_STAGES)
    p.add_argument("--params", help="params.yaml (default: $RAMFLOW_PARAMS or ./params.yaml)")
    p.add_argument("--data-root", help="overrides paths.data_root")
    p.add_argument("--backend", choices=("torch", "deepspeed"),
                   help="training backend (default: the stage's backend in params; this flag overrides it)")
    p.add_argument("--nproc", type=int, default=1, help="worker processes (>1: torchrun launcher)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--labels", nargs="+", help="label parquet files (default: the stage's usual input)")
    p.add_argument("--init-from", help="model folder / checkpoint to start from")
    p.add_argument("--scratch", action="store_true", help="ignore the default init checkpoint")
    p.add_argument("--out-dir", help="default: <data_root>/models/<stage>")
    p.add_argument("--parent-run-id", help="MLflow pipeline run to nest under")
    p.add_argument("--no-eval", action="store_true", help="skip threshold calibration and test evaluation")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=3e-4 epochs=2")
    p.set_defaults(func=cmd_train)
