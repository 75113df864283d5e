"""Check, normalise and write a stream of :class:`RawPair` into shards of one split.

Each written shard ``raw/{split}/{split}-{i:06d}.tar`` gets a manifest part
``raw/{split}/parts/{split}-{i:06d}.parquet`` (its manifest rows) and ``.json`` (its counts:
seen, written, skipped by reason, truncated input shards). The part JSON is written last, so
it marks a finished shard; :func:`data_engine.ingest.steps.merge_manifests` joins the parts
into ``raw/manifest.parquet`` and ``raw/summary.json``. Items skipped while a shard is being
filled are counted in that shard's part; skips after the last written sample go to the last
shard. A split's shards and parts live in one folder, so a whole split can be written
elsewhere (``split_dir``, a staging folder) and swapped in with one rename.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from data_engine.ingest.config import IngestConfig, SplitCounts
from data_engine.ingest.images import EncodedImage, ImageRejected, clean_caption, normalize_image, sanitize_key
from data_engine.ingest.sources import RawPair
from ramflow_io.formats import MANIFEST_COLUMNS, raw_dir, shard_path
from ramflow_io.shards import ShardWriter

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("source", pa.string()),
    ]
)
assert tuple(MANIFEST_SCHEMA.names) == MANIFEST_COLUMNS


PARTS = "parts"
LEGACY_PARTS_DIR = ("raw", "parts")  # where parts lived before they moved into the split folder


def parts_dir(split_dir: str | Path) -> Path:
    """The manifest parts of one split folder (``raw/{split}`` or its staging folder)."""
    return Path(split_dir) / PARTS


class PartPaths(NamedTuple):
    """The two files of one shard's manifest part."""

    rows: Path      # {split}-{index:06d}.parquet: one row per sample
    counts: Path    # {split}-{index:06d}.json: the shard's seen / written / skipped counts


def dir_part_paths(split_dir: str | Path, split: str, index: int) -> PartPaths:
    """The manifest part files of one shard inside ``split_dir``."""
    stem = parts_dir(split_dir) / f"{split}-{index:06d}"
    return PartPaths(stem.with_suffix(".parquet"), stem.with_suffix(".json"))


def part_paths(root: str | Path, split: str, index: int) -> PartPaths:
    """The manifest part files of one shard under ``root``."""
    return dir_part_paths(raw_dir(root, split), split, index)


def _json_ready(value: Any) -> Any:
    """Make numpy scalars/arrays, paths and tuples JSON-serialisable (generator truth, tar json)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy array or scalar
        return value.tolist()
    return value


@dataclass
class _Result:
    key: str
    caption: str
    meta: dict[str, Any]
    encoded: EncodedImage | None
    reason: str | None


def _process(pair: RawPair, *, max_side: int, max_pixels: int, jpeg_quality: int) -> _Result:
    """Decode + re-encode one pre-checked pair (runs in a worker process when workers > 1)."""
    if pair.skip is not None:
        return _Result(pair.key, "", {}, None, pair.skip)
    image = pair.image
    if isinstance(image, Path):
        try:
            image = image.read_bytes()
        except OSError as err:
            log.debug("skip %s: missing_image (%s)", pair.key, err)
            return _Result(pair.key, "", {}, None, "missing_image")
    try:
        encoded = normalize_image(image, max_side=max_side, max_pixels=max_pixels, jpeg_quality=jpeg_quality)
    except ImageRejected as err:
        log.debug("skip %s: %s", pair.key, err)
        return _Result(pair.key, "", {}, None, err.reason)
    return _Result(pair.key, pair.caption, pair.meta, encoded, None)


def _precheck(pairs: Iterable[RawPair]) -> Iterator[RawPair]:
    """Key, duplicate and caption checks (cheap, in order); sets ``skip`` on bad pairs.

    A key is taken by its first occurrence whatever happens to it later, so a repeated key is
    always ``duplicate_key`` (the result does not depend on which copy decodes).
    """
    taken: set[str] = set()
    for pair in pairs:
        if pair.skip is None:
            key = sanitize_key(pair.key)
            caption = clean_caption(pair.caption)
            if not key:
                pair.skip = "invalid_key"
            elif key in taken:
                pair.skip = "duplicate_key"
            else:
                taken.add(key)
                if caption is None:
                    pair.skip = "missing_caption"
                elif not caption:
                    pair.skip = "empty_caption"
            pair.key, pair.caption = key, caption
        if pair.skip is not None:
            log.debug("skip %r: %s %s", pair.key, pair.skip, pair.detail)
            pair.image = None  # nothing to decode; keeps inter-process traffic small
        yield pair


class _ShardRoller:
    """Writes results into consecutive shards of one split, with one manifest part per shard."""

    def __init__(
        self, root: Path, split: str, source: str, shard_size: int | None, first_index: int, split_dir: Path,
    ) -> None:
        self.root, self.split, self.source, self.split_dir = root, split, source, split_dir
        self.shard_size, self.index = shard_size, first_index
        self.total = SplitCounts()
        self.truncated: list[str] = []  # input shards that ended early (all of this run)
        self._writer: ShardWriter | None = None
        self._rows: list[dict[str, Any]] = []
        self._skipped: Counter[str] = Counter()
        self._truncated: list[str] = []  # of the open shard
        self._seen = 0
        self._last_part: tuple[Path, dict[str, Any]] | None = None
        parts_dir(split_dir).mkdir(parents=True, exist_ok=True)

    def _shard_file(self) -> Path:
        return self.split_dir / shard_path(self.root, self.split, self.index).name

    def skip(self, reason: str, key: str) -> None:
        self._seen += 1
        self._skipped[reason] += 1
        if reason == "truncated_shard":  # the key of such an item is the input shard's URL
            self._truncated.append(key)

    def write(self, result: _Result) -> None:
        assert result.encoded is not None
        if self._writer is None:
            self._writer = ShardWriter(self._shard_file())
        enc = result.encoded
        meta = _json_ready(result.meta)
        meta.update(
            key=result.key, split=self.split, source=self.source,
            width=enc.width, height=enc.height, sha256=enc.sha256,
        )
        self._writer.write(result.key, enc.jpeg, result.caption, meta)
        self._rows.append(
            dict(
                key=result.key, split=self.split,
                shard=shard_path(self.root, self.split, self.index).relative_to(self.root).as_posix(),
                caption=result.caption, width=enc.width, height=enc.height,
                sha256=enc.sha256, source=self.source,
            )
        )
        self._seen += 1
        if self.shard_size is not None and len(self._rows) >= self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:  # a shard that only saw skipped items still exists, empty
            self._writer = ShardWriter(self._shard_file())
        self._writer.close()
        rows_path, counts_path = dir_part_paths(self.split_dir, self.split, self.index)
        pq.write_table(pa.Table.from_pylist(self._rows, schema=MANIFEST_SCHEMA), rows_path)
        counts = SplitCounts(
            seen=self._seen, written=len(self._rows), skipped=dict(sorted(self._skipped.items())), shards=1
        )
        record = {"split": self.split, "shard": self.index, "source": self.source,
                  "truncated_shards": self._truncated, **counts.model_dump()}
        counts_path.write_text(json.dumps(record, indent=1, sort_keys=True))
        self.total = self.total.add(counts)
        self.truncated += self._truncated
        self._last_part = (counts_path, record)
        self._writer, self._rows, self._skipped, self._truncated, self._seen = None, [], Counter(), [], 0
        self.index += 1

    def finish(self) -> SplitCounts:
        """Close the open shard. Trailing skips join the last shard's part (no empty tail shard)."""
        if self._rows or self._last_part is None:
            self._close_shard()
        elif self._seen:
            counts_path, record = self._last_part
            skipped = Counter(record["skipped"])
            skipped.update(self._skipped)
            record.update(seen=record["seen"] + self._seen, skipped=dict(sorted(skipped.items())),
                          truncated_shards=record["truncated_shards"] + self._truncated)
            counts_path.write_text(json.dumps(record, indent=1, sort_keys=True))
            self.total = self.total.add(SplitCounts(seen=self._seen, skipped=dict(self._skipped)))
            self.truncated += self._truncated
            self._seen, self._skipped, self._truncated = 0, Counter(), []
        return self.total


def write_pairs(
    pairs: Iterable[RawPair],
    root: str | Path,
    split: str,
    source: str,
    cfg: IngestConfig,
    *,
    shard_index: int | None = None,
    workers: int | None = None,
    total: int | None = None,
    desc: str | None = None,
    split_dir: str | Path | None = None,
) -> SplitCounts:
    """Check, normalise and write ``pairs`` into ``raw/{split}/`` shards; return the counts.

    ``shard_index=None``: consecutive shards of ``cfg.shard_size`` from index 0 (into an empty
    folder: the caller stages a whole split). ``shard_index=i``: every sample goes into shard
    ``i`` (shard-granular work: the caller chose which items make up the shard).
    ``split_dir``: write the shards and parts there instead of ``raw/{split}`` (a staging
    folder that is renamed into place); the manifest rows still name ``raw/{split}/...``.
    """
    root = Path(root)
    roller = _ShardRoller(
        root, split, source,
        shard_size=cfg.shard_size if shard_index is None else None,
        first_index=shard_index or 0,
        split_dir=Path(split_dir) if split_dir is not None else raw_dir(root, split),
    )
    work = partial(_process, max_side=cfg.max_side, max_pixels=cfg.max_pixels, jpeg_quality=cfg.jpeg_quality)
    workers = cfg.workers if workers is None else workers
    checked = _precheck(pairs)
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(work, checked, chunksize=8) if pool is not None else map(work, checked)
        bar = tqdm(results, total=total, desc=desc or f"ingest {source} -> {split}",
                   unit="item", disable=not cfg.progress, leave=False)
        for result in bar:
            if result.reason is None:
                roller.write(result)
            else:
                roller.skip(result.reason, result.key)
    except BaseException:
        if roller._writer is not None:
            roller._writer.close(commit=False)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    counts = roller.finish()
    if not counts.counts_add_up:  # an internal error, never expected
        raise RuntimeError(f"{split}: counts do not add up: {counts}")
    return counts
