"""``ramflow import-official CKPT --arch ram|ram_plus|tag2text [--out DIR] [--register]``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ram_model.official.resources import OfficialTagSet, read_lines
from ram_model.tracking import tracking_uri
from ramflow_io.formats import model_dir
from ramflow_io.params import load_params


def _data_root(args: argparse.Namespace) -> Path:
    """``--data-root``, else ``paths.data_root`` of the params file (``data`` when unset)."""
    return Path(args.data_root or (load_params(args.params).get("paths") or {}).get("data_root", "data"))


def _default_out(args: argparse.Namespace) -> Path:
    return model_dir(_data_root(args), f"official_{args.arch}")


def cmd_import_official(args: argparse.Namespace) -> int:
    from ram_model.official.importer import OfficialImportConfig, import_official  # lazy: torch + mlflow, CLI start-up

    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.text_encoder:
        overrides["text_encoder"] = args.text_encoder
    tag_set = None
    if args.tag_list:  # a checkpoint with its own tag list (fine-tuned or test weights)
        names = [n for n in read_lines(Path(args.tag_list)) if n.strip()]
        tag_set = OfficialTagSet(tuple(names), (), tuple([args.threshold] * len(names)), ())
    cfg = OfficialImportConfig(checkpoint=Path(args.checkpoint), arch=args.arch, out=Path(args.out or _default_out(args)),
                               model_name=args.model, overrides=overrides, to_registry=args.register,
                               registered_name=args.registered_name)
    # --register: --tracking-uri, else $MLFLOW_TRACKING_URI, else the data root's sqlite store (as training)
    uri = tracking_uri(_data_root(args), args.tracking_uri) if args.register else None
    model, path = import_official(cfg, tag_set=tag_set, tracking_uri=uri)
    print(json.dumps({"checkpoint": str(path), "model": model.config.name, "tags": len(model.tag_names),
                      **({"registered": model.registered} if getattr(model, "registered", None) else {})}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("import-official",
                              help="import a released RAM / RAM++ / Tag2Text checkpoint as a ramflow model")
    p.add_argument("checkpoint", help="the .pth file ({'model': state_dict} or a bare state dict)")
    p.add_argument("--arch", required=True, choices=("ram", "ram_plus", "tag2text"))
    p.add_argument("--out", help="model folder to write (default <data_root>/models/official_<arch>)")
    p.add_argument("--model", help="registry config (default: the arch's official config)")
    p.add_argument("--overrides", help='config field overrides as JSON, e.g. \'{"caption": false}\'')
    p.add_argument("--text-encoder", help="open-set text encoder, e.g. open_clip_ram:/path/to/ViT-B-16.pt")
    p.add_argument("--tag-list", help="tag names, one per line, instead of the official list (same order as "
                                      "the checkpoint's label_embed rows)")
    p.add_argument("--threshold", type=float, default=0.68, help="threshold of every tag of --tag-list")
    p.add_argument("--register", action="store_true", help="log as an MLflow pyfunc and register it")
    p.add_argument("--registered-name", help="registered model name (default ram-official-<arch>)")
    p.add_argument("--params", default=None, help="params file (default: $RAMFLOW_PARAMS or params.yaml)")
    p.add_argument("--data-root", default=None, help="override paths.data_root")
    p.add_argument("--tracking-uri", default=os.environ.get("RAMFLOW_MLFLOW_URI") or None,
                   help="MLflow tracking uri (default sqlite:///{data_root}/mlflow/mlflow.db)")
    p.set_defaults(func=cmd_import_official)
