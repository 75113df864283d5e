"""Ingestion entry points: one function per source, the shard-granular embedded step, the
merge of per-shard manifest parts, and :func:`ingest` which dispatches on the source name.

Orchestration runs either a whole source (``ingest(...)``) or, for the embedded corpus,
``ingest_embedded_shard`` for every ``(split, shard)`` of :func:`embedded_shards` in parallel
followed by one :func:`merge_manifests` (plus :func:`measure_written_noise` if wanted).

A whole-split ingest never touches the split it replaces until the new one is complete: it is
written into a staging folder, the new manifest is built and checked (unique keys), and only
then is the folder swapped in (see :mod:`data_engine.ingest.swap`). An external source that
writes no sample (a mistyped path, all items bad) raises :class:`EmptyIngestError` and leaves
the previous split as it was.
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

from data_engine.ingest.config import SOURCES, IngestConfig, IngestSummary, SplitCounts
from data_engine.ingest.sources import RawPair, iter_coco, iter_img2dataset, iter_table
from data_engine.ingest.swap import PENDING, ingest_lock, new_staging_dir, recover, swap_in, write_atomic
from data_engine.ingest.writer import MANIFEST_SCHEMA, PARTS, dir_part_paths, write_pairs
from ramflow_io.formats import SPLITS, TRUTH_FIELD, manifest_path, raw_dir, shard_path
from ramflow_io.shards import iter_samples

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


class EmptyIngestError(ValueError):
    """A source gave no sample to write; the split it would have replaced is left as it was."""

    def __init__(self, message: str, counts: SplitCounts) -> None:
        super().__init__(message)
        self.counts = counts


def clear_split(root: str | Path, split: str) -> None:
    """Remove a split's shards and manifest parts (its folder). Ingestion no longer calls this:
    a re-ingest swaps the new split in (the old one stays until the new one is complete)."""
    shutil.rmtree(raw_dir(root, split), ignore_errors=True)


# --------------------------------------------------------------------------- merge


def _split_dirs(root: Path) -> dict[str, Path]:
    """The split folders under ``raw/`` (not the hidden staging ones)."""
    raw = raw_dir(root)
    if not raw.is_dir():
        return {}
    return {d.name: d for d in sorted(raw.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and (d / PARTS).is_dir()}


def _collect(
    root: Path, staged: dict[str, Path], noise: dict[str, dict[str, Any]] | None,
) -> tuple[pa.Table, IngestSummary]:
    """The manifest and summary of the split folders with ``staged`` in place of theirs.

    Reads only; raises ``ValueError`` if a part's shard is missing or a key occurs twice across
    parts (keys must be unique across splits; within one ingestion run duplicates are skipped).
    """
    dirs = {**_split_dirs(root), **staged}
    records = []
    for split, folder in dirs.items():
        for path in sorted((folder / PARTS).glob("*.json")):
            record = json.loads(path.read_text())
            if record["split"] != split:
                raise ValueError(f"manifest part {path} belongs to split {record['split']!r}, not {split!r}")
            records.append((folder, record))
    order = _split_order({r["split"] for _, r in records})
    records.sort(key=lambda fr: (order.index(fr[1]["split"]), fr[1]["shard"]))
    tables, splits, sources, truncated = [], {}, set(), {}
    for folder, record in records:
        split, index = record["split"], record["shard"]
        shard = folder / shard_path(root, split, index).name
        if not shard.exists():
            raise ValueError(f"manifest part {split}/{index} has no shard {shard}")
        tables.append(pq.read_table(dir_part_paths(folder, split, index).rows, schema=MANIFEST_SCHEMA))
        counts = SplitCounts.model_validate({k: record[k] for k in ("seen", "written", "skipped", "shards")})
        splits[split] = splits.get(split, SplitCounts()).add(counts)
        sources.add(record["source"])
        if record.get("truncated_shards"):
            truncated.setdefault(split, []).extend(record["truncated_shards"])
    table = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    keys = table.column("key").to_pylist()
    if len(keys) != len(set(keys)):
        seen, dupes = set(), []
        for key in keys:
            if key in seen:
                dupes.append(key)
            seen.add(key)
        raise ValueError(f"{len(dupes)} key(s) occur in more than one shard/split, e.g. {dupes[:5]}")
    total = SplitCounts()
    for counts in splits.values():
        total = total.add(counts)
    summary = IngestSummary(
        root=str(root), splits=splits, total=total,
        counts_add_up=total.counts_add_up and all(c.counts_add_up for c in splits.values()),
        sources=sorted(sources), noise=noise, truncated_shards=truncated,
    )
    return table, summary


def _write_manifest(root: Path, table: pa.Table, summary: IngestSummary) -> None:
    """Replace ``raw/manifest.parquet`` and ``raw/summary.json``, each atomically."""
    manifest_path(root).parent.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(manifest_path(root), sink.getvalue().to_pybytes())
    write_atomic(summary_path(root), json.dumps(summary.model_dump(exclude={"seconds"}), indent=1).encode())
    for split, counts in summary.splits.items():
        log.info("%s: seen %d, written %d in %d shard(s), skipped %s", split, counts.seen,
                 counts.written, counts.shards, counts.skipped or "none")
    for split, urls in summary.truncated_shards.items():
        log.warning("%s: %d truncated input shard(s): %s", split, len(urls), ", ".join(urls))
    log.info("counts add up (seen == written + skipped): %s", summary.counts_add_up)


def _previous_noise(root: Path) -> dict[str, dict[str, Any]] | None:
    try:
        return json.loads(summary_path(root).read_text()).get("noise")
    except (OSError, ValueError):
        return None


def _recover(root: Path) -> None:
    """Clean up after a crashed ingest (hold the ingest lock); rebuild the manifest if a swap
    was under way."""
    if recover(root):
        table, summary = _collect(root, {}, _previous_noise(root))
        _write_manifest(root, table, summary)
        (raw_dir(root) / PENDING).unlink()
        log.warning("rebuilt %s after an interrupted ingest", manifest_path(root))


def _replace_splits(root: Path, staged: dict[str, Path], noise: dict[str, dict[str, Any]] | None) -> IngestSummary:
    """Swap the complete staging folders in and write the new manifest (hold the ingest lock).

    Everything that can fail on bad data (missing shards, duplicate keys) is checked before
    the first rename, so a failure leaves the previous splits and manifest untouched.
    """
    table, summary = _collect(root, staged, noise)
    pending = raw_dir(root) / PENDING
    write_atomic(pending, json.dumps(sorted(staged)).encode())
    previous = [swap_in(folder, raw_dir(root, split)) for split, folder in staged.items()]
    _write_manifest(root, table, summary)
    pending.unlink()
    for folder in previous:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return summary


def merge_manifests(root: str | Path, *, noise: dict[str, dict[str, Any]] | None = None) -> IngestSummary:
    """Join every split folder's manifest parts into ``raw/manifest.parquet`` and write
    ``raw/summary.json`` (both atomically).

    Raises ``ValueError`` if a part's shard is missing or a key occurs twice across parts
    (keys must be unique across splits; within one ingestion run duplicates are skipped).
    """
    root = Path(root)
    with ingest_lock(root):
        recover(root)
        table, summary = _collect(root, {}, noise)
        _write_manifest(root, table, summary)
        (raw_dir(root) / PENDING).unlink(missing_ok=True)
    return summary


# --------------------------------------------------------------------------- external sources


def ingest_pairs(
    pairs: Iterable[RawPair], root: str | Path, split: str, source: str, cfg: IngestConfig,
    *, total: int | None = None,
) -> IngestSummary:
    """Replace split ``split`` with ``pairs`` (rolling shards), then merge all parts.

    The new split is staged and swapped in only when complete; on any error (a source that
    fails mid-way, no sample written, a key already in another split) the previous split and
    manifest stay as they were. Raises :class:`EmptyIngestError` when no sample was written.
    """
    start = time.perf_counter()
    root = Path(root)
    with ingest_lock(root):
        _recover(root)
        staging = new_staging_dir(root, split)
        try:
            counts = write_pairs(pairs, root, split, source, cfg, total=total, split_dir=staging)
            if counts.written == 0:
                skipped = ", ".join(f"{k}={v}" for k, v in counts.skipped.items()) or "none"
                raise EmptyIngestError(
                    f"{source} -> {split}: no sample to write (read {counts.seen} item(s), skipped: {skipped}); "
                    f"the previous {split!r} split is left unchanged", counts,
                )
            summary = _replace_splits(root, {split: staging}, noise=None)
        finally:  # unfinished staging, or (after an exchange) the previous split
            shutil.rmtree(staging, ignore_errors=True)
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
    *, corpus: CorpusLike = CORPUS_MODULE, progress: bool | None = None, split_dir: str | Path | None = None,
) -> SplitCounts:
    """Generate and write one shard of the embedded corpus (plus its manifest part).

    Deterministic: the same ``corpus_cfg`` gives the same items, so the same bytes. Items keep
    their ``truth`` in ``{key}.json``. ``split_dir``: write into that (staging) folder instead
    of ``raw/{split}``. The shard file and its part are each replaced atomically.
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
        split_dir=split_dir,
    )


def _shard_job(args: tuple[Any, str, int, str, IngestConfig, str, str]) -> SplitCounts:
    corpus_cfg, split, index, root, cfg, corpus, split_dir = args
    return ingest_embedded_shard(corpus_cfg, split, index, root, cfg, corpus=corpus, progress=False,
                                 split_dir=split_dir)


def measure_written_noise(
    root: str | Path, splits: Sequence[str] = SPLITS, *, corpus: CorpusLike = CORPUS_MODULE,
    split_dirs: dict[str, Path] | None = None,
) -> dict[str, dict[str, Any]]:
    """Caption noise per split, from the ``truth`` written into the shards' ``{key}.json``.

    Splits without shards or without truth (ingested from web-style sources) are left out.
    ``split_dirs``: read those (staging) folders instead of ``raw/{split}``.
    """
    module = _corpus(corpus)
    noise = {}
    for split in splits:
        folder = (split_dirs or {}).get(split, raw_dir(root, split))
        samples = iter_samples(sorted(folder.glob(f"{split}-*.tar")), decode=False)
        truths = [s.meta[TRUTH_FIELD] for s in samples if TRUTH_FIELD in s.meta]
        if truths:
            noise[split] = module.measure_noise(truths)
    return noise


def ingest_embedded(
    root: str | Path, corpus_cfg: Any = None, cfg: IngestConfig | None = None,
    *, splits: Sequence[str] = SPLITS, corpus: CorpusLike = CORPUS_MODULE,
) -> IngestSummary:
    """Generate every split of the embedded corpus, write its shards (``cfg.workers``
    processes, one shard per task), merge the manifest and measure noise against truth.

    Each split is staged and swapped in only once every split is written and the manifest
    checked, so a failure leaves the previous data as it was.
    """
    start = time.perf_counter()
    root = Path(root)
    cfg = cfg or IngestConfig()
    module = _corpus(corpus)
    corpus_cfg = corpus_cfg if corpus_cfg is not None else module.CorpusConfig()
    jobs = embedded_shards(corpus_cfg, cfg, splits=splits, corpus=module)
    with ingest_lock(root):
        _recover(root)
        staged = {split: new_staging_dir(root, split) for split in splits}
        try:
            if cfg.workers > 1 and len(jobs) > 1:
                name = module.__name__
                with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                    futures = [pool.submit(_shard_job, (corpus_cfg, s, i, str(root), cfg, name, str(staged[s])))
                               for s, i in jobs]
                    for future in tqdm(as_completed(futures), total=len(futures), desc="embedded shards",
                                       unit="shard", disable=not cfg.progress):
                        future.result()
            else:
                for split, index in tqdm(jobs, desc="embedded shards", unit="shard", disable=not cfg.progress):
                    ingest_embedded_shard(corpus_cfg, split, index, root, cfg, corpus=module, split_dir=staged[split])
            noise = measure_written_noise(root, splits, corpus=module, split_dirs=staged)
            summary = _replace_splits(root, staged, noise)
        finally:  # unfinished staging, or (after an exchange) the previous splits
            for folder in staged.values():
                shutil.rmtree(folder, ignore_errors=True)
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
