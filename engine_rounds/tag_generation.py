"""Tag generation (RAM step 3a): add tags the preliminary model is sure of.

Captions name only some of what an image shows. The preliminary model (trained on parsed
caption tags) tags every pretrain image; a tag it predicts with probability at least its
per-class threshold plus ``margin`` and that the caption lacks is added. Optionally the
generation (captioning) branch writes a caption for the image and the tags parsed from it are
added too. ``parse_label_ids`` stay as parsed: in RAM the tagging head trains on the union and
the captioning head on the parsed tags.

How sure is sure enough? The per-class thresholds of the preliminary model are set for F1 on
noisy parsed labels, so "threshold + margin" says little about the precision of what gets
added. :func:`precision_thresholds` sets each class's generation threshold instead on a split
whose labels are complete and correct (the fine-tune split: RAM's small high-quality set): the
lowest probability at which the model's predictions there are still at least ``target``
precise. Classes with too few positives there keep ``threshold + margin``.

The same split also says how low the model scores a tag that IS there:
:func:`keep_thresholds` takes, per class, a low quantile of its probabilities on the images
that have it. A label (parsed or added) the image scores below that is flagged ``low_score``;
cleaning may remove it. This is the whole-image version of "the model scores the tag's region
below threshold" (for a scene the whole image is the region), and it catches the tags a
caption names but the image lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GeneratedLabels:
    """Labels of one image after generation (ids are label-system ids, sorted)."""

    parsed: list[int]
    union: list[int]
    by_tagging: list[int] = field(default_factory=list)   # added by confident tagging
    by_caption: list[int] = field(default_factory=list)   # added by the captioning branch
    low_score: list[int] = field(default_factory=list)    # union tags scored below their keep threshold

    @property
    def added(self) -> list[int]:
        return sorted(set(self.union) - set(self.parsed))


def confident_tags(probs: np.ndarray, thresholds: np.ndarray, margin: float) -> list[list[int]]:
    """Per image, the class ids with ``prob >= threshold + margin``.

    ``probs``: ``[B, C]`` sigmoid probabilities; ``thresholds``: ``[C]``.
    """
    probs = np.asarray(probs, dtype=np.float32)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if probs.ndim != 2 or thresholds.shape != (probs.shape[1],):
        raise ValueError(f"probs {probs.shape} and thresholds {thresholds.shape} do not match")
    sure = probs >= (thresholds + margin)[None, :]  # [B, C]
    return [np.flatnonzero(row).tolist() for row in sure]


def _deepest_precise(probs: np.ndarray, labels: np.ndarray, target: float) -> float:
    """Lowest probability whose prefix (predictions sorted by probability, ``[N]``) is still at
    least ``target`` precise; ``inf`` when no prefix is."""
    order = np.argsort(-probs, kind="stable")
    hits = np.cumsum(labels[order])                      # [N] true positives in the prefix
    precision = hits / np.arange(1, len(order) + 1)      # [N]
    ok = np.flatnonzero(precision >= target)
    return float(probs[order[ok[-1]]]) if len(ok) else np.inf


def precision_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    target: float,
    fallback: np.ndarray,
    min_positives: int = 5,
    pooled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds at which predictions on a clean split reach ``target`` precision.

    ``probs``: ``[N, C]`` model probabilities on the calibration images; ``labels``: ``[N, C]``
    their complete labels (bool); ``fallback``: ``[C]`` thresholds for classes with fewer than
    ``min_positives`` positives. For a class, the images are sorted by probability; the
    threshold is the probability of the deepest image at which the running precision is still
    ``>= target`` (so that prefix holds as many true positives as the target allows). A class
    whose running precision never reaches ``target`` gets ``inf``: the model never adds it.

    ``pooled``: one threshold for all calibrated classes instead, the deepest prefix of their
    pooled predictions that is ``target`` precise. The goal is precision over all labels, and
    a per-class target spends it badly: every class must stop where its own running precision
    falls to the target, so a class with a few confident errors among its top scores adds
    almost nothing, and a class whose errors are rare stops early anyway. One threshold adds
    every tag down to the same probability, which gives the most tags for the pooled precision
    when probabilities mean the same thing across classes (on the embedded corpus the adapted
    model's probabilities, binned, match the truth's frequency on the pretrain split within
    0.05 per bin), and it is set from all the calibration positives rather than a class's
    handful.

    Returns ``(thresholds [C], calibrated [C] bool)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels) > 0
    if probs.shape != labels.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be the same [N, C]")
    out = np.asarray(fallback, dtype=np.float64).copy()
    calibrated = labels.sum(0) >= max(min_positives, 1)  # [C]
    if pooled and calibrated.any():
        out[calibrated] = _deepest_precise(probs[:, calibrated].ravel(), labels[:, calibrated].ravel(), target)
        return out, calibrated
    for c in np.flatnonzero(calibrated):
        out[c] = _deepest_precise(probs[:, c], labels[:, c], target)
    return out, calibrated


def keep_thresholds(probs: np.ndarray, labels: np.ndarray, quantile: float, min_positives: int = 5) -> np.ndarray:
    """Per class, the ``quantile`` of the probabilities of the calibration images that have it.

    ``probs``, ``labels``: ``[N, C]``. About ``quantile`` of a class's true labels score below its
    threshold. Classes with fewer than ``min_positives`` positives get 0 (never flagged).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels) > 0
    out = np.zeros(probs.shape[1], dtype=np.float64)
    for c in np.flatnonzero(labels.sum(0) >= max(min_positives, 1)):
        out[c] = float(np.quantile(probs[labels[:, c], c], quantile))
    return out


def generate_labels(
    parsed: Sequence[Sequence[int]],
    probs: np.ndarray | None,
    thresholds: np.ndarray | None,
    margin: float,
    caption_ids: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
) -> list[GeneratedLabels]:
    """Union of parsed tags, confident model tags (if ``probs``) and caption-branch tags.

    Ids outside ``[0, num_classes)`` from the caption branch (tags the model cannot score)
    are dropped so the union stays inside the model's tag set.
    """
    confident = (
        confident_tags(probs, thresholds, margin) if probs is not None else [[] for _ in parsed]
    )
    captions = caption_ids if caption_ids is not None else [[] for _ in parsed]
    if not (len(parsed) == len(confident) == len(captions)):
        raise ValueError("parsed, probs and caption_ids must have one entry per image")
    out = []
    for p, conf, cap in zip(parsed, confident, captions):
        base = set(int(i) for i in p)
        cap_set = {int(i) for i in cap if num_classes is None or 0 <= int(i) < num_classes}
        by_tag = set(conf) - base
        by_cap = cap_set - base - by_tag
        out.append(GeneratedLabels(
            parsed=sorted(base),
            union=sorted(base | by_tag | by_cap),
            by_tagging=sorted(by_tag),
            by_caption=sorted(by_cap),
        ))
    return out


def flag_low_scores(labels: Sequence[GeneratedLabels], probs: np.ndarray, keep_at: np.ndarray) -> None:
    """Set each image's ``low_score``: its union tags with ``probs[i, t] < keep_at[t]``.

    ``probs``: ``[B, C]`` for the ``B`` images of ``labels``; ``keep_at``: ``[C]``.
    """
    for row, g in enumerate(labels):
        g.low_score = [t for t in g.union if probs[row, t] < keep_at[t]]


def caption_parser(
    parse_tags: Callable[[list[str]], list[list[str]]],
    to_ids: Callable[[list[str]], list[int]],
) -> Callable[[list[str]], list[list[int]]]:
    """Compose "captions -> tag strings" and "tag strings -> label ids" into one function."""

    def parse(captions: list[str]) -> list[list[int]]:
        return [sorted(set(to_ids(tags))) for tags in parse_tags(list(captions))]

    return parse
