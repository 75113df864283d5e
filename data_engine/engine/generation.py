"""Tag generation (RAM step 3a): add tags the preliminary model is sure of.

Captions name only some of what an image shows. The preliminary model (trained on parsed
caption tags) tags every pretrain image; a tag it predicts with probability at least its
per-class threshold plus ``margin`` and that the caption lacks is added. Optionally the
generation (captioning) branch writes a caption for the image and the tags parsed from it are
added too. ``parse_label_ids`` stay as parsed: in RAM the tagging head trains on the union and
the captioning head on the parsed tags.
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


def caption_parser(
    parse_tags: Callable[[list[str]], list[list[str]]],
    to_ids: Callable[[list[str]], list[int]],
) -> Callable[[list[str]], list[list[int]]]:
    """Compose "captions -> tag strings" and "tag strings -> label ids" into one function."""

    def parse(captions: list[str]) -> list[list[int]]:
        return [sorted(set(to_ids(tags))) for tags in parse_tags(list(captions))]

    return parse
