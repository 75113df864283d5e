"""``ramflow corpus ...`` subcommands; ``data_engine/cli.py`` calls :func:`register`."""

from __future__ import annotations

import argparse
import json

from data_engine.corpus import CorpusConfig
from data_engine.corpus.contact_sheet import classes_sheet, items_sheet
from data_engine.corpus.report import corpus_report
from ramflow_io.params import stage_config


def register(subparsers) -> None:
    p = subparsers.add_parser("corpus", help="embedded corpus: report, contact sheets")
    p.add_argument("action", choices=("report", "sheet", "classes"))
    p.add_argument("--out", required=True, help="folder (report) or PNG path (sheet/classes)")
    p.add_argument("--params", default=None, help="params.yaml (default: $RAMFLOW_PARAMS)")
    p.add_argument("--split", default="pretrain")
    p.add_argument("--n", type=int, default=24, help="items on the sheet / measured per split")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = stage_config(CorpusConfig, "corpus", args.params)
    if args.action == "report":
        report = corpus_report(cfg, args.out, n_measure=max(args.n, 100))
        print(json.dumps(report["noise"], indent=1))
    elif args.action == "sheet":
        items_sheet(cfg, args.split, args.out, n=args.n)
    else:
        classes_sheet(args.out, size=cfg.image_size)
    return 0
