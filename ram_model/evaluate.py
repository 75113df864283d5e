"""Tagging metrics, per-class threshold calibration, open-set evaluation, and the evaluation stage.

Metric functions are pure numpy on ``scores [N, C]`` (probabilities or logits) and multi-hot
``targets [N, C]``. AP follows scikit-learn's ``average_precision_score`` (step-wise precision at
each distinct score); mAP and macro averages use only classes with at least one positive.
The stage functions read webdataset shards whose ``{key}.json`` has ``truth.tags`` (canonical
names, embedded corpus only) and map those names onto the model's tags by name.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ram_model.checkpoint import save_model
from ram_model.registry import load_model
from ram_model.inference import load_image, preprocess
from ramflow_io.formats import TRUTH_FIELD, list_shards

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- metrics
def _sorted_counts(scores: np.ndarray, targets: np.ndarray):
    """For one class: (distinct thresholds desc, cumulative tp, cumulative fp) at each threshold."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], targets[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each score group
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return s[last], tp, fp


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class (``nan`` without positives), identical to sklearn's definition."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    _, tp, fp = _sorted_counts(scores, targets)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[C]`` AP per class (``nan`` where a class has no positive)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    return np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    ap = per_class_ap(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def precision_recall_f1(preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Micro and macro P/R/F1 of binary ``preds [N, C]`` (macro over classes with positives;
    an undefined ratio counts as 0, like sklearn's ``zero_division=0``)."""
    preds, targets = np.asarray(preds) > 0.5, np.asarray(targets) > 0.5
    tp = (preds & targets).sum(0).astype(np.float64)
    fp = (preds & ~targets).sum(0).astype(np.float64)
    fn = (~preds & targets).sum(0).astype(np.float64)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)

    p_c, r_c = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f_c = ratio(2 * tp, 2 * tp + fp + fn)
    has_pos = targets.sum(0) > 0
    mp, mr = ratio(tp.sum(), tp.sum() + fp.sum()), ratio(tp.sum(), tp.sum() + fn.sum())
    mf = ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    macro = (lambda v: float(v[has_pos].mean()) if has_pos.any() else float("nan"))
    return {
        "micro_precision": float(mp), "micro_recall": float(mr), "micro_f1": float(mf),
        "macro_precision": macro(p_c), "macro_recall": macro(r_c), "macro_f1": macro(f_c),
    }


def calibrate_thresholds(scores: np.ndarray, targets: np.ndarray, default: float | np.ndarray = 0.5,
                         min_positives: int = 1) -> np.ndarray:
    """Per-class thresholds ``[C]`` maximising F1 of ``score >= t`` on a validation split.

    The chosen cut lies halfway between the best-F1 score and the next lower distinct score (same
    predictions on the validation data, more margin on new data). Classes with fewer than
    ``min_positives`` positives get ``default`` (a number, or ``[C]`` per class: e.g. the
    thresholds a fine-tuned model inherited, since a handful of positives set a poor cut).
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    out = np.broadcast_to(np.asarray(default, dtype=np.float64), (scores.shape[1],)).copy()
    for c in range(scores.shape[1]):
        n_pos = int(targets[:, c].sum())
        if n_pos < max(min_positives, 1):
            continue
        thr, tp, fp = _sorted_counts(scores[:, c], targets[:, c])
        f1 = 2 * tp / (tp + fp + n_pos)
        best = int(np.argmax(f1))  # first max = highest threshold among ties
        out[c] = (thr[best] + thr[best + 1]) / 2 if best + 1 < len(thr) else thr[best]
    return out


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | float,
                    class_indices: Sequence[int] | None = None, tag_names: Sequence[str] | None = None) -> dict:
    """mAP, per-class AP, micro/macro P/R/F1 at ``thresholds``; restricted to ``class_indices``
    (open-set evaluation on held-out tags) when given."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (scores.shape[1],))
    if class_indices is not None:
        idx = np.asarray(list(class_indices), dtype=np.int64)
        scores, targets, thr = scores[:, idx], targets[:, idx], thr[idx]
        tag_names = [tag_names[i] for i in idx] if tag_names is not None else None
    ap = per_class_ap(scores, targets)
    result = {
        "num_images": int(scores.shape[0]),
        "num_classes": int(scores.shape[1]),
        "num_classes_with_positives": int(np.isfinite(ap).sum()),
        "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        **precision_recall_f1(scores >= thr[None], targets),
    }
    names = tag_names if tag_names is not None else [str(i) for i in range(len(ap))]
    result["per_class_ap"] = {n: float(a) for n, a in zip(names, ap) if np.isfinite(a)}
    return result


# ---------------------------------------------------------------------------- shards
def normalize_tag(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


def iter_shard_samples(shards: Sequence[str | os.PathLike], counts: Counter) -> Iterator[tuple[str, bytes, dict]]:
    """``(key, image bytes, metadata)`` from webdataset tars; incomplete samples are counted in
    ``counts`` by reason (``missing_image``, ``missing_json``, ``bad_json``)."""
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = Path(member.name).name.partition(".")
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, files in groups.items():
            image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            if image is None:
                counts["missing_image"] += 1
                continue
            if "json" not in files:
                counts["missing_json"] += 1
                continue
            try:
                meta = json.loads(files["json"])
            except (UnicodeDecodeError, json.JSONDecodeError):
                counts["bad_json"] += 1
                continue
            yield key, image, meta


class EvaluationConfig(BaseModel):
    """``evaluation`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    split: str = "test"
    batch_size: int = 64
    threshold: float | None = None  # None: the per-class thresholds stored with the model
    open_set_tags: list[str] = []  # held-out tags: metrics also reported restricted to them
    max_samples: int | None = None
    device: str = "cpu"
    default_threshold: float = 0.5  # calibration fallback for classes without positives


def collect_scores(model, shards: Sequence[str | os.PathLike], batch_size: int = 64,
                   max_samples: int | None = None, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """Model scores and truth targets over the shards' samples with ``truth.tags``.

    Returns ``scores [N, C]``, ``targets [N, C]`` and counts: ``used`` plus skip reasons
    (samples), and ``truth_tags_unknown_to_model`` (tag occurrences that have no model tag).
    """
    model = model.to(device).eval()
    lookup = {normalize_tag(n): i for i, n in enumerate(model.tag_names)}
    counts: Counter = Counter()
    scores, targets, images, rows = [], [], [], []

    def flush():
        if images:
            x = preprocess(images, model.data_config).to(device)
            with torch.no_grad():
                scores.append(torch.sigmoid(model.tag_logits(x)).cpu().numpy())
            targets.extend(rows)
            images.clear()
            rows.clear()

    for key, data, meta in iter_shard_samples(shards, counts):
        if max_samples is not None and counts["used"] >= max_samples:
            counts["over_max_samples"] += 1
            continue
        truth = meta.get(TRUTH_FIELD)
        if not isinstance(truth, dict) or not isinstance(truth.get("tags"), list):
            counts["missing_truth"] += 1
            continue
        try:
            img = load_image(data)
        except Exception:  # noqa: BLE001 - any decoder error means an unreadable image
            counts["bad_image"] += 1
            continue
        row = np.zeros(model.num_tags, dtype=np.float32)
        for name in truth["tags"]:
            idx = lookup.get(normalize_tag(str(name)))
            if idx is None:
                counts["truth_tags_unknown_to_model"] += 1
            else:
                row[idx] = 1.0
        images.append(img)
        rows.append(row)
        counts["used"] += 1
        if len(images) >= batch_size:
            flush()
    flush()
    c = model.num_tags
    s = np.concatenate(scores) if scores else np.zeros((0, c), np.float32)
    t = np.stack(targets) if targets else np.zeros((0, c), np.float32)
    return s, t, dict(counts)


def evaluate_checkpoint(checkpoint: str | os.PathLike, shards: Sequence[str | os.PathLike],
                        config: EvaluationConfig, out_path: str | os.PathLike | None = None) -> dict:
    """Evaluate a saved model on shards; optionally write the metrics JSON to ``out_path``."""
    model = load_model(checkpoint)
    scores, targets, counts = collect_scores(model, shards, config.batch_size, config.max_samples, config.device)
    if scores.shape[0] == 0:
        raise ValueError(f"no evaluable samples in {len(shards)} shard(s): {counts}")
    thr = config.threshold if config.threshold is not None else model.thresholds.cpu().numpy()
    result = {"checkpoint": str(checkpoint), "counts": counts,
              "threshold": "calibrated" if config.threshold is None else config.threshold,
              "all": evaluate_scores(scores, targets, thr, tag_names=model.tag_names)}
    if config.open_set_tags:
        wanted = {normalize_tag(t) for t in config.open_set_tags}
        idx = [i for i, n in enumerate(model.tag_names) if normalize_tag(n) in wanted]
        missing = sorted(wanted - {normalize_tag(model.tag_names[i]) for i in idx})
        result["open_set"] = evaluate_scores(scores, targets, thr, idx, model.tag_names)
        result["open_set"]["tags_not_in_model"] = missing
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    return result


def evaluate_split(model, data_root: str | os.PathLike, split: str = "test", thresholds=None,
                   batch_size: int = 64, max_samples: int | None = None, device: str = "cpu",
                   subsets: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Flat metrics of an in-memory model on ``raw/{split}`` shards of ``data_root`` (truth tags):
    ``mAP``, micro/macro P/R/F1 at ``thresholds`` (default: the model's), ``num_images`` and
    ``skipped/<reason>`` / ``truth_tags_unknown_to_model`` counts. ``subsets`` (name -> class
    indices) adds ``classes_<name>`` (classes with test positives) and, when that is not 0,
    ``mAP_<name>`` per subset,
    e.g. the tags trained on vs those never seen positive in training (open set)."""
    shards = list_shards(data_root, split)
    if not shards:
        raise FileNotFoundError(f"no shards for split {split!r} under {data_root}")
    scores, targets, counts = collect_scores(model, shards, batch_size, max_samples, device)
    if scores.shape[0] == 0:
        raise ValueError(f"no evaluable samples in {split}: {counts}")
    thr = model.thresholds.cpu().numpy() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    result = evaluate_scores(scores, targets, thr, tag_names=model.tag_names)
    flat = {k: v for k, v in result.items() if k != "per_class_ap"}
    ap = per_class_ap(scores, targets) if subsets else None  # [C], NaN where a class has no positive
    for name, idx in (subsets or {}).items():
        sub = ap[np.asarray(list(idx), dtype=np.int64)]
        flat[f"classes_{name}"] = int(np.isfinite(sub).sum())
        if np.isfinite(sub).any():  # no mAP for a subset without test positives
            flat[f"mAP_{name}"] = float(np.nanmean(sub))
    flat.update({(k if k in ("used", "truth_tags_unknown_to_model") else f"skipped/{k}"): v
                 for k, v in counts.items()})
    return flat


def calibrate_checkpoint(checkpoint: str | os.PathLike, shards: Sequence[str | os.PathLike],
                         out_checkpoint: str | os.PathLike, config: EvaluationConfig) -> dict:
    """Calibrate per-class thresholds on validation shards and save them with the model."""
    model = load_model(checkpoint)
    scores, targets, counts = collect_scores(model, shards, config.batch_size, config.max_samples, config.device)
    thr = calibrate_thresholds(scores, targets, default=config.default_threshold)
    model.set_tags(model.tag_names, model.label_embed, thr)
    extra = dict(getattr(model, "checkpoint_extra", {}))
    extra["calibration"] = {"num_images": int(scores.shape[0]), "shards": [str(s) for s in shards],
                            "default_threshold": config.default_threshold,
                            "classes_calibrated": int((targets.sum(0) > 0).sum())}
    save_model(model, out_checkpoint, extra)
    return {"counts": counts, **extra["calibration"]}
