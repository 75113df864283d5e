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
import json
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


LABEL_SYSTEM_JSON = "label_system.json"


def read_label_system_json(path: str | Path) -> dict:
    """The payload of a saved ``label_system.json`` (``version, default_threshold, labels``; each
    label a dict ``id, name, category, synonyms, threshold, source, freq``), with the ids checked
    to be ``0..n-1`` in order. ``path`` is the file or the folder holding it. The builder
    (``data_engine.label_system``) writes this file; training reads tag names from it here, so
    the model side needs no import of the data engine."""
    path = Path(path)
    if path.is_dir():
        path = path / LABEL_SYSTEM_JSON
    if not path.exists():
        raise FileNotFoundError(f"no label system at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if [lab["id"] for lab in data["labels"]] != list(range(len(data["labels"]))):
        raise ValueError(f"{path}: label ids must be 0..n-1 in order")
    return data


def label_names(path: str | Path) -> list[str]:
    """Tag names in id order (the model's output order) of a saved label system."""
    return [lab["name"] for lab in read_label_system_json(path)["labels"]]


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
