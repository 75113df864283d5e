"""``ramflow`` subcommands of the data engine.

Each subcommand has a ``_register_<name>(subparsers)`` that builds its parser and a
``_cmd_<name>(args)`` that runs it; :func:`register` calls every ``_register_*``. Commands
import their stage modules inside the function, so ``ramflow --help`` stays fast. Shared
options (``--root``, ``--params``) come from :func:`add_common_args`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_engine.corpus import CorpusConfig
from data_engine.ingest import IngestConfig, ingest
from data_engine.ingest.config import SOURCES
from ramflow_io.formats import SPLITS
from ramflow_io.params import given, load_params, stage_config


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--params`` (params.yaml) and ``--root`` (data root, default ``paths.data_root``)."""
    parser.add_argument("--params", default=None, help="params file (default: $RAMFLOW_PARAMS or params.yaml)")
    parser.add_argument("--root", default=None, help="data root (default: paths.data_root in params)")


def data_root(args: argparse.Namespace) -> Path:
    """The data root: ``--root``, else ``paths.data_root`` from the params file, else ``data``."""
    if args.root is not None:
        return Path(args.root)
    return Path((load_params(args.params).get("paths") or {}).get("data_root", "data"))


# --------------------------------------------------------------------------- ingest


def _register_ingest(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="image-text pairs -> raw/ webdataset shards + manifest",
        description="Turn a source of image-text pairs into canonical shards under ROOT/raw, "
        "print items per split and skipped-by-reason (and, for the embedded corpus, caption "
        "noise measured against truth). Exit status 1 if the counts do not add up.",
    )
    add_common_args(p)
    p.add_argument("--source", choices=SOURCES, default="embedded")
    p.add_argument("--path", nargs="+", default=None,
                   help="img2dataset: tar folder / URL(s) / brace pattern; coco: captions JSON; table: CSV/parquet")
    p.add_argument("--images", default=None, help="coco/table: image folder (default: next to --path)")
    p.add_argument("--split", default=None, help="target split of a non-embedded source (default: ingest.split)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="embedded: splits to generate")
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--max-side", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--image-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--key-column", default=None)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args: argparse.Namespace) -> int:
    cfg = stage_config(
        IngestConfig, "ingest", args.params,
        **given(shard_size=args.shard_size, max_side=args.max_side, max_pixels=args.max_pixels,
                workers=args.workers, image_column=args.image_column, caption_column=args.caption_column,
                key_column=args.key_column, split=args.split, progress=False if args.no_progress else None),
    )
    corpus_cfg = None
    if args.source == "embedded":
        corpus_cfg = stage_config(CorpusConfig, "corpus", args.params)
    path = args.path
    if path is not None and args.source != "img2dataset":
        if len(path) != 1:
            raise SystemExit(f"--source {args.source} takes one --path")
        path = path[0]
    try:
        summary = ingest(
            args.source, data_root(args), cfg,
            path=path, images=args.images, corpus_cfg=corpus_cfg, splits=args.splits,
        )
    except (FileNotFoundError, ValueError) as err:
        # Missing or empty input, a malformed COCO file: nothing was replaced (the ingest writes a
        # new split and swaps it in at the end), so one clear line is all the user needs.
        raise SystemExit(f"ramflow ingest: {err} (the previous data under {data_root(args)} is unchanged)")
    if args.json:
        print(json.dumps(summary.model_dump(), indent=1))
    else:
        print(summary.format())
    return 0 if summary.counts_add_up else 1


def register(subparsers) -> None:
    """Add ``ramflow ingest`` to the parser (``corpus``, ``parse`` and ``labels`` register from
    :mod:`data_engine.corpus.cli` and :mod:`data_engine.parse_cli`, listed in ``orchestration/cli.py``)."""
    _register_ingest(subparsers)
