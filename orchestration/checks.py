"""Quality gates of the pipeline as plain functions over the files a stage wrote.

Dagster runs them as blocking asset checks; ``ramflow stage NAME`` runs the same functions
after the stage and exits non-zero on a failure, so a bad result stops ``dvc repro`` too.
Thresholds come from the ``checks:`` section of params.yaml (:class:`ChecksConfig`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ramflow_io.formats import SPLITS, label_system_dir, parsed_path
from ramflow_io.params import stage_config

from .pipeline import report_path


class ChecksConfig(BaseModel):
    """``checks:`` in params.yaml: thresholds of the blocking quality gates."""

    model_config = ConfigDict(extra="forbid")

    min_parse_coverage: float = Field(
        0.9, ge=0.0, le=1.0, description="fraction of parsed captions with at least one tag"
    )
    min_label_system_size: int = Field(10, ge=1, description="fewest tags a usable label system has")
    max_label_system_size: int = Field(20000, ge=1, description="more tags means the parser let junk in")


def checks_config(params_path: str | os.PathLike | None = None) -> ChecksConfig:
    return stage_config(ChecksConfig, "checks", params_path)


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_coverage(root: str | Path, cfg: ChecksConfig) -> CheckOutcome:
    """Fraction of parsed captions (all splits on disk) with at least one tag."""
    import pyarrow.parquet as pq  # lazy: pyarrow; settings imports checks and loads light

    rows = tagged = 0
    per_split: dict[str, float] = {}
    for split in SPLITS:
        path = parsed_path(root, split)
        if not path.exists():
            continue
        tags = pq.read_table(path, columns=["tags"]).column("tags").to_pylist()
        n_tagged = sum(1 for t in tags if t)
        per_split[split] = n_tagged / len(tags) if tags else 0.0
        rows += len(tags)
        tagged += n_tagged
    coverage = tagged / rows if rows else 0.0
    passed = rows > 0 and coverage >= cfg.min_parse_coverage
    desc = (f"{tagged}/{rows} captions have >= 1 tag ({coverage:.3f}; need >= {cfg.min_parse_coverage})"
            if rows else "no parsed captions on disk")
    return CheckOutcome("parse_coverage", passed, desc,
                        {"coverage": coverage, "captions": rows, "tagged": tagged,
                         **{f"coverage_{s}": v for s, v in per_split.items()}})


def label_system_size(root: str | Path, cfg: ChecksConfig) -> CheckOutcome:
    """Number of tags in ``label_system/label_system.json`` within the configured bounds."""
    path = label_system_dir(root) / "label_system.json"
    if not path.exists():
        return CheckOutcome("label_system_size", False, f"{path} is missing")
    data = json.loads(path.read_text(encoding="utf-8"))
    tags = data.get("labels") if isinstance(data, dict) else data
    n = len(tags) if tags is not None else 0
    lo, hi = cfg.min_label_system_size, cfg.max_label_system_size
    passed = lo <= n <= hi
    return CheckOutcome("label_system_size", passed, f"{n} tags (bounds [{lo}, {hi}])",
                        {"tags": n, "min": lo, "max": hi})


def evaluation_sane(root: str | Path) -> CheckOutcome:
    """The evaluation ran on test images and produced a finite mAP for the fine-tuned model."""
    path = report_path(root, "evaluation_report")
    if not path.exists():
        return CheckOutcome("evaluation_sane", False, f"{path} is missing")
    report = json.loads(path.read_text(encoding="utf-8"))
    value = report.get("metrics", {}).get("mAP")
    images = int(report.get("metrics", {}).get("images", 0))
    ok = isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0 and images > 0
    return CheckOutcome("evaluation_sane", ok, f"fine-tuned mAP={value} on {images} test images",
                        {"mAP": float(value) if isinstance(value, (int, float)) else float("nan"),
                         "images": images})


def not_worse_than_champion(root: str | Path) -> CheckOutcome:
    """The registry gate's decision: the new version became champion (or there was none)."""
    path = report_path(root, "registered_model")
    if not path.exists():
        return CheckOutcome("not_worse_than_champion", False, f"{path} is missing")
    decision = json.loads(path.read_text(encoding="utf-8")).get("decision", {})
    passed = bool(decision.get("promoted"))
    return CheckOutcome("not_worse_than_champion", passed,
                        f"v{decision.get('version')}: {decision.get('reason')}",
                        {k: decision.get(k) for k in ("version", "challenger_value", "champion_value",
                                                       "champion_version", "tolerance")})


def run_checks(stage: str, root: str | Path, params_path: str | os.PathLike | None = None) -> list[CheckOutcome]:
    """The blocking checks of one stage (empty for stages without one)."""
    cfg = checks_config(params_path)
    if stage == "parsed_tags":
        return [parse_coverage(root, cfg)]
    if stage == "label_system":
        return [label_system_size(root, cfg)]
    if stage == "evaluation_report":
        return [evaluation_sane(root)]
    if stage == "registered_model":
        return [not_worse_than_champion(root)]
    return []


CHECKED_STAGES: dict[str, tuple[str, ...]] = {
    "parsed_tags": ("parse_coverage",),
    "label_system": ("label_system_size",),
    "evaluation_report": ("evaluation_sane",),
    "registered_model": ("not_worse_than_champion",),
}
