"""Measure what each engine step did to the training labels, against the corpus truth.

This is evaluation code: it is the only part of the engine that reads the ``truth`` field of
``{key}.json`` (the engine itself sees images and captions only, as with web data). Truth tag
names are mapped to label-system ids; truth names the label system does not know cannot be
learned from these labels and are left out of recall (their count is reported).

Precision and recall are micro-averaged over (image, tag) pairs:
``precision = |labels & truth| / |labels|``, ``recall = |labels & truth| / |truth in vocab|``.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ramflow_io.formats import TRUTH_FIELD
from ramflow_io.shards import iter_samples

log = logging.getLogger(__name__)


def load_truth(shards: Iterable[Path], keys: set[str] | None = None) -> dict[str, list[str]]:
    """``key -> truth["tags"]`` from each sample's ``{key}.json`` (images are not decoded).

    Samples without a ``truth`` field (web data) are absent from the result.
    """
    out: dict[str, list[str]] = {}
    for sample in iter_samples(shards, decode=False):
        if keys is not None and sample.key not in keys:
            continue
        truth = sample.meta.get(TRUTH_FIELD)
        if truth is not None:
            out[sample.key] = list(truth.get("tags", []))
        if keys is not None and len(out) == len(keys):
            break
    return out


def truth_ids(truth: Mapping[str, Sequence[str]], id_of) -> tuple[dict[str, set[int]], int]:
    """Map truth names to ids with ``id_of(name) -> int | None``; returns (ids, out-of-vocab count)."""
    ids: dict[str, set[int]] = {}
    oov = 0
    for key, names in truth.items():
        s = set()
        for name in names:
            i = id_of(name)
            if i is None:
                oov += 1
            else:
                s.add(int(i))
        ids[key] = s
    return ids, oov


def precision_recall(labels: Mapping[str, Iterable[int]], truth: Mapping[str, set[int]],
                     vocabulary: set[int] | None = None) -> dict[str, float]:
    """Micro precision / recall / F1 of ``labels`` over the keys that have truth.

    With ``vocabulary`` (the tags the truth can contain, e.g. the union of all truth sets) a
    label outside it is neither right nor wrong: the embedded corpus' truth lists objects,
    scenes and colours, so an action parsed from "dogs running" cannot be judged. Such labels
    are left out of precision and counted in ``outside_vocabulary``.
    """
    tp = n_pred = n_true = outside = 0
    for key, t in truth.items():
        pred = set(labels.get(key, ()))
        if vocabulary is not None:
            outside += len(pred - vocabulary)
            pred &= vocabulary
        tp += len(pred & t)
        n_pred += len(pred)
        n_true += len(t)
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "labels": n_pred, "truth": n_true, "correct": tp,
            "images": len(truth), "outside_vocabulary": outside}


def per_tag_changes(
    added: Mapping[str, Iterable[int]],
    removed: Mapping[str, Iterable[int]],
    names: Sequence[str],
    truth: Mapping[str, set[int]] | None = None,
) -> list[dict]:
    """Per tag: how many times it was added / removed, and (with truth) how many were right.

    A right addition adds a tag the image has; a right removal removes one it does not have.
    """
    rows: dict[int, Counter] = {}
    for kind, mapping in (("added", added), ("removed", removed)):
        for key, ids in mapping.items():
            t = truth.get(key) if truth is not None else None
            for i in ids:
                c = rows.setdefault(int(i), Counter())
                c[kind] += 1
                if t is not None:
                    right = (i in t) if kind == "added" else (i not in t)
                    c[f"{kind}_right"] += int(right)
    out = []
    for i, c in sorted(rows.items(), key=lambda kv: -(kv[1]["added"] + kv[1]["removed"])):
        row = {"tag": names[i] if i < len(names) else str(i), "id": i, "added": c["added"], "removed": c["removed"]}
        if truth is not None:
            row["added_right"] = c["added_right"]
            row["removed_right"] = c["removed_right"]
        out.append(row)
    return out


def crop_figure(
    rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[Image.Image]]],
    path: Path,
    per_side: int = 6,
    thumb: int = 72,
) -> Path:
    """Grid PNG: one row per tag, ``per_side`` kept crops (left) then removed crops (right)."""
    import matplotlib  # lazy: matplotlib (Agg set first), only for the figure

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # lazy: matplotlib (Agg set first), only for the figure

    n_rows = max(1, len(rows))
    n_cols = 2 * per_side
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols, 1.25 * n_rows + 0.4), squeeze=False)
    blank = np.full((thumb, thumb, 3), 255, dtype=np.uint8)
    for r in range(n_rows):
        name, kept, removed = rows[r] if rows else ("(no cleaned tags)", [], [])
        for c in range(n_cols):
            ax = axes[r][c]
            side = kept if c < per_side else removed
            j = c if c < per_side else c - per_side
            img = np.asarray(side[j].convert("RGB").resize((thumb, thumb))) if j < len(side) else blank
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            color = "tab:green" if c < per_side else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color if j < len(side) else "white")
                spine.set_linewidth(2)
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("engine cleaning: kept crops (green, left) | removed crops (red, right)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def load_images(shards: Iterable[Path], keys: set[str]) -> dict[str, Image.Image]:
    """Decode only the wanted images (second pass for the crop figure)."""
    out: dict[str, Image.Image] = {}
    for sample in iter_samples(shards, decode=False):
        if sample.key in keys:
            with Image.open(io.BytesIO(sample.image)) as im:
                out[sample.key] = im.convert("RGB")
            if len(out) == len(keys):
                break
    return out


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False), encoding="utf-8")
    return path


def recall_ceiling(probs: np.ndarray, truth: np.ndarray, base: np.ndarray, precision: float = 0.95,
                   steps: int = 400) -> dict:
    """How much label recall per-class thresholds on a tagger can reach at ``precision``.

    The labels are ``base`` plus, per class, the tagger's top-scored pairs that ``base`` lacks
    down to a threshold; the thresholds are chosen on the truth itself, which no engine has, so
    this bounds every generation rule that uses this tagger. ``probs``: ``[N, C]``
    probabilities; ``truth``, ``base``: ``[N, C]`` bool (``base & truth`` models a perfect
    cleaner of the base labels). Score only the classes the truth can contain.

    Choosing one prefix per class to maximise the right labels ``T`` subject to
    ``T >= precision * labels`` is a multiple-choice knapsack; its Lagrangian gives both sides.
    For ``mu`` in ``[0, precision)`` each class takes the prefix maximising ``right - mu *
    labels``: a choice that is checked for precision (a reachable recall), and
    ``precision / (precision - mu) * sum(max(right - mu * labels))`` bounds ``T`` from above
    for every feasible choice.

    Returns ``recall``, ``precision`` and ``mu`` of the best feasible choice (``reached`` False:
    none was, and the most precise one is given), its ``labels`` ``[N, C]`` bool, and
    ``recall_upper_bound``, the smallest bound over ``steps`` values of ``mu``. A bound below
    the recall of ``base`` alone proves that no choice reaches ``precision``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    truth, base = np.asarray(truth) > 0, np.asarray(base) > 0
    if not probs.shape == truth.shape == base.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape}, truth {truth.shape}, base {base.shape} must be one [N, C]")
    n, c = probs.shape
    candidates = np.where(base, -np.inf, probs)                    # [N, C]: what the tagger may add
    order = np.argsort(-candidates, axis=0, kind="stable")         # [N, C] best candidate first
    hit = np.take_along_axis(truth & ~base, order, axis=0)         # [N, C]
    size = (~base).sum(0)                                          # [C] candidates per class
    k = np.arange(n + 1)[:, None]                                  # [N+1, 1] prefix lengths
    right = (base & truth).sum(0) + np.vstack([np.zeros((1, c)), np.cumsum(hit, 0)])  # [N+1, C]
    made = (base.sum(0) + k).astype(np.float64)  # [N+1, C] labels
    valid = k <= size[None, :]  # [N+1, C] prefixes that exist
    total = max(int(truth.sum()), 1)
    cols = np.arange(c)
    best, bound = None, np.inf
    for mu in np.linspace(0.0, precision, steps, endpoint=False):
        gain = np.where(valid, right - mu * made, -np.inf)         # [N+1, C]
        top = gain.max(0)                                           # [C]
        bound = min(bound, precision / (precision - mu) * top.sum())
        pick = n - np.argmax(gain[::-1] == top, axis=0)             # [C] the longest best prefix
        t, m = right[pick, cols].sum(), made[pick, cols].sum()
        row = {"precision": float(t / max(m, 1)), "recall": float(t / total), "mu": float(mu), "pick": pick}
        feasible = row["precision"] >= precision
        if best is None or (feasible, row["recall"] if feasible else row["precision"]) > \
                (best["reached"], best["recall"] if best["reached"] else best["precision"]):
            best = {**row, "reached": feasible}
    pick = best.pop("pick")
    added = np.zeros_like(base)
    np.put_along_axis(added, order, k[:n] < pick[None, :], axis=0)  # [N, C] each class's first pick[c] ranks
    labels = base | added
    return {**best, "recall_upper_bound": float(np.clip(bound / total, 0.0, 1.0)), "labels": labels}
