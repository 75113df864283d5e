"""Ingestion entry points: one function per source, the shard-granular embedded step, the
merge of per-shard manifest parts, and :func:`ingest` which dispatches on the source name.

Orchestration runs either a whole source (``ingest(...)``) or, for the embedded corpus,
``ingest_embedded_shard`` for every ``(split, shard)`` of :func:`embedded_shards` in parallel
followed by one :func:`merge_manifests` (plus :func:`measure_written_noise` if wanted).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from data_engine.formats import SPLITS, TRUTH_FIELD, list_shards, manifest_path, raw_dir, shard_path
from data_engine.ingest.config import SOURCES, IngestConfig, IngestSummary, SplitCounts
from data_engine.ingest.sources import RawPair, iter_coco, iter_img2dataset, iter_table
from data_engine.ingest.writer import MANIFEST_SCHEMA, part_paths, parts_dir, write_pairs
from data_engine.shards import iter_samples

log = logging.getLogger(__name__)

CORPUS_MODULE = "data_engine.corpus"
CorpusLike = str | ModuleType


def summary_path(root: str | Path) -> Path:
    return raw_dir(root) / "summary.json"


def _corpus(corpus: CorpusLike) -> ModuleType:
    """The generator module (``split_size``, ``iter_corpus``, ``measure_noise``, ``CorpusConfig``)."""
    return importlib.import_module(corpus) if isinstance(corpus, str) else corpus


def _split_order(splits: Iterable[str]) -> list[str]:
    known = [s for s in SPLITS if s in splits]
    return known + sorted(set(splits) - set(known))


def clear_split(root: str | Path, split: str) -> None:
    """Remove a split's shards and manifest parts (before re-ingesting it whole)."""
    shutil.rmtree(raw_dir(root, split), ignore_errors=True)
    for path in parts_dir(root).glob(f"{split}-*"):
        path.unlink()


# --------------------------------------------------------------------------- merge


def merge_manifests(root: str | Path, *, noise: dict[str, dict[str, Any]] | None = None) -> IngestSummary:
    """Join every manifest part into ``raw/manifest.parquet`` and write ``raw/summary.json``.

    Raises ``ValueError`` if a part's shard is missing or a key occurs twice across parts
    (keys must be unique across splits; within one ingestion run duplicates are skipped).
    """
    root = Path(root)
    records = [json.loads(p.read_text()) for p in sorted(parts_dir(root).glob("*.json"))]
    order = _split_order({r["split"] for r in records})
    records.sort(key=lambda r: (order.index(r["split"]), r["shard"]))
    tables, splits, sources = [], {}, set()
    for record in records:
        split, index = record["split"], record["shard"]
        if not shard_path(root, split, index).exists():
            raise ValueError(f"manifest part {split}/{index} has no shard {shard_path(root, split, index)}")
        tables.append(pq.read_table(part_paths(root, split, index)[0], schema=MANIFEST_SCHEMA))
        counts = SplitCounts.model_validate({k: record[k] for k in ("seen", "written", "skipped", "shards")})
        splits[split] = splits.get(split, SplitCounts()).add(counts)
        sources.add(record["source"])
    table = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    keys = table.column("key").to_pylist()
    if len(keys) != len(set(keys)):
        seen, dupes = set(), []
        for key in keys:
            if key in seen:
                dupes.append(key)
            seen.add(key)
        raise ValueError(f"{len(dupes)} key(s) occur in more than one shard/split, e.g. {dupes[:5]}")
    manifest_path(root).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, manifest_path(root))
    total = SplitCounts()
    for counts in splits.values():
        total = total.add(counts)
    summary = IngestSummary(
        root=str(root), splits=splits, total=total,
        counts_add_up=total.counts_add_up and all(c.counts_add_up for c in splits.values()),
        sources=sorted(sources), noise=noise,
    )
    summary_path(root).write_text(json.dumps(summary.model_dump(exclude={"seconds"}), indent=1))
    for split, counts in splits.items():
        log.info("%s: seen %d, written %d in %d shard(s), skipped %s", split, counts.seen,
                 counts.written, counts.shards, counts.skipped or "none")
    log.info("counts add up (seen == written + skipped): %s", summary.counts_add_up)
    return summary


# --------------------------------------------------------------------------- external sources


def ingest_pairs(
    pairs: Iterable[RawPair], root: str | Path, split: str, source: str, cfg: IngestConfig,
    *, total: int | None = None,
) -> IngestSummary:
    """Replace split ``split`` with ``pairs`` (rolling shards), then merge all parts."""
    start = time.perf_counter()
    clear_split(root, split)
    write_pairs(pairs, root, split, source, cfg, total=total)
    summary = merge_manifests(root)
    summary.seconds = time.perf_counter() - start
    return summary


def ingest_img2dataset(
    urls: str | Path | Sequence[str | Path], root: str | Path, cfg: IngestConfig | None = None,
    *, split: str | None = None,
) -> IngestSummary:
    """img2dataset output (folder of tars, shard URL, brace pattern or list) -> ``split``."""
    cfg = cfg or IngestConfig()
    return ingest_pairs(iter_img2dataset(urls), root, split or cfg.split, "img2dataset", cfg)


def ingest_coco(
    captions_json: str | Path, root: str | Path, cfg: IngestConfig | None = None,
    *, images: str | Path | None = None, split: str | None = None,
) -> IngestSummary:
    """COCO captions JSON + image folder -> ``split`` (one pair per image, all captions kept)."""
    cfg = cfg or IngestConfig()
    return ingest_pairs(iter_coco(captions_json, images), root, split or cfg.split, "coco", cfg)


def ingest_table(
    table: str | Path, root: str | Path, cfg: IngestConfig | None = None,
    *, images: str | Path | None = None, split: str | None = None,
) -> IngestSummary:
    """CSV/parquet of image path + caption (columns from ``cfg``) -> ``split``."""
    cfg = cfg or IngestConfig()
    pairs = iter_table(
        table, image_column=cfg.image_column, caption_column=cfg.caption_column,
        key_column=cfg.key_column, images_dir=images,
    )
    return ingest_pairs(pairs, root, split or cfg.split, "table", cfg)


# --------------------------------------------------------------------------- embedded corpus


def embedded_shards(
    corpus_cfg: Any, cfg: IngestConfig | None = None, *, splits: Sequence[str] = SPLITS,
    corpus: CorpusLike = CORPUS_MODULE,
) -> list[tuple[str, int]]:
    """Every ``(split, shard_index)`` of the embedded corpus: shard ``i`` holds items
    ``[i * shard_size, (i + 1) * shard_size)`` of its split (at least one shard per split)."""
    cfg = cfg or IngestConfig()
    module = _corpus(corpus)
    return [
        (split, i)
        for split in splits
        for i in range(max(1, math.ceil(module.split_size(corpus_cfg, split) / cfg.shard_size)))
    ]


def ingest_embedded_shard(
    corpus_cfg: Any, split: str, shard_index: int, root: str | Path, cfg: IngestConfig | None = None,
    *, corpus: CorpusLike = CORPUS_MODULE, progress: bool | None = None,
) -> SplitCounts:
    """Generate and write one shard of the embedded corpus (plus its manifest part).

    Deterministic: the same ``corpus_cfg`` gives the same items, so the same bytes. Items keep
    their ``truth`` in ``{key}.json``.
    """
    cfg = cfg or IngestConfig()
    module = _corpus(corpus)
    size = module.split_size(corpus_cfg, split)
    start = shard_index * cfg.shard_size
    stop = min(size, start + cfg.shard_size)
    if start >= stop and not (shard_index == 0 and size == 0):
        raise ValueError(f"{split} has {size} items: no shard {shard_index} at shard_size {cfg.shard_size}")
    pairs = (
        RawPair(item.key, caption=item.caption, image=item.image, meta={TRUTH_FIELD: item.truth})
        for item in module.iter_corpus(corpus_cfg, split, start=start, stop=stop)
    )
    show = cfg.progress if progress is None else progress
    return write_pairs(
        pairs, root, split, "embedded", cfg.model_copy(update={"progress": show}),
        shard_index=shard_index, workers=1, total=stop - start, desc=f"{split} shard {shard_index}",
    )


def _shard_job(args: tuple[Any, str, int, str, IngestConfig, str]) -> SplitCounts:
    corpus_cfg, split, index, root, cfg, corpus = args
    return ingest_embedded_shard(corpus_cfg, split, index, root, cfg, corpus=corpus, progress=False)


def measure_written_noise(
    root: str | Path, splits: Sequence[str] = SPLITS, *, corpus: CorpusLike = CORPUS_MODULE,
) -> dict[str, dict[str, Any]]:
    """Caption noise per split, from the ``truth`` written into the shards' ``{key}.json``.

    Splits without shards or without truth (ingested from web-style sources) are left out.
    """
    module = _corpus(corpus)
    noise = {}
    for split in splits:
        samples = iter_samples(list_shards(root, split), decode=False)
        truths = [s.meta[TRUTH_FIELD] for s in samples if TRUTH_FIELD in s.meta]
        if truths:
            noise[split] = module.measure_noise(truths)
    return noise


def ingest_embedded(
    root: str | Path, corpus_cfg: Any = None, cfg: IngestConfig | None = None,
    *, splits: Sequence[str] = SPLITS, corpus: CorpusLike = CORPUS_MODULE,
) -> IngestSummary:
    """Generate every split of the embedded corpus, write its shards (``cfg.workers``
    processes, one shard per task), merge the manifest and measure noise against truth."""
    start = time.perf_counter()
    cfg = cfg or IngestConfig()
    module = _corpus(corpus)
    corpus_cfg = corpus_cfg if corpus_cfg is not None else module.CorpusConfig()
    for split in splits:
        clear_split(root, split)
    jobs = embedded_shards(corpus_cfg, cfg, splits=splits, corpus=module)
    if cfg.workers > 1 and len(jobs) > 1:
        name = module.__name__
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            futures = [pool.submit(_shard_job, (corpus_cfg, s, i, str(root), cfg, name)) for s, i in jobs]
            for future in tqdm(as_completed(futures), total=len(futures), desc="embedded shards",
                               unit="shard", disable=not cfg.progress):
                future.result()
    else:
        for split, index in tqdm(jobs, desc="embedded shards", unit="shard", disable=not cfg.progress):
            ingest_embedded_shard(corpus_cfg, split, index, root, cfg, corpus=module)
    noise = measure_written_noise(root, splits, corpus=module)
    summary = merge_manifests(root, noise=noise)
    summary.seconds = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------- dispatch


def ingest(
    source: str,
    root: str | Path,
    cfg: IngestConfig | None = None,
    *,
    path: str | Path | Sequence[str | Path] | None = None,
    images: str | Path | None = None,
    split: str | None = None,
    corpus_cfg: Any = None,
    splits: Sequence[str] = SPLITS,
    corpus: CorpusLike = CORPUS_MODULE,
) -> IngestSummary:
    """Ingest one source into canonical shards under ``root/raw`` and return the summary.

    ``source``: ``embedded`` (generates ``splits`` from ``corpus_cfg``), ``img2dataset``
    (``path`` = folder / URL / pattern of tars), ``coco`` (``path`` = captions JSON, ``images``
    = image folder), ``table`` (``path`` = CSV/parquet, ``images`` = base of relative paths).
    External sources go to ``split`` (default ``cfg.split``).
    """
    cfg = cfg or IngestConfig()
    if source == "embedded":
        return ingest_embedded(root, corpus_cfg, cfg, splits=splits, corpus=corpus)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    if path is None:
        raise ValueError(f"source {source!r} needs a path")
    if source == "img2dataset":
        return ingest_img2dataset(path, root, cfg, split=split)
    if isinstance(path, (list, tuple)):
        raise ValueError(f"source {source!r} takes one path, got {len(path)}")
    if source == "coco":
        return ingest_coco(path, root, cfg, images=images, split=split)
    return ingest_table(path, root, cfg, images=images, split=split)
