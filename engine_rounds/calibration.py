"""Calibration of the engine on a split with complete, correct labels (RAM's high-quality set).

The preliminary model's own thresholds are set for F1 on noisy parsed labels, so they say
little about how precise an added tag is, or how low a true tag may score. The ``finetune``
split's captions name everything in the image and nothing else, so its parsed labels are a
truth the engine may use: :func:`calibrate` scores those images with the engine's model and
sets, per class, the generation threshold (:func:`.tag_generation.precision_thresholds`) and the
keep threshold (:func:`.tag_generation.keep_thresholds`). With an adapted model
(:mod:`.adapt`) only the keys it never trained on calibrate.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ramflow_io.formats import labels_path, list_shards

from .streaming import Sample, iter_shard_samples, score_samples
from .tag_generation import keep_thresholds, precision_thresholds


if TYPE_CHECKING:
    from . import EngineConfig

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Images whose labels are complete and correct (the fine-tune split's parsed captions):
    they set the generation thresholds (:func:`.tag_generation.precision_thresholds`)."""

    samples: Iterable[Sample]
    labels: Mapping[str, Sequence[int]]
    skipped: Counter = field(default_factory=Counter)  # bad images, images without a label row
    exclude: frozenset[str] = frozenset()  # keys the engine's model trained on (adaptation, clean_mix)
    adapted_model: str | None = None       # that model's folder


def _wants_precision(cfg: EngineConfig) -> bool:
    """Generation thresholds are set for precision (else: class threshold + margin)."""
    return cfg.generation and cfg.generation_precision is not None


def calibrate(model, cfg: EngineConfig, thresholds: np.ndarray, names: Sequence[str],
              calibration: Calibration | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Generation thresholds ``[C]``, keep thresholds ``[C]`` (or None) and how they were set.

    Both come from the model's probabilities on the calibration split; without one, generation
    falls back to ``threshold + margin`` and nothing is flagged.
    """
    fallback = thresholds + cfg.margin  # [C]
    margin_rule = {"rule": "threshold+margin", "margin": cfg.margin}
    wants_precision = _wants_precision(cfg)
    if not wants_precision and cfg.keep_quantile is None:
        return fallback, None, margin_rule
    if calibration is None:
        log.warning("no calibration split: generation uses threshold + margin for every class, no label is flagged")
        return fallback, None, {**margin_rule, "calibration_images": 0}

    def labelled(samples: Iterable[Sample]) -> Iterable[Sample]:
        for s in samples:
            if s.key in calibration.exclude:
                calibration.skipped["trained_on"] += 1
            elif s.key in calibration.labels:
                yield s
            else:
                calibration.skipped["not_in_labels"] += 1

    keys, probs = score_samples(model, labelled(calibration.samples), cfg.batch_size, torch.device(cfg.device),
                                flip=cfg.tta_flip)
    if not keys:
        log.warning("no calibration image has a label row (%s): generation uses threshold + margin, no label "
                    "is flagged", dict(calibration.skipped))
        return fallback, None, {**margin_rule, "calibration_images": 0,
                                "calibration_skipped": dict(calibration.skipped)}
    labels = np.zeros(probs.shape, dtype=bool)  # [N, C]
    for row, key in enumerate(keys):
        ids = [int(i) for i in calibration.labels[key] if 0 <= int(i) < probs.shape[1]]
        labels[row, ids] = True
    info: dict[str, Any] = {"calibration_images": len(keys), "calibration_skipped": dict(calibration.skipped),
                            "adapted_model": calibration.adapted_model}
    add_at = fallback
    if wants_precision:
        add_at, calibrated = precision_thresholds(probs, labels, cfg.generation_precision, fallback,
                                                  cfg.calibration_min_positives, pooled=cfg.generation_pooled)
        info.update({
            "rule": "pooled precision" if cfg.generation_pooled else "precision",
            "target_precision": cfg.generation_precision,
            "classes_calibrated": int(calibrated.sum()), "classes_never_added": int(np.isinf(add_at).sum()),
            "thresholds": {names[c]: (None if np.isinf(add_at[c]) else round(float(add_at[c]), 4))
                           for c in np.flatnonzero(calibrated)},
        })
        log.info("generation thresholds for precision %.2f from %d calibration images: %d classes calibrated, "
                 "%d never added, the rest at threshold + %.2f", cfg.generation_precision, len(keys),
                 info["classes_calibrated"], info["classes_never_added"], cfg.margin)
    else:
        info.update(margin_rule)
    keep_at = None
    if cfg.keep_quantile is not None:
        keep_at = keep_thresholds(probs, labels, cfg.keep_quantile, cfg.calibration_min_positives)
        if cfg.keep_above_threshold:  # a label the model itself predicts is never flagged
            keep_at = np.minimum(keep_at, thresholds)
        info.update({"keep_quantile": cfg.keep_quantile, "keep_above_threshold": cfg.keep_above_threshold,
                     "classes_with_keep_threshold": int((keep_at > 0).sum())})
    return add_at, keep_at, info


def load_calibration(data_root: Path, cfg: EngineConfig) -> Calibration | None:
    """The calibration split's images and parsed labels, when generation asks for them and both exist."""
    if not (_wants_precision(cfg) or cfg.keep_quantile is not None or cfg.adapt_epochs):
        return None
    shards = list_shards(data_root, cfg.calibration_split)
    path = labels_path(data_root, cfg.calibration_split)
    if not shards or not path.exists():
        log.warning("calibration split %r has no shards or labels under %s", cfg.calibration_split, data_root)
        return None
    table = pd.read_parquet(path, columns=["key", "parse_label_ids"])
    labels = {k: [int(i) for i in ids] for k, ids in zip(table["key"], table["parse_label_ids"])}
    skipped: Counter = Counter()  # its own count: these are not the engine split's skips
    return Calibration(iter_shard_samples(shards, skipped), labels, skipped)
