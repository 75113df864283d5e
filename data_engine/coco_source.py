"""The ``coco`` corpus source: real COCO photos + captions split into the pipeline's splits.

Selected by a ``source:`` section in params (``kind: coco``; without the section the pipeline
generates the embedded corpus). The dataset is either a coco_dev-style JSON-lines file
(``image_path``, ``captions``, ``objects``) or an official captions JSON (``images`` +
``annotations``) with an optional instances JSON for the object labels. Relative paths are
resolved against the current directory (the repository root when run by ``make``/DVC/Dagster),
so a profile names data as ``../shared/data/coco_dev/...`` and never holds a machine path.

Splits: images sorted by ``sha1(str(image_id))``; the first ``test_fraction`` go to ``test``,
the next ``finetune_fraction`` to ``finetune``, the rest to ``pretrain``. Each sample keeps all
its captions (``{key}.json`` ``captions``; the first is the training caption) and, for
evaluation only, ``truth = {"tags": <COCO-80 objects>}``: the same field the embedded corpus
writes, so evaluation and the engine's label-quality report score against COCO-80 truth.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_engine.coco80 import read_instances, read_jsonl
from data_engine.ingest.images import clean_caption
from data_engine.ingest.sources import RawPair, read_coco_captions
from data_engine.ingest.steps import ingest_pairs
from ramflow_io.formats import TRUTH_FIELD

log = logging.getLogger(__name__)


class CocoSourceConfig(BaseModel):
    """``source:`` in params.yaml (kind ``coco``)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    kind: Literal["embedded", "coco"] = "embedded"
    path: Path | None = Field(None, description="JSON-lines dataset or official captions JSON")
    images: Path | None = Field(None, description="image folder of a captions JSON (default: its folder)")
    instances: Path | None = Field(None, description="official instances JSON (object labels), optional")
    test_fraction: float = Field(0.5, ge=0, lt=1)
    finetune_fraction: float = Field(0.1, ge=0, lt=1)
    max_images: int | None = Field(None, ge=1, description="first N images after the sha1 order (benchmarks)")

    @model_validator(mode="after")
    def _check(self) -> CocoSourceConfig:
        if self.kind == "coco" and self.path is None:
            raise ValueError("source.kind coco needs source.path")
        if self.test_fraction + self.finetune_fraction >= 1:
            raise ValueError("test_fraction + finetune_fraction must leave images for pretrain")
        return self


def source_config(params: dict[str, Any]) -> CocoSourceConfig:
    """The ``source:`` section of loaded params (embedded when absent)."""
    return CocoSourceConfig.model_validate(params.get("source") or {})


def read_rows(cfg: CocoSourceConfig) -> list[dict[str, Any]]:
    """Dataset rows ``{image_id, image_path, captions, objects}``, in split order (sha1 of the id)."""
    path = Path(cfg.path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    else:
        images, caps = read_coco_captions(path)
        images_dir = Path(cfg.images) if cfg.images is not None else path.parent
        objects = read_instances(cfg.instances) if cfg.instances is not None else {}
        rows = [{"image_id": img.get("id"), "file_name": img.get("file_name"),
                 "image_path": str(images_dir / img["file_name"]) if img.get("file_name") else None,
                 "captions": caps.get(img.get("id"), []), "objects": objects.get(img.get("id"), [])}
                for img in images]
    rows.sort(key=lambda r: hashlib.sha1(str(r["image_id"]).encode()).hexdigest())
    return rows[: cfg.max_images] if cfg.max_images else rows


def split_rows(rows: list[dict[str, Any]], cfg: CocoSourceConfig) -> dict[str, list[dict[str, Any]]]:
    """``{"pretrain", "finetune", "test"} -> rows`` (see the module docstring)."""
    n = len(rows)
    n_test = int(round(n * cfg.test_fraction))
    n_ft = int(round(n * cfg.finetune_fraction))
    return {"pretrain": rows[n_test + n_ft:], "finetune": rows[n_test:n_test + n_ft], "test": rows[:n_test]}


def iter_pairs(rows: list[dict[str, Any]]) -> Iterator[RawPair]:
    """Ingest items (``RawPair``) of ``rows``: first caption, all captions, COCO-80 truth."""
    for r in rows:
        captions = [c for c in (clean_caption(x) for x in r.get("captions") or []) if c]
        key = Path(r.get("file_name") or r.get("image_path") or str(r["image_id"])).stem
        if not r.get("image_path"):
            yield RawPair(key, skip="missing_image", detail="row without an image path")
            continue
        yield RawPair(key, caption=captions[0] if captions else None, image=Path(r["image_path"]),
                      meta={"captions": captions, TRUTH_FIELD: {"tags": sorted(r.get("objects") or [])},
                            "source_meta": {"image_id": r["image_id"]}})


def shard_counts(cfg: CocoSourceConfig, shard_size: int) -> dict[str, int]:
    """Shards each split will have (from the dataset's row count; the writer rolls every
    ``shard_size`` written samples, so skipped rows can only make fewer)."""
    parts = split_rows(read_rows(cfg), cfg)
    return {split: max(1, math.ceil(len(rows) / shard_size)) for split, rows in parts.items() if rows}


def ingest_coco_source(root: str | Path, cfg: CocoSourceConfig, ingest_cfg) -> Any:
    """Write every split of the dataset as shards under ``root/raw``; returns the merged summary."""
    summary = None
    for split, rows in split_rows(read_rows(cfg), cfg).items():
        if rows:  # each call swaps the split in and re-merges the manifest of all splits
            summary = ingest_pairs(iter_pairs(rows), root, split, "coco", ingest_cfg, total=len(rows))
            log.info("coco source -> %s: %d rows", split, len(rows))
    if summary is None:
        raise ValueError(f"{cfg.path}: no rows")
    return summary
