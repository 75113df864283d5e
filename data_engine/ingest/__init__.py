"""Raw-pairs ingestion: any supported source -> canonical webdataset shards + manifest.

Sources: the embedded generator (``data_engine.corpus``), img2dataset tar folders (local or
any URL webdataset opens), COCO captions JSON + images, and CSV/parquet tables. Output, per
:mod:`ramflow_io.formats`: ``raw/{split}/{split}-{i:06d}.tar`` (``{key}.jpg/.txt/.json``),
``raw/manifest.parquet`` and ``raw/summary.json``. Bad items are skipped and counted by
reason (:data:`SKIP_REASONS`); ``seen == written + sum(skipped)`` per split and in total; a
cut input tar counts once as ``truncated_shard`` and is named in the summary. A re-ingested
split is staged and swapped in whole (:mod:`data_engine.ingest.swap`): a failed, crashed or
empty ingest leaves the previous split and manifest as they were.
"""

from data_engine.ingest.config import SKIP_REASONS, SOURCES, IngestConfig, IngestSummary, SplitCounts
from data_engine.ingest.images import EncodedImage, ImageRejected, normalize_image, sanitize_key
from data_engine.ingest.sources import RawPair, iter_coco, iter_img2dataset, iter_table
from data_engine.ingest.steps import (
    EmptyIngestError,
    clear_split,
    embedded_shards,
    ingest,
    ingest_coco,
    ingest_embedded,
    ingest_embedded_shard,
    ingest_img2dataset,
    ingest_pairs,
    ingest_table,
    measure_written_noise,
    merge_manifests,
    summary_path,
)
from data_engine.ingest.writer import write_pairs

__all__ = [
    "SKIP_REASONS", "SOURCES", "EmptyIngestError", "EncodedImage", "ImageRejected", "IngestConfig", "IngestSummary",
    "RawPair", "SplitCounts", "clear_split", "embedded_shards", "ingest", "ingest_coco",
    "ingest_embedded", "ingest_embedded_shard", "ingest_img2dataset", "ingest_pairs",
    "ingest_table", "iter_coco", "iter_img2dataset", "iter_table", "measure_written_noise",
    "merge_manifests", "normalize_image", "sanitize_key", "summary_path", "write_pairs",
]
