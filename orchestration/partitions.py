"""Shard partitions of the raw data: one key ``{split}-{shard:06d}`` per webdataset shard.

The keys of the embedded corpus follow from params alone (``corpus.n_{split}`` items per
split, ``ingest.shard_size`` per shard), so Dagster can list them before anything ran and run
shards in parallel; each key names exactly one ``raw/{split}/{split}-{i:06d}.tar``.
"""

from __future__ import annotations

import os
import re

from data_engine.coco_source import shard_counts, source_config
from data_engine.corpus.config import CorpusConfig
from data_engine.ingest.config import IngestConfig
from data_engine.ingest.steps import embedded_shards
from ramflow_io.formats import SPLITS
from ramflow_io.params import load_params

_KEY = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6})$")


def shard_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def parse_shard_key(key: str) -> tuple[str, int]:
    m = _KEY.match(key)
    if not m or m["split"] not in SPLITS:
        raise ValueError(f"bad shard partition key {key!r}: expected '{{split}}-{{index:06d}}' with split in {SPLITS}")
    return m["split"], int(m["index"])


def shard_keys(params_path: str | os.PathLike | None = None) -> list[str]:
    """All shard keys of the embedded corpus, split by split in index order (as ingestion
    numbers them: :func:`data_engine.ingest.steps.embedded_shards`)."""
    params = load_params(params_path)
    cfg = IngestConfig.model_validate(params.get("ingest") or {})
    source = source_config(params)
    if source.kind == "coco":  # real photos: shard counts follow from the dataset's rows
        counts = shard_counts(source, cfg.shard_size)
        return [shard_key(split, i) for split in SPLITS for i in range(counts.get(split, 0))]
    corpus_cfg = CorpusConfig.model_validate(params.get("corpus") or {})
    return [shard_key(split, i) for split, i in embedded_shards(corpus_cfg, cfg)]


def group_by_split(keys: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key in keys:
        split, index = parse_shard_key(key)
        out.setdefault(split, []).append(index)
    return {s: sorted(v) for s, v in out.items()}
