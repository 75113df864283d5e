"""``ramflow`` subcommands of the model package: ``models``, ``tag``, ``caption``, ``evaluate``, ``serve``.

Heavy imports (torch, timm) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ram_model.registry import MODEL_CONFIGS, count_parameters, list_models
from ramflow_io.formats import list_shards, model_dir
from ramflow_io.params import given, load_params, stage_config

DEFAULT_STAGE = "finetuned_model"


def _default_checkpoint() -> Path:
    root = (load_params().get("paths") or {}).get("data_root", "data")
    return model_dir(root, DEFAULT_STAGE)


def _read_tag_file(path: str) -> list[str]:
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise SystemExit(f"{path}: no tag names")
    return list(dict.fromkeys(names))


def cmd_models(args: argparse.Namespace) -> int:
    print(f"{'name':<18} {'backbone':<34} {'size':>5} {'params':>14} {'trainable':>14}")
    for name in list_models():
        cfg = MODEL_CONFIGS[name]
        counts = count_parameters(name)
        print(f"{name:<18} {cfg.backbone:<34} {cfg.image_size:>5} {counts['total']:>14,} {counts['trainable']:>14,}")
        if args.parts:
            for key, value in counts.items():
                if key.startswith("part."):
                    print(f"    {key[5:]:<30} {value:>14,}")
    return 0


def _tagger(args: argparse.Namespace):
    from ram_model.inference import Tagger  # lazy: torch, CLI start-up

    path = Path(args.checkpoint) if args.checkpoint else _default_checkpoint()
    if not path.exists():
        raise SystemExit(f"checkpoint not found: {path} (pass --checkpoint)")
    return Tagger.from_checkpoint(path, device=args.device, batch_size=args.batch_size)


def cmd_tag(args: argparse.Namespace) -> int:
    tagger = _tagger(args)
    if args.tags:
        tagger.set_tags(_read_tag_file(args.tags))
    results = tagger.tag(args.images, threshold=args.threshold, top_k=args.top_k)
    for result in results:
        if args.scores:
            print(" | ".join(f"{t} ({s:.2f})" for t, s in result))
        else:
            print(" | ".join(t for t, _ in result))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    tagger = _tagger(args)
    for caption in tagger.caption(args.images):
        print(caption)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ram_model.evaluate import EvaluationConfig, calibrate_checkpoint, evaluate_checkpoint  # lazy: torch, CLI start-up

    cfg = stage_config(EvaluationConfig, "evaluation", args.params,
                       **given(split=args.split, threshold=args.threshold, max_samples=args.max_samples,
                               device=args.device))
    if args.open_set_tags:
        cfg = cfg.model_copy(update={"open_set_tags": _read_tag_file(args.open_set_tags)})
    root = args.data_root or (load_params(args.params).get("paths") or {}).get("data_root", "data")
    checkpoint = Path(args.checkpoint) if args.checkpoint else _default_checkpoint()
    if args.calibrate_split:
        val_shards = list_shards(root, args.calibrate_split)
        if not val_shards:
            raise SystemExit(f"no shards for calibration split {args.calibrate_split!r} under {root}")
        out = Path(args.save_calibrated or checkpoint)
        info = calibrate_checkpoint(checkpoint, val_shards, out, cfg)
        print(json.dumps({"calibrated": str(out), **info}), file=sys.stderr)
        checkpoint = out
    shards = [Path(s) for s in args.shards] if args.shards else list_shards(root, cfg.split)
    if not shards:
        raise SystemExit(f"no shards for split {cfg.split!r} under {root}")
    result = evaluate_checkpoint(checkpoint, shards, cfg, args.out)
    if not args.per_class:
        for section in ("all", "open_set"):
            if section in result:
                result[section].pop("per_class_ap", None)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ram_model.serving import ServingConfig, serve  # lazy: torch + mlflow, CLI start-up

    overrides = {"max_body_bytes": None if args.max_body_mb is None else int(args.max_body_mb * 2**20),
                 "max_image_pixels": args.max_pixels, "batch_size": args.batch_size,
                 "fast_route": False if args.no_fast_route else None}
    config = ServingConfig.from_env().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    serve(args.model_uri, host=args.host, port=args.port, workers=args.workers,
          config=ServingConfig(**config.model_dump()), timeout_s=args.timeout)
    return 0


def register(subparsers) -> None:
    """Add the model subcommands to the ``ramflow`` parser."""
    p = subparsers.add_parser("models", help="list registered model configs with parameter counts")
    p.add_argument("--parts", action="store_true", help="also show per-module parameter counts")
    p.set_defaults(func=cmd_models)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("images", nargs="+", help="image files")
        p.add_argument("--checkpoint", help=f"model file or folder (default: <data_root>/models/{DEFAULT_STAGE})")
        p.add_argument("--device", default="cpu")
        p.add_argument("--batch-size", type=int, default=32)

    p = subparsers.add_parser("tag", help="tag images: one line per image, 'tree | sky | beach'")
    common(p)
    p.add_argument("--tags", help="file with one custom tag name per line (open-set tagging)")
    p.add_argument("--threshold", type=float, help="one threshold for all tags (default: per-class)")
    p.add_argument("--top-k", type=int, help="at most this many tags per image")
    p.add_argument("--scores", action="store_true", help="print scores next to the tags")
    p.set_defaults(func=cmd_tag)

    p = subparsers.add_parser("caption", help="caption images (conditioned on predicted tags)")
    common(p)
    p.set_defaults(func=cmd_caption)

    p = subparsers.add_parser("evaluate", help="mAP / P / R / F1 of a checkpoint on shards with truth tags")
    p.add_argument("--checkpoint", help=f"model file or folder (default: <data_root>/models/{DEFAULT_STAGE})")
    p.add_argument("--params", help="params.yaml (default: $RAMFLOW_PARAMS or ./params.yaml)")
    p.add_argument("--data-root", help="overrides paths.data_root")
    p.add_argument("--split", help="split whose shards are evaluated (default: evaluation.split)")
    p.add_argument("--shards", nargs="*", help="explicit shard files instead of a split")
    p.add_argument("--threshold", type=float, help="one threshold for all tags (default: per-class)")
    p.add_argument("--open-set-tags", help="file of held-out tag names: metrics restricted to them")
    p.add_argument("--calibrate-split", help="first calibrate per-class thresholds on this split")
    p.add_argument("--save-calibrated", help="where the calibrated model goes (default: overwrite)")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="write the metrics JSON here too")
    p.add_argument("--per-class", action="store_true", help="print per-class AP too")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("serve", help="serve a logged model over HTTP (MLflow scoring protocol) with limits")
    p.add_argument("-m", "--model-uri", required=True, help="models:/ram-tagger@champion, runs:/<id>/model or a folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=5000)
    p.add_argument("-w", "--workers", type=int, default=1, help="server processes (each loads the model)")
    p.add_argument("--max-body-mb", type=float, help="request body limit in MiB (default 64)")
    p.add_argument("--max-pixels", type=int, help="decoded pixels per image (default 40,000,000)")
    p.add_argument("--batch-size", type=int, help="images decoded and scored together (default 8)")
    p.add_argument("--timeout", type=int, help="seconds per request before HTTP 504 (MLflow's default: 60)")
    p.add_argument("--no-fast-route", action="store_true",
                   help="send every request through MLflow's pandas path (default: well-formed JSON skips it)")
    p.set_defaults(func=cmd_serve)

    from ram_model.onnx_export import register as register_onnx  # lazy: torch; `ramflow export-onnx`

    register_onnx(subparsers)
