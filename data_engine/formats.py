"""The on-disk contract every stage shares.

Layout below one data root (``paths.data_root`` in params.yaml)::

    raw/{split}/{split}-{i:06d}.tar   webdataset shards: {key}.jpg, {key}.txt, {key}.json
    raw/manifest.parquet              key, split, shard, caption, width, height, sha256, source
    raw/summary.json                  counts per split and skipped-by-reason
    parsed/{split}.parquet            key, caption, tags (list[str])
    label_system/label_system.json    the unified label system (+ RAM-format txt exports)
    labels/{split}.parquet            key, parse_label_ids (list[int])
    engine/{split}.parquet            key, parse_label_ids, union_label_ids
    models/{stage}/                   checkpoints, thresholds, config of each trained model

``{key}.json`` holds per-sample metadata: ``key, split, source, width, height, sha256`` and,
for the embedded corpus only, ``truth`` (see :data:`TRUTH_FIELD`). Only evaluation code may
read ``truth``: training and the data engine see images and captions, as with web data.
Keys are unique across splits and never contain ``.`` (webdataset splits extensions on it).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

SPLITS: tuple[str, ...] = ("pretrain", "finetune", "test")
TRUTH_FIELD = "truth"
"""``truth = {"tags": [...], "mentioned": [...], "scene": str, "objects": [{"name", "color", "box"}]}``.

``tags``: canonical tag names present in the image (objects, scene, colours of objects).
``mentioned``: canonical tag names the caption really mentions (a hallucinated object counts).
``objects[i].box``: ``[x0, y0, x1, y1]`` in pixels of the stored image.
"""

MANIFEST_COLUMNS: tuple[str, ...] = (
    "key", "split", "shard", "caption", "width", "height", "sha256", "source",
)


def raw_dir(root: str | Path, split: str | None = None) -> Path:
    path = Path(root) / "raw"
    return path / split if split else path


def shard_path(root: str | Path, split: str, index: int) -> Path:
    return raw_dir(root, split) / f"{split}-{index:06d}.tar"


def list_shards(root: str | Path, split: str) -> list[Path]:
    """Shards of one split in index order (empty when the split was not ingested)."""
    return sorted(raw_dir(root, split).glob(f"{split}-*.tar"))


def manifest_path(root: str | Path) -> Path:
    return raw_dir(root) / "manifest.parquet"


def parsed_path(root: str | Path, split: str) -> Path:
    return Path(root) / "parsed" / f"{split}.parquet"


def label_system_dir(root: str | Path) -> Path:
    return Path(root) / "label_system"


def labels_path(root: str | Path, split: str) -> Path:
    return Path(root) / "labels" / f"{split}.parquet"


def engine_labels_path(root: str | Path, split: str, round_dir: str = "engine") -> Path:
    """Labels of ``split`` after an engine round (``engine``: the first, ``engine_refined``: the second)."""
    return Path(root) / round_dir / f"{split}.parquet"


def model_dir(root: str | Path, stage: str) -> Path:
    return Path(root) / "models" / stage


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder): one writer at a time
    across processes, e.g. per-partition runs merging into one manifest. Not re-entrant."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
