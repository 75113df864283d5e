"""Tag cleaning (RAM step 3b): drop tags whose image region does not look like the tag.

For every (image, tag) pair the engine finds the tag's region (:mod:`.regions`), embeds the
crop with the image encoder and re-scores the crop for that tag. This module keeps those
per-pair results compactly (:class:`CropStore`) and decides which pairs to remove
(:func:`clean_tags`):

* per tag, the crop embeddings (L2-normalised) are clustered with k-means; a correct tag's
  crops show the same kind of object and sit near a centroid, a wrong tag's crop shows
  whatever the attention landed on and sits far from all of them. The farthest
  ``outlier_fraction`` of the tag's pairs are candidates; a candidate is removed when its
  distance is also a robust outlier (``> median + outlier_z * 1.4826 * MAD`` of the tag's
  distances; ``outlier_z = 0`` removes every candidate, i.e. a pure "farthest fraction" rule);
* a pair whose crop the model scores below ``rescore_scale * threshold[tag]`` is removed: the
  model itself does not see the tag in the region it attended to.

Only tags with at least ``min_count`` pairs are cleaned (k-means on a handful of crops says
nothing); the others are kept as they are and reported as not cleaned.

Memory bound: the store keeps, per (image, tag) pair, one float16 embedding (``2 * D`` bytes),
a box (4 float32), the crop probability (float32) and two int32 indices: about
``P * (2 * D + 28)`` bytes for ``P`` pairs (e.g. 100k images x 6 tags x D=256: ~320 MB).
Images and crops are never kept past their batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans

log = logging.getLogger(__name__)


class CropStore:
    """Append-only store of per-(image, tag) region results, filled batch by batch."""

    def __init__(self) -> None:
        self._image: list[np.ndarray] = []   # [n] int32 image row index
        self._tag: list[np.ndarray] = []     # [n] int32 tag id
        self._emb: list[np.ndarray] = []     # [n, D] float16 crop embedding
        self._prob: list[np.ndarray] = []    # [n] float32 crop probability for the tag
        self._box: list[np.ndarray] = []     # [n, 4] float32 pixel box
        self._frozen: dict[str, np.ndarray] | None = None

    def add(self, image_idx, tag_ids, embeddings, crop_probs, boxes) -> None:
        if self._frozen is not None:
            raise RuntimeError("CropStore is frozen; add() after arrays() is not allowed")
        n = len(tag_ids)
        emb = np.asarray(embeddings, dtype=np.float16).reshape(n, -1)
        self._image.append(np.asarray(image_idx, dtype=np.int32).reshape(n))
        self._tag.append(np.asarray(tag_ids, dtype=np.int32).reshape(n))
        self._emb.append(emb)
        self._prob.append(np.asarray(crop_probs, dtype=np.float32).reshape(n))
        self._box.append(np.asarray(boxes, dtype=np.float32).reshape(n, 4))

    def __len__(self) -> int:
        return sum(len(a) for a in self._tag) if self._frozen is None else len(self._frozen["tag"])

    def nbytes(self) -> int:
        parts = self._frozen.values() if self._frozen is not None else (
            a for lst in (self._image, self._tag, self._emb, self._prob, self._box) for a in lst)
        return int(sum(a.nbytes for a in parts))

    def arrays(self) -> dict[str, np.ndarray]:
        """Concatenate the batches once (freezes the store)."""
        if self._frozen is None:
            dim = self._emb[0].shape[1] if self._emb else 0
            self._frozen = {
                "image": np.concatenate(self._image) if self._image else np.zeros(0, np.int32),
                "tag": np.concatenate(self._tag) if self._tag else np.zeros(0, np.int32),
                "emb": np.concatenate(self._emb) if self._emb else np.zeros((0, dim), np.float16),
                "prob": np.concatenate(self._prob) if self._prob else np.zeros(0, np.float32),
                "box": np.concatenate(self._box) if self._box else np.zeros((0, 4), np.float32),
            }
            self._image = self._tag = self._emb = self._prob = self._box = []
        return self._frozen


@dataclass
class TagCleaning:
    """What cleaning did to one tag."""

    tag: int
    count: int
    cleaned: bool
    kept: int
    removed_outlier: int = 0
    removed_score: int = 0

    @property
    def removed(self) -> int:
        return self.count - self.kept


@dataclass
class CleaningResult:
    remove: np.ndarray                      # [P] bool, aligned with CropStore.arrays()
    distance: np.ndarray                    # [P] float32, distance to nearest centroid (nan if not cleaned)
    per_tag: dict[int, TagCleaning] = field(default_factory=dict)

    def removed_pairs(self, arrays: dict[str, np.ndarray]) -> set[tuple[int, int]]:
        idx = np.flatnonzero(self.remove)
        return {(int(arrays["image"][i]), int(arrays["tag"][i])) for i in idx}


def kmeans_outliers(
    embeddings: np.ndarray, n_clusters: int, fraction: float, z: float, seed: int = 0,
    min_cluster_fraction: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Outlier mask and distance to the nearest centroid for one tag's crops.

    ``embeddings``: ``[n, D]``; rows are L2-normalised first so distances compare directions
    (cosine geometry), which is what the encoder's pooled features mean. k-means happily gives
    a far-away crop a centroid of its own (distance 0), so centroids of clusters holding fewer
    than ``max(2, min_cluster_fraction * n)`` crops do not count: their members are measured
    against the nearest real cluster.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    n = len(x)
    k = max(1, min(n_clusters, n // 2))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    sizes = np.bincount(km.labels_, minlength=k)                    # [k]
    real = sizes >= max(2.0, min_cluster_fraction * n)
    if not real.any():
        real = sizes == sizes.max()
    dist = np.min(km.transform(x)[:, real], axis=1).astype(np.float32)  # [n]
    n_cand = int(np.floor(fraction * n))
    out = np.zeros(n, dtype=bool)
    if n_cand == 0:
        return out, dist
    cand = np.argsort(-dist, kind="stable")[:n_cand]
    if z > 0:
        med = float(np.median(dist))
        mad = float(np.median(np.abs(dist - med))) * 1.4826
        cand = cand[dist[cand] > med + z * max(mad, 1e-6)]
    out[cand] = True
    return out, dist


def clean_tags(
    arrays: dict[str, np.ndarray],
    thresholds: np.ndarray,
    *,
    n_clusters: int = 3,
    outlier_fraction: float = 0.1,
    outlier_z: float = 2.0,
    rescore_scale: float = 0.5,
    min_count: int = 20,
    min_cluster_fraction: float = 0.05,
    use_outliers: bool = True,
    use_rescore: bool = True,
    seed: int = 0,
    skip_tags: set[int] | frozenset[int] = frozenset(),
) -> CleaningResult:
    """Decide which (image, tag) pairs to remove (see the module docstring). Tags in
    ``skip_tags`` (e.g. scenes: a whole-image tag has no region) are kept as they are."""
    tags, probs, emb = arrays["tag"], arrays["prob"], arrays["emb"]
    remove = np.zeros(len(tags), dtype=bool)
    distance = np.full(len(tags), np.nan, dtype=np.float32)
    per_tag: dict[int, TagCleaning] = {}
    order = np.argsort(tags, kind="stable")
    uniq, starts = np.unique(tags[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    for tag, lo, hi in zip(uniq.tolist(), starts.tolist(), bounds):
        idx = order[lo:hi]
        count = len(idx)
        if count < min_count or tag in skip_tags:
            per_tag[tag] = TagCleaning(tag=tag, count=count, cleaned=False, kept=count)
            continue
        low = (probs[idx] < rescore_scale * float(thresholds[tag])) if use_rescore else np.zeros(count, bool)
        if use_outliers:
            out, dist = kmeans_outliers(emb[idx], n_clusters, outlier_fraction, outlier_z, seed,
                                        min_cluster_fraction)
            distance[idx] = dist
        else:
            out = np.zeros(count, bool)
        drop = out | low
        remove[idx] = drop
        per_tag[tag] = TagCleaning(
            tag=tag, count=count, cleaned=True, kept=int(count - drop.sum()),
            removed_outlier=int((out & ~low).sum()), removed_score=int(low.sum()),
        )
    n_clean = sum(t.cleaned for t in per_tag.values())
    log.info("cleaning: %d pairs, %d tags (%d cleaned), %d pairs removed",
             len(tags), len(per_tag), n_clean, int(remove.sum()))
    return CleaningResult(remove=remove, distance=distance, per_tag=per_tag)
