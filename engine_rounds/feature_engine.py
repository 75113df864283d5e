"""Data engine for few real photos: out-of-fold tag generation on cached features.

RAM's data engine adds the tags a caption leaves out by tagging the training images with a
model trained on them. On a few hundred photos a model scores its own training images far too
confidently, so here every training image is scored by a model trained on the *other* folds
(k-fold, cached backbone tokens: each fold costs only a decoder fit).

Which scores become labels: there is no clean split to calibrate on, so the threshold is set
against the parsed caption labels themselves. Among all (image, tag) pairs ranked by their
out-of-fold score, the threshold is the lowest score at which the fraction of pairs the
captions already name stays >= ``parsed_precision``. Captions name only part of what a photo
shows, so this fraction under-states the true precision of the pairs above the threshold; the
unnamed pairs above it are added. With ``per_class`` each tag gets its own threshold from its own
pairs (frequent tags such as "person" score high everywhere and would otherwise take most of a
pooled threshold's additions). Nothing here reads true labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ram_model.feature_head import kfold_indices

log = logging.getLogger(__name__)


class FeatureEngineConfig(BaseModel):
    """The generation rule (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    folds: int = Field(5, ge=2, description="k of the out-of-fold scoring")
    parsed_precision: float = Field(0.6, gt=0, le=1,
                                    description="fraction of pairs above the threshold the captions must name")
    min_score: float = Field(0.3, ge=0, le=1, description="never add a tag scored below this")
    per_class: bool = Field(False, description="one threshold per tag (each tag's pairs ranked on their own) "
                                               "instead of one over all pairs")
    min_parsed: int = Field(3, ge=1, description="per_class: tags the captions name on fewer training images "
                                                 "get no additions (too few pairs to calibrate)")
    generated_weight: float = Field(1.0, ge=0, le=1, description="loss weight of an added label when retraining")
    seed: int = 0


def out_of_fold_scores(fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, folds: int,
                       seed: int = 0) -> np.ndarray:
    """``[n, C]`` scores where row i comes from ``fit_score(train_idx, score_idx)`` of the fold
    that left image i out. ``fit_score`` trains on ``train_idx`` and returns scores of ``score_idx``."""
    parts = kfold_indices(n, folds, seed)
    out: np.ndarray | None = None
    for k, held in enumerate(parts):
        train = np.sort(np.concatenate([p for j, p in enumerate(parts) if j != k]))
        scores = np.asarray(fit_score(train, held), dtype=np.float32)
        if out is None:
            out = np.zeros((n, scores.shape[1]), dtype=np.float32)
        out[held] = scores
        log.info("out-of-fold scores: fold %d/%d done (%d images)", k + 1, folds, len(held))
    assert out is not None
    return out


def generation_threshold(scores: np.ndarray, parsed: np.ndarray, parsed_precision: float,
                         min_score: float = 0.0) -> float:
    """Lowest score ``t >= min_score`` with ``mean(parsed | score >= t) >= parsed_precision``
    over all (image, tag) pairs; ``inf`` when no threshold qualifies."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = (np.asarray(parsed) > 0.5).ravel()
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    prec = np.cumsum(y) / np.arange(1, len(y) + 1)
    ok = (prec >= parsed_precision) & (s >= min_score)
    # a threshold must not split ties: only the last position of each run of equal scores counts
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    ok &= last_of_tie
    if not ok.any():
        return float("inf")
    return float(s[np.flatnonzero(ok)[-1]])


def generate_labels(scores: np.ndarray, parsed: np.ndarray, cfg: FeatureEngineConfig) -> tuple[np.ndarray, dict]:
    """Parsed labels plus the generated ones: ``[N, C]`` multi-hot and a summary."""
    parsed = (np.asarray(parsed) > 0.5).astype(np.float32)
    scores = np.asarray(scores)
    if cfg.per_class:
        # [C]: each tag's own threshold; a tag named on too few images gets none (inf)
        thr_c = np.array([generation_threshold(scores[:, k], parsed[:, k], cfg.parsed_precision, cfg.min_score)
                          if parsed[:, k].sum() >= cfg.min_parsed else float("inf")
                          for k in range(parsed.shape[1])])
        added = (scores >= thr_c[None, :]) & (parsed < 0.5)
        finite = thr_c[np.isfinite(thr_c)]
        thr = float(np.median(finite)) if len(finite) else float("inf")
    else:
        thr = generation_threshold(scores, parsed, cfg.parsed_precision, cfg.min_score)
        added = (scores >= thr) & (parsed < 0.5)
    labels = np.maximum(parsed, added.astype(np.float32))
    summary = {"threshold": thr, "added": int(added.sum()), "parsed": int(parsed.sum()),
               "labels": int(labels.sum()), "images_with_additions": int(added.any(1).sum())}
    return labels, summary


def label_weights(parsed: np.ndarray, labels: np.ndarray, generated_weight: float) -> np.ndarray:
    """Loss weight per entry: 1 everywhere except ``generated_weight`` on added labels."""
    w = np.ones_like(labels, dtype=np.float32)
    w[(labels > 0.5) & (np.asarray(parsed) < 0.5)] = generated_weight
    return w


def label_quality(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Micro precision / recall of a label matrix against true labels (evaluation only)."""
    pred, true = np.asarray(labels) > 0.5, np.asarray(truth) > 0.5
    tp = float((pred & true).sum())
    return {"precision": tp / max(float(pred.sum()), 1.0), "recall": tp / max(float(true.sum()), 1.0),
            "labels_per_image": float(pred.sum(1).mean()) if len(pred) else 0.0}
