"""Metrics vs scikit-learn, threshold calibration, open-set restriction, evaluation on a shard."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from ram_model.evaluate import (
    average_precision, calibrate_thresholds, evaluate_scores, mean_average_precision, per_class_ap,
    precision_recall_f1,
)


def _data(seed=0, n=60, c=6):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.3).astype(np.float32)
    scores = np.clip(targets * 0.4 + rng.random((n, c)) * 0.7, 0, 1).round(2)  # rounding -> ties
    targets[:, -1] = 0  # a class without positives
    return scores, targets


def test_ap_matches_sklearn_including_ties():
    scores, targets = _data()
    ap = per_class_ap(scores, targets)
    for c in range(scores.shape[1] - 1):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
    assert np.isnan(ap[-1])
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(ap[:-1]))
    assert average_precision([0.9, 0.8, 0.1], [1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)  # by hand


def test_precision_recall_f1_matches_sklearn():
    scores, targets = _data(1)
    preds = scores >= 0.5
    ours = precision_recall_f1(preds, targets)
    for avg in ("micro", "macro"):
        labels = None if avg == "micro" else np.flatnonzero(targets.sum(0) > 0)
        p, r, f, _ = precision_recall_fscore_support(targets, preds, average=avg, labels=labels, zero_division=0)
        assert (ours[f"{avg}_precision"], ours[f"{avg}_recall"], ours[f"{avg}_f1"]) == pytest.approx((p, r, f))


def test_calibrated_thresholds_maximise_f1():
    scores, targets = _data(2)
    thr = calibrate_thresholds(scores, targets, default=0.77)
    assert thr[-1] == 0.77  # no positives -> fallback
    for c in range(scores.shape[1] - 1):
        def f1(t):
            p = scores[:, c] >= t
            tp = (p & (targets[:, c] > 0)).sum()
            return 2 * tp / (p.sum() + targets[:, c].sum())
        best = max(f1(t) for t in np.unique(scores[:, c]))
        assert f1(thr[c]) == pytest.approx(best)
    res = evaluate_scores(scores, targets, thr)
    assert res["macro_f1"] >= evaluate_scores(scores, targets, 0.5)["macro_f1"]


def test_classes_with_few_validation_positives_keep_their_own_threshold():
    """A fine-tune's small validation slice calibrates only classes with enough positives; the
    others keep the threshold the model inherited (a per-class ``default``)."""
    from ram_model.train_stage import _current_thresholds

    scores, targets = _data(2)
    inherited = np.linspace(0.3, 0.6, scores.shape[1])
    counts = (targets > 0).sum(0)
    k = int(np.sort(counts)[len(counts) // 2])               # about half the classes fall short
    thr = calibrate_thresholds(scores, targets, default=inherited, min_positives=k)
    few = counts < k
    assert few.any() and (~few).any()
    assert np.array_equal(thr[few], inherited[few])
    assert np.allclose(thr[~few], calibrate_thresholds(scores, targets, min_positives=k)[~few])

    class Tagged(torch.nn.Module):
        def __init__(self, thresholds):
            super().__init__()
            self.register_buffer("thresholds", torch.as_tensor(thresholds, dtype=torch.float32))

    assert np.allclose(_current_thresholds(Tagged(inherited), len(inherited)), inherited)
    assert np.all(_current_thresholds(Tagged([]), 3) == 0.5)     # no tag set yet: the default


def test_open_set_restriction():
    scores, targets = _data(3)
    names = [f"t{i}" for i in range(scores.shape[1])]
    sub = evaluate_scores(scores, targets, 0.5, class_indices=[1, 3], tag_names=names)
    direct = evaluate_scores(scores[:, [1, 3]], targets[:, [1, 3]], 0.5, tag_names=["t1", "t3"])
    assert sub == direct and set(sub["per_class_ap"]) == {"t1", "t3"} and sub["num_classes"] == 2


def _write_shard(path, samples):
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for key, color, meta in samples:
            files = {}
            if color is not None:
                buf = io.BytesIO()
                Image.new("RGB", (96, 96), color).save(buf, format="JPEG")
                files["jpg"] = buf.getvalue()
            if meta is not None:
                files["json"] = json.dumps(meta).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_evaluate_and_calibrate_checkpoint_on_shard(tmp_path):
    from _model_helpers import TAGS, tiny_model
    from ram_model.checkpoint import save_model
    from ram_model.registry import load_model
    from ram_model.evaluate import EvaluationConfig, calibrate_checkpoint, evaluate_checkpoint

    ckpt = save_model(tiny_model(), tmp_path / "m.pt")
    samples = [(f"k{i}", (i * 40 % 255, 90, 200 - i * 20), {"key": f"k{i}", "truth": {"tags": tags}})
               for i, tags in enumerate([["cat", "tree"], ["dog"], ["sky", "unicorn"], ["Red"], ["cat"], ["tree"]])]
    samples += [("nojpg", None, {"truth": {"tags": ["cat"]}}), ("notruth", (1, 2, 3), {"key": "notruth"}),
                ("nojson", (1, 2, 3), None)]
    shard = tmp_path / "test-000000.tar"
    _write_shard(shard, samples)
    cfg = EvaluationConfig(batch_size=4, open_set_tags=["sky", "red", "ghost"])
    res = evaluate_checkpoint(ckpt, [shard], cfg, tmp_path / "metrics.json")
    assert res["counts"] == {"used": 6, "truth_tags_unknown_to_model": 1, "missing_image": 1,
                             "missing_truth": 1, "missing_json": 1}
    assert res["all"]["num_images"] == 6 and res["all"]["num_classes"] == len(TAGS)
    assert 0 <= res["all"]["mAP"] <= 1
    assert res["open_set"]["num_classes"] == 2 and res["open_set"]["tags_not_in_model"] == ["ghost"]
    assert json.loads((tmp_path / "metrics.json").read_text())["all"]["mAP"] == res["all"]["mAP"]
    out = tmp_path / "calibrated.pt"
    info = calibrate_checkpoint(ckpt, [shard], out, EvaluationConfig(default_threshold=0.42))
    model = load_model(out)
    assert info["classes_calibrated"] == 5 and model.checkpoint_extra["calibration"]["num_images"] == 6
    assert not np.allclose(model.thresholds.numpy(), tiny_model().thresholds.numpy())
