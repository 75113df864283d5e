"""Data engine: generation, region finding, cleaning, and the whole pass with a stand-in model.

The stand-in model follows the model contract (``tag_logits``, ``tag_attention``,
``image_embedding``, ``caption``, ``data_config``, ``thresholds``) on synthetic images: each
tag is a colour, the image shows coloured rectangles on grey, and the model's maps are built
from the colour masks, so every answer it gives is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from engine_rounds import EngineConfig, Sample, engine_core
from engine_rounds.cleaning import CropStore, clean_tags, kmeans_outliers
from engine_rounds.tag_generation import caption_parser, confident_tags, generate_labels, precision_thresholds
from engine_rounds.regions import attention_box_cells, attention_to_box, box_iou, crop_image, to_tensor

COLORS = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [230, 220, 30]], dtype=np.float32)
NAMES = ["red", "green", "blue", "yellow"]
GREY = (128, 128, 128)


class StandInModel(torch.nn.Module):
    """Colour-mask tagger: tag c's evidence at a pixel is closeness to ``COLORS[c]``."""

    data_config = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

    def __init__(self, fixed_logits: dict[int, list[float]] | None = None):
        super().__init__()
        self.thresholds = np.full(len(COLORS), 0.5, dtype=np.float32)
        self.fixed_logits = fixed_logits
        self.calls = 0

    def _masks(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images * 0.5 + 0.5) * 255.0                        # [B, 3, H, W]
        col = torch.tensor(COLORS)[None, :, :, None, None]        # [1, C, 3, 1, 1]
        dist = (rgb[:, None] - col).abs().amax(dim=2)             # [B, C, H, W]
        return (dist < 40).float()

    def tag_logits(self, images):
        self.calls += 1
        if self.fixed_logits is not None:
            # fixed logits keyed by the image's mean red value bucket (tests give distinct images)
            key = [int(round(float(v))) for v in (images[:, 0].mean(dim=(1, 2)) * 100)]
            return torch.tensor([self.fixed_logits[k] for k in key])
        frac = self._masks(images).mean(dim=(2, 3))               # [B, C]
        return 40.0 * (frac - 0.03)

    def tag_attention(self, images, tag_ids=None):
        att = torch.nn.functional.avg_pool2d(self._masks(images), 4) + 1e-3  # [B, C, 8, 8]
        att = att / att.sum(dim=(2, 3), keepdim=True)
        return att if tag_ids is None else att[:, tag_ids]

    def image_embedding(self, images):
        masks = self._masks(images).mean(dim=(2, 3))                       # [B, C]
        mean_rgb = (images * 0.5 + 0.5).mean(dim=(2, 3))                    # [B, 3]
        return torch.cat([masks * 4, mean_rgb], dim=1)                      # [B, C+3]

    def caption(self, images, tags=None):
        return ["" for _ in range(len(images))]


def synthetic_image(objects: list[tuple[int, tuple[int, int, int, int]]], size=(96, 96), jitter=0) -> Image.Image:
    arr = np.full((size[1], size[0], 3), GREY, dtype=np.uint8)
    for c, (x0, y0, x1, y1) in objects:
        arr[y0:y1, x0:x1] = np.clip(COLORS[c] + jitter, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# --------------------------------------------------------------------------- generation


def test_generation_adds_missing_tag_the_model_is_sure_of():
    probs = np.array([[0.99, 0.55, 0.2, 0.9], [0.1, 0.1, 0.1, 0.1]], dtype=np.float32)
    thr = np.full(4, 0.5, dtype=np.float32)
    assert confident_tags(probs, thr, margin=0.1) == [[0, 3], []]
    out = generate_labels([[3], [2]], probs, thr, margin=0.1, caption_ids=[[1, 7], []], num_classes=4)
    assert out[0].union == [0, 1, 3]            # 0 from tagging, 1 from caption, 3 parsed; 7 not a class
    assert out[0].by_tagging == [0] and out[0].by_caption == [1] and out[0].parsed == [3]
    assert out[1].union == [2] and out[1].added == []   # unsure model adds nothing, keeps parsed tag


def test_generation_end_to_end_with_fixed_logits(tmp_path):
    # two distinct images (mean red differs) with fixed logits: image A is sure of tag 2
    img_a, img_b = synthetic_image([(0, (0, 0, 30, 30))]), synthetic_image([])
    xa, xb = to_tensor([img_a, img_b], StandInModel.data_config)
    key_a, key_b = (int(round(float(v))) for v in (torch.stack([xa, xb])[:, 0].mean(dim=(1, 2)) * 100))
    assert key_a != key_b
    model = StandInModel(fixed_logits={key_a: [0.0, -5.0, 6.0, -5.0], key_b: [-5.0, -5.0, 0.3, -5.0]})
    cfg = EngineConfig(adapt_epochs=0, cleaning=False, captioning=False, margin=0.2, batch_size=2, report_tags=0)
    res = engine_core(model, [Sample("a", img_a), Sample("b", img_b)], {"a": [0], "b": []}, NAMES, cfg,
                      tmp_path / "engine.parquet", tmp_path / "report")
    df = pd.read_parquet(tmp_path / "engine.parquet").set_index("key")
    assert list(df.loc["a", "union_label_ids"]) == [0, 2]      # sigmoid(6) = 0.998 >= 0.5 + 0.2
    assert list(df.loc["a", "parse_label_ids"]) == [0]         # parsed labels stay as parsed
    assert list(df.loc["a", "added_ids"]) == [2]
    assert list(df.loc["b", "union_label_ids"]) == []          # sigmoid(0.3) = 0.57 < 0.7
    assert res.added == 1 and res.removed == 0 and res.images == 2


def test_precision_thresholds_take_the_deepest_precise_prefix():
    # class 0 by falling prob: T T F T F -> running precision 1, 1, .67, .75, .6
    # class 1: two positives only (below min_positives) -> fallback
    # class 2: F T T F T -> precision 0, .5, .67, .5, .6 never reaches .75 -> never added (inf)
    probs = np.array([[0.9, 0.9, 0.9], [0.8, 0.8, 0.8], [0.7, 0.7, 0.7], [0.6, 0.6, 0.6], [0.5, 0.5, 0.5]])
    labels = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=bool)
    fallback = np.array([0.11, 0.22, 0.33])
    thr, calibrated = precision_thresholds(probs, labels, target=0.75, fallback=fallback, min_positives=3)
    assert thr[0] == pytest.approx(0.6) and thr[1] == pytest.approx(0.22) and np.isinf(thr[2])
    assert calibrated.tolist() == [True, False, True]
    with pytest.raises(ValueError):
        precision_thresholds(probs, labels[:, :2], 0.9, fallback)
    # pooled over the calibrated classes 0 and 2, by falling prob: T F T T F T T F F T -> running
    # precision 1, .5, .67, .75, .6, .67, .71, ...: at 0.7 both stop at 0.6, where class 2 alone never got
    thr, calibrated = precision_thresholds(probs, labels, target=0.7, fallback=fallback, min_positives=3,
                                           pooled=True)
    assert thr.tolist() == pytest.approx([0.6, 0.22, 0.6]) and calibrated.tolist() == [True, False, True]
    per_class, _ = precision_thresholds(probs, labels, target=0.7, fallback=fallback, min_positives=3)
    assert per_class[0] == pytest.approx(0.6) and np.isinf(per_class[2])


def test_generation_calibrated_on_a_clean_split_adds_only_precise_classes(tmp_path):
    """Calibration images with complete labels decide which confident predictions are added: red is
    right there (added on the pretrain image), blue predictions are wrong there (never added), green
    and yellow have no positives there (threshold + margin)."""
    from engine_rounds import Calibration

    box = (8, 8, 56, 56)
    calib = [Sample("c_red", synthetic_image([(0, box)])), Sample("c_blue", synthetic_image([(2, box)])),
             Sample("c_grey", synthetic_image([])), Sample("c_stray", synthetic_image([]))]
    calib_labels = {"c_red": [0], "c_blue": [], "c_grey": [2]}          # c_stray has no label row
    image = synthetic_image([(0, box), (2, (60, 60, 90, 90)), (1, (60, 5, 90, 35))])
    cfg = EngineConfig(adapt_epochs=0,
                       cleaning=False, captioning=False, batch_size=2, report_tags=0, calibration_min_positives=1,
                       generation_pooled=False)
    out = {}
    for name, calibration in (("calibrated", Calibration(calib, calib_labels)), ("margin", None)):
        res = engine_core(StandInModel(), [Sample("p", image)], {"p": []}, NAMES, cfg, tmp_path / f"{name}.parquet",
                          tmp_path / name, calibration=calibration)
        out[name] = (list(pd.read_parquet(tmp_path / f"{name}.parquet")["union_label_ids"][0]), res)
    assert out["margin"][0] == [0, 1, 2]                 # threshold + margin adds all three colours
    union, res = out["calibrated"]
    assert union == [0, 1]                               # blue is never added; green falls back
    assert res.generation["rule"] == "precision" and res.generation["calibration_images"] == 3
    assert res.generation["classes_calibrated"] == 2 and res.generation["classes_never_added"] == 1
    assert res.generation["calibration_skipped"] == {"not_in_labels": 1}
    saved = json.loads(Path(res.artifacts["generation_thresholds_json"]).read_text())
    assert saved["blue"] is None and 0.5 < saved["red"] <= 1.0
    assert out["margin"][1].generation["rule"] == "threshold+margin"
    # a calibration split whose keys have no label rows calibrates nothing: counted, then the margin rule
    res = engine_core(StandInModel(), [Sample("p", image)], {"p": []}, NAMES, cfg, tmp_path / "none.parquet",
                      tmp_path / "none", calibration=Calibration(calib, {}))
    assert list(pd.read_parquet(tmp_path / "none.parquet")["union_label_ids"][0]) == [0, 1, 2]
    assert res.generation == {"rule": "threshold+margin", "margin": 0.1, "calibration_images": 0,
                              "calibration_skipped": {"not_in_labels": 4}}


def test_image_score_cleaning_removes_a_named_tag_the_image_lacks(tmp_path):
    """The keep threshold comes from how the clean split's red images score red; a caption that
    names red on a grey image scores far below it, so cleaning removes that label."""
    from engine_rounds import Calibration

    box = (8, 8, 56, 56)
    calib = [Sample(f"c{i}", synthetic_image([(0, box)], jitter=i)) for i in range(4)]
    samples = [Sample("grey", synthetic_image([])), Sample("red", synthetic_image([(0, box)]))]
    parsed = {"grey": [0], "red": [0]}
    removed = {}
    for use in (True, False):
        cfg = EngineConfig(adapt_epochs=0,
                           generation=False, captioning=False, batch_size=2, report_tags=0, keep_quantile=0.25,
                           calibration_min_positives=2, use_image_score=use)
        res = engine_core(StandInModel(), samples, parsed, NAMES, cfg, tmp_path / f"{use}.parquet",
                          tmp_path / f"r{use}", calibration=Calibration(calib, {s.key: [0] for s in calib}))
        df = pd.read_parquet(tmp_path / f"{use}.parquet").set_index("key")
        removed[use] = {k: list(v) for k, v in df["removed_ids"].items()}
        assert res.generation["classes_with_keep_threshold"] == 1 and res.generation["calibration_images"] == 4
    assert removed[True] == {"grey": [0], "red": []}
    assert removed[False] == {"grey": [], "red": []}


@pytest.mark.parametrize("cap, removed_small", [(True, []), (False, [0])])
def test_image_score_never_removes_a_tag_the_model_predicts(tmp_path, cap, removed_small):
    """Clean red images fill half the frame, so red's keep quantile is near 1. A small red patch
    scores 0.63: above red's class threshold (0.5), below that quantile. With the cap the label
    stays; without it the rule removes a right label. A grey image's red label goes either way."""
    from engine_rounds import Calibration

    calib = [Sample(f"c{i}", synthetic_image([(0, (8, 8, 56, 56))], jitter=i)) for i in range(4)]
    samples = [Sample("grey", synthetic_image([])), Sample("small", synthetic_image([(0, (30, 30, 50, 50))]))]
    cfg = EngineConfig(adapt_epochs=0,
                       generation=False, captioning=False, batch_size=2, report_tags=0, keep_quantile=0.25,
                       calibration_min_positives=2, keep_above_threshold=cap)
    res = engine_core(StandInModel(), samples, {"grey": [0], "small": [0]}, NAMES, cfg, tmp_path / "out.parquet",
                      tmp_path / "report", calibration=Calibration(calib, {s.key: [0] for s in calib}))
    df = pd.read_parquet(tmp_path / "out.parquet").set_index("key")
    removed = {k: list(v) for k, v in df["removed_ids"].items()}
    assert removed == {"grey": [0], "small": removed_small}
    assert res.generation["keep_above_threshold"] is cap


def test_adaptation_recipe_and_split():
    """The engine model's fine-tune keeps the preliminary recipe but trains on the calibration
    split's non-held-out keys only: the ones the engine calibrates on are never trained on."""
    from engine_rounds.adapt import adapt_config, trained_on
    from ram_model.data import is_validation_key

    base = {"model": "ram_effnet_lite0", "model_overrides": {"image_size": 96}, "splits": ["pretrain"],
            "epochs": 5, "lr": 2e-3, "warmup_steps": 50, "validation_fraction": 0.05, "backend": "deepspeed"}
    cfg = adapt_config(base, "finetune", epochs=3, lr=5e-4, holdout=0.5)
    assert cfg["splits"] == ["finetune"] and cfg["epochs"] == 3 and cfg["lr"] == 5e-4
    assert cfg["validation_fraction"] == 0.5 and cfg["warmup_steps"] == 5 and cfg["resume"] is False
    assert cfg["model"] == "ram_effnet_lite0" and cfg["model_overrides"] == {"image_size": 96}
    assert cfg["backend"] == "torch"  # the adaptation trains in process whatever the base used
    keys = [f"ft_{i:05d}" for i in range(400)]
    used = trained_on(keys, 0.5)
    held = {k for k in keys if is_validation_key(k, 0.5)}
    assert used.isdisjoint(held) and used | held == set(keys)
    assert 120 < len(held) < 280


def test_caption_parser_composes_parse_and_ids():
    parse = caption_parser(lambda caps: [c.split() for c in caps], lambda tags: [NAMES.index(t) for t in tags])
    assert parse(["red blue red", ""]) == [[0, 2], []]


# --------------------------------------------------------------------------- regions


def test_region_from_object_mask_attention_overlaps_true_box():
    rng = np.random.default_rng(0)
    true_box = (40, 24, 88, 64)                     # pixels of a 128 x 96 image
    mask = np.zeros((96, 128), dtype=np.float32)
    mask[24:64, 40:88] = 1.0
    # stand-in attention: object mask pooled to a 12 x 16 token grid, plus noise and a weak blob
    grid = mask.reshape(12, 8, 16, 8).mean(axis=(1, 3))
    att = grid + 0.05 * rng.random(grid.shape)
    att[0:2, 0:2] += 0.6                            # a smaller distractor component
    box = attention_to_box(att, (128, 96), threshold=0.5, margin=0.0)
    assert box_iou(box, true_box) > 0.9
    # a 15% margin per side grows the box 1.3x each way: IoU 1 / 1.69 = 0.59 at best
    assert box_iou(attention_to_box(att, (128, 96), 0.5, margin=0.15), true_box) > 0.55


def test_region_picks_component_with_most_mass_and_handles_flat_maps():
    att = np.zeros((6, 6))
    att[0, 0] = 1.0                 # highest single peak, tiny mass
    att[3:6, 3:6] = 0.8             # larger mass
    assert attention_box_cells(att, 0.5) == (3, 3, 6, 6)
    assert attention_box_cells(np.zeros((4, 5)), 0.5) == (0, 0, 5, 4)
    with pytest.raises(ValueError):
        attention_box_cells(np.zeros(5), 0.5)


def test_standin_attention_region_overlaps_object_box():
    model = StandInModel()
    true_box = (50, 10, 90, 40)
    img = synthetic_image([(2, true_box), (0, (5, 60, 30, 90))], size=(128, 96))
    x = to_tensor([img], model.data_config)
    att = model.tag_attention(x, torch.tensor([2]))[0, 0].numpy()
    box = attention_to_box(att, img.size, threshold=0.5, margin=0.0)
    assert box_iou(box, true_box) > 0.6
    crop = crop_image(img, box, size=16)
    assert crop.size == (16, 16)


# --------------------------------------------------------------------------- cleaning


def test_kmeans_outliers_flags_planted_far_crop():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(2, 16))
    emb = np.concatenate([centers[i % 2] + 0.05 * rng.normal(size=16) for i in range(40)]).reshape(40, 16)
    planted = -centers.mean(axis=0) + 0.05 * rng.normal(size=16)
    emb = np.vstack([emb, planted])
    out, dist = kmeans_outliers(emb, n_clusters=2, fraction=0.1, z=2.0, seed=0)
    assert out[-1] and out.sum() == 1           # only the planted crop: the rest fail the robust gate
    assert dist[-1] == dist.max()
    out0, _ = kmeans_outliers(emb, n_clusters=2, fraction=0.1, z=0.0, seed=0)
    assert out0.sum() == 4                     # pure "farthest fraction" rule


def test_clean_tags_removes_planted_tag_and_respects_min_count():
    rng = np.random.default_rng(2)
    store = CropStore()
    n = 30
    emb = rng.normal(size=(1, 8)) + 0.05 * rng.normal(size=(n, 8))
    emb[7] = -emb[7] * 3                                   # planted: image 7's crop is elsewhere
    probs = np.full(n, 0.9, dtype=np.float32)
    probs[11] = 0.1                                        # model does not see the tag in image 11's crop
    store.add(np.arange(n), np.zeros(n), emb, probs, np.zeros((n, 4)))
    store.add([0, 1], [1, 1], rng.normal(size=(2, 8)), [0.01, 0.01], np.zeros((2, 4)))  # rare tag 1
    arrays = store.arrays()
    assert store.nbytes() == sum(a.nbytes for a in arrays.values())
    res = clean_tags(arrays, np.full(2, 0.5, np.float32), n_clusters=2, outlier_fraction=0.1,
                     outlier_z=2.0, rescore_scale=0.5, min_count=10)
    assert res.removed_pairs(arrays) == {(7, 0), (11, 0)}
    assert res.per_tag[0].cleaned and res.per_tag[0].kept == n - 2
    assert res.per_tag[0].removed_outlier == 1 and res.per_tag[0].removed_score == 1
    assert not res.per_tag[1].cleaned and res.per_tag[1].kept == 2   # too few samples: untouched
    # a skipped tag (e.g. a scene: no region) keeps even its planted pairs
    kept = clean_tags(arrays, np.full(2, 0.5, np.float32), n_clusters=2, outlier_fraction=0.1,
                      outlier_z=2.0, rescore_scale=0.5, min_count=10, skip_tags={0})
    assert kept.removed_pairs(arrays) == set() and not kept.per_tag[0].cleaned and kept.per_tag[0].kept == n


def test_label_precision_recall_judges_only_the_truth_vocabulary():
    """Labels the truth cannot contain (tag 9: an action) are counted apart, not called wrong."""
    from engine_rounds.report import precision_recall

    truth = {"a": {1, 2}, "b": {3}}
    labels = {"a": [1, 9], "b": [3, 4, 9]}
    plain = precision_recall(labels, truth)
    assert (plain["labels"], plain["correct"], plain["truth"]) == (5, 2, 3) and plain["outside_vocabulary"] == 0
    judged = precision_recall(labels, truth, vocabulary={1, 2, 3, 4})
    assert (judged["labels"], judged["correct"], judged["outside_vocabulary"]) == (3, 2, 2)
    assert judged["precision"] == pytest.approx(2 / 3) and judged["recall"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- whole pass


def _corpus(n: int, rng):
    """Images with 1-2 coloured objects; captions name one object and sometimes a wrong colour."""
    samples, parsed, truth = [], {}, {}
    for i in range(n):
        k = 1 + (i % 2)
        classes = rng.choice(4, size=k, replace=False).tolist()
        objs = []
        for j, c in enumerate(classes):
            x0 = int(rng.integers(0, 40)) + 48 * j
            y0 = int(rng.integers(0, 40))
            objs.append((c, (x0, y0, x0 + 40, y0 + 40)))
        img = synthetic_image(objs, size=(136, 96), jitter=int(rng.integers(-10, 10)))
        key = f"s{i:04d}"
        labels = {classes[0]}                               # caption misses the second object
        if i % 5 == 0:
            labels.add(next(c for c in range(4) if c not in classes))   # hallucinated mention
        samples.append(Sample(key, img))
        parsed[key] = sorted(labels)
        truth[key] = set(classes)
    return samples, parsed, truth


def test_engine_core_adds_missing_removes_hallucinated_and_reports(tmp_path):
    samples, parsed, truth = _corpus(80, np.random.default_rng(3))
    images = {s.key: s.image for s in samples}
    cfg = EngineConfig(adapt_epochs=0, batch_size=16, min_count=10, n_clusters=2, captioning=False, report_tags=2,
                       report_crops=3, use_rescore=True)   # the region rules only: no calibration split here
    res = engine_core(StandInModel(), samples, parsed, NAMES, cfg, tmp_path / "engine" / "pretrain.parquet",
                      tmp_path / "report", truth=truth, image_loader=lambda keys: {k: images[k] for k in keys})
    df = pd.read_parquet(tmp_path / "engine" / "pretrain.parquet")
    assert list(df.columns) == ["key", "parse_label_ids", "union_label_ids", "added_ids", "removed_ids"]
    assert len(df) == 80 and res.images == 80
    m = res.metrics
    assert m["parsed"]["recall"] < 0.8 and m["parsed"]["precision"] < 0.95
    assert m["generated"]["recall"] > m["parsed"]["recall"]
    assert m["cleaned"]["precision"] >= 0.95 and m["cleaned"]["recall"] >= 0.9
    assert m["cleaned"]["precision"] > m["parsed"]["precision"] and m["cleaned"]["recall"] > m["parsed"]["recall"]
    # every hallucinated mention was removed
    hallucinated = {(k, t) for k, p in parsed.items() for t in p if t not in truth[k]}
    removed = {(k, t) for k, ids in zip(df["key"], df["removed_ids"]) for t in ids}
    assert hallucinated and hallucinated <= removed
    assert res.pairs == sum(len(set(p) | set(a)) for p, a in zip(df["parse_label_ids"], df["added_ids"]))
    assert (tmp_path / "report" / "crops.png").exists() and res.artifacts["crops_png"].endswith("crops.png")
    report = json.loads((tmp_path / "report" / "engine_report.json").read_text())
    assert report["metrics"]["cleaned"]["precision"] == m["cleaned"]["precision"]
    changes = json.loads((tmp_path / "report" / "tag_changes.json").read_text())
    assert sum(r["added"] for r in changes) == res.added and sum(r["removed"] for r in changes) == res.removed


def test_engine_core_skips_unlabelled_samples_and_switches(tmp_path):
    samples, parsed, _ = _corpus(12, np.random.default_rng(4))
    del parsed[samples[0].key]
    cfg = EngineConfig(adapt_epochs=0, generation=False, cleaning=False, captioning=False, batch_size=5)
    res = engine_core(StandInModel(), samples, parsed, NAMES, cfg, tmp_path / "e.parquet", tmp_path / "r")
    assert res.images == 11 and res.skipped == {"not_in_labels": 1}
    assert res.added == 0 and res.removed == 0 and res.pairs == 0
    df = pd.read_parquet(tmp_path / "e.parquet")
    assert all(list(a) == list(b) for a, b in zip(df["parse_label_ids"], df["union_label_ids"]))


def test_without_a_region_rule_the_pass_computes_no_regions(tmp_path):
    """Cleaning by image score alone needs no crops: the pass skips the regions (the second round)."""
    samples, parsed, _ = _corpus(12, np.random.default_rng(5))
    pairs = {}
    for outliers in (True, False):
        model = StandInModel()
        cfg = EngineConfig(adapt_epochs=0,
                           captioning=False, batch_size=6, min_count=2, report_tags=0, use_outliers=outliers)
        res = engine_core(model, samples, parsed, NAMES, cfg, tmp_path / f"{outliers}.parquet",
                          tmp_path / f"r{outliers}")
        pairs[outliers] = (res.pairs, res.removed_by.get("region"), model.calls)
    assert pairs[True][0] > 0 and pairs[True][1] is not None
    assert pairs[False][:2] == (0, None)
    assert pairs[False][2] == 2       # two batches tagged, no crop re-scored


# --------------------------------------------------------------------------- stage function


def _write_split(root: Path, split: str, samples, parsed, truth, shard_size: int = 20) -> Path:
    """Shards (JPEG + caption + truth) and ``labels/{split}.parquet`` of stand-in samples."""
    import io

    from ramflow_io import formats
    from ramflow_io.shards import ShardWriter

    for shard_i in range(-(-len(samples) // shard_size)):
        with ShardWriter(formats.shard_path(root, split, shard_i)) as w:
            for s in samples[shard_i * shard_size:(shard_i + 1) * shard_size]:
                buf = io.BytesIO()
                s.image.save(buf, format="JPEG", quality=95)
                meta = {"key": s.key, "split": split, "truth": {"tags": [NAMES[c] for c in truth[s.key]]}}
                w.write(s.key, buf.getvalue(), "caption", meta)
    labels = formats.labels_path(root, split)
    labels.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"key": list(parsed), "parse_label_ids": list(parsed.values())}).to_parquet(labels)
    return labels


def _write_label_system(root: Path) -> None:
    from ramflow_io import formats
    from data_engine.label_system import LabelSystem

    ls = LabelSystem()
    for name in NAMES:
        ls.add(name, "object")
    ls.save(formats.label_system_dir(root))


def test_run_engine_on_shards_with_label_system(tmp_path, monkeypatch):
    """``run_engine`` end to end on real shards, labels parquet and label system (stand-in model)."""
    import engine_rounds as engine
    from ramflow_io import formats

    samples, parsed, truth = _corpus(40, np.random.default_rng(5))
    root = tmp_path / "data"
    labels = _write_split(root, "pretrain", samples, parsed, truth)
    _write_label_system(root)
    monkeypatch.setattr(engine, "load_engine_model", lambda path, device="cpu": StandInModel())

    cfg = EngineConfig(adapt_epochs=0, batch_size=8, min_count=8, n_clusters=2, captioning=False, report_tags=2,
                       use_outliers=True)  # the region rule under test (off in the shipped params)
    out = formats.engine_labels_path(root, "pretrain")
    res = engine.run_engine(tmp_path / "ckpt", root, "pretrain", labels, formats.label_system_dir(root), out, cfg,
                            tmp_path / "report")
    assert res.images == 40 and res.skipped == {} and out.exists()
    assert res.metrics["cleaned"]["precision"] > res.metrics["parsed"]["precision"]
    assert res.metrics["cleaned"]["recall"] > res.metrics["parsed"]["recall"]
    assert Path(res.artifacts["crops_png"]).exists()
    # region cleaning applies to the label system's categories in clean_categories only
    scenes_only = cfg.model_copy(update={"clean_categories": ["scene"]})
    res = engine.run_engine(tmp_path / "ckpt", root, "pretrain", labels, formats.label_system_dir(root),
                            tmp_path / "scenes.parquet", scenes_only, tmp_path / "report_scenes")
    assert res.added > 0 and res.removed == 0 and res.tags_cleaned == 0


def test_run_engine_adapts_then_calibrates_on_the_held_out_half_only(tmp_path, monkeypatch):
    """With ``adapt_epochs`` the stage fine-tunes first (here a recording stand-in for the
    trainer), loads the adapted model, and calibrates on the held-out keys alone."""
    import engine_rounds as engine
    import engine_rounds.adapt as adapt
    from ramflow_io import formats
    from ram_model.data import is_validation_key

    root = tmp_path / "data"
    samples, parsed, truth = _corpus(16, np.random.default_rng(7))
    labels = _write_split(root, "pretrain", samples, parsed, truth)
    clean, _, clean_truth = _corpus(24, np.random.default_rng(8))
    clean = [Sample(f"ft{i:03d}", s.image) for i, s in enumerate(clean)]
    clean_truth = {f"ft{i:03d}": t for i, t in enumerate(clean_truth.values())}
    _write_split(root, "finetune", clean, {k: sorted(t) for k, t in clean_truth.items()}, clean_truth)
    _write_label_system(root)
    calls, loaded = [], []

    def fake_adapt(model_dir, data_root, split, epochs, lr, holdout, out_dir, tracking=None):
        calls.append((Path(model_dir).name, split, epochs, lr, holdout, out_dir))
        return out_dir

    monkeypatch.setattr(adapt, "adapt_model", fake_adapt)
    monkeypatch.setattr(engine, "load_engine_model", lambda path, device="cpu": loaded.append(path) or StandInModel())
    cfg = EngineConfig(batch_size=8, min_count=8, n_clusters=2, report_tags=0, adapt_epochs=2, adapt_lr=1e-3,
                       adapt_holdout=0.5, calibration_min_positives=1)
    out = formats.engine_labels_path(root, "pretrain")
    res = engine.run_engine(tmp_path / "prelim", root, "pretrain", labels, formats.label_system_dir(root), out, cfg,
                            tmp_path / "report")
    assert calls == [("prelim", "finetune", 2, 1e-3, 0.5, out.parent / "engine_model")]
    assert loaded == [out.parent / "engine_model"]
    held = sum(is_validation_key(s.key, 0.5) for s in clean)
    assert 0 < held < len(clean)
    assert res.generation["calibration_images"] == held
    assert res.generation["calibration_skipped"] == {"trained_on": len(clean) - held}
    assert res.generation["adapted_model"] == str(out.parent / "engine_model")
    with pytest.raises(FileNotFoundError, match="needs the 'test' split"):
        engine.run_engine(tmp_path / "prelim", root, "pretrain", labels, formats.label_system_dir(root), out,
                          cfg.model_copy(update={"calibration_split": "test"}), tmp_path / "report2")


def test_variants_from_one_pass_match_separate_runs(tmp_path):
    from engine_rounds import engine_variants

    samples, parsed, truth = _corpus(60, np.random.default_rng(6))
    base = EngineConfig(adapt_epochs=0,
                        batch_size=16, min_count=8, n_clusters=2, report_tags=0, use_rescore=True, captioning=True)
    variants = {
        "full": base,
        "generation_only": base.model_copy(update={"cleaning": False}),
        "cleaning_only": base.model_copy(update={"generation": False}),
        "no_captioning": base.model_copy(update={"captioning": False}),
    }
    cap = lambda caps: [[1] for _ in caps]   # noqa: E731 - the caption branch always says "green"
    model = StandInModel()
    together = engine_variants(model, samples, parsed, NAMES, variants,
                               {k: tmp_path / f"{k}.parquet" for k in variants},
                               {k: tmp_path / k for k in variants}, caption_to_ids=cap, truth=truth)
    calls_together = model.calls
    for name in ("full", "cleaning_only"):   # the two that clean different pair sets
        cfg = variants[name]
        alone = engine_core(StandInModel(), samples, parsed, NAMES, cfg, tmp_path / "alone.parquet",
                            tmp_path / "alone", caption_to_ids=cap, truth=truth)
        a = pd.read_parquet(tmp_path / "alone.parquet")
        b = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert [list(x) for x in a["union_label_ids"]] == [list(x) for x in b["union_label_ids"]], name
        assert alone.metrics == together[name].metrics and alone.pairs == together[name].pairs
    assert together["cleaning_only"].added == 0 and together["generation_only"].removed == 0
    assert together["full"].added > together["no_captioning"].added     # the caption branch adds "green"
    assert calls_together < 2 * len(samples)   # one pass: tag_logits per batch + per crop chunk


def test_recall_ceiling_finds_the_best_thresholds_and_bounds_them():
    """Tag 0 ranks its missing positives first; tag 1 ranks a wrong pair above its two missing ones."""
    from engine_rounds.report import recall_ceiling

    truth = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], bool)          # [4 images, 2 tags]
    base = np.array([[1, 1], [0, 0], [0, 0], [0, 0]], bool)           # captions name image 0's tags
    probs = np.array([[0.9, 0.9], [0.8, 0.7], [0.6, 0.1], [0.2, 0.3]])
    exact = recall_ceiling(probs, truth, base, precision=1.0)        # tag 1 can add nothing
    assert exact["reached"] and exact["precision"] == 1.0
    assert exact["labels"].tolist() == [[True, True], [True, False], [True, False], [False, False]]
    assert exact["recall"] == pytest.approx(4 / 6) and exact["recall_upper_bound"] >= exact["recall"] - 1e-9
    loose = recall_ceiling(probs, truth, base, precision=0.8)        # one wrong pair buys two right ones
    assert loose["recall"] == 1.0 and loose["precision"] == pytest.approx(6 / 7)
    assert loose["labels"][:, 1].all() and not loose["labels"][3, 0]
    unreachable = recall_ceiling(probs, truth, ~truth, precision=0.9)  # 2 wrong base labels: P <= 6/8
    assert not unreachable["reached"] and unreachable["precision"] == pytest.approx(0.75)
    assert unreachable["recall_upper_bound"] < 1.0


@pytest.mark.parametrize("seed", range(5))
def test_recall_ceiling_brackets_the_brute_force_best(seed):
    """On random rankings the reachable recall is never above, and the bound never below, the
    best choice of per-class prefixes found by trying them all."""
    from itertools import product

    from engine_rounds.report import recall_ceiling

    rng = np.random.default_rng(seed)
    truth = rng.random((7, 3)) < 0.5
    base = truth & (rng.random((7, 3)) < 0.4)
    probs = rng.random((7, 3)) + 0.5 * truth                         # an informative tagger
    res = recall_ceiling(probs, truth, base, precision=0.8)
    order = np.argsort(-np.where(base, -np.inf, probs), axis=0, kind="stable")
    best = 0.0
    for ks in product(*[range(int((~base[:, j]).sum()) + 1) for j in range(3)]):
        labels = base.copy()
        for j, kj in enumerate(ks):
            labels[order[:kj, j], j] = True
        right, made = (labels & truth).sum(), labels.sum()
        if made and right / made >= 0.8:
            best = max(best, right / truth.sum())
    assert res["reached"] and res["precision"] >= 0.8
    assert res["recall"] <= best + 1e-9 <= res["recall_upper_bound"] + 2e-9


class LeftHalfModel(torch.nn.Module):
    """Tags only what it sees in the image's left half: a mirror image gives another answer."""

    def tag_logits(self, images):                                  # [B, 3, S, S] -> [B, 1]
        return images[:, :1, :, : images.shape[-1] // 2].mean(dim=(1, 2, 3))[:, None] * 10.0


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror():
    from engine_rounds.streaming import tag_probs

    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, :, :2] = 1.0                     # image 0: bright left half; image 1: bright right half
    x[1, 0, :, 2:] = 1.0
    plain, flipped = tag_probs(LeftHalfModel(), x), tag_probs(LeftHalfModel(), x, flip=True)
    left, dark = torch.sigmoid(torch.tensor(10.0)).item(), 0.5
    assert plain[:, 0] == pytest.approx([left, dark])
    assert flipped[:, 0] == pytest.approx([(left + dark) / 2] * 2)  # both views of each image, averaged


def test_tta_flip_changes_nothing_for_mirror_symmetric_evidence(tmp_path):
    """The stand-in tagger counts colour pixels, which a mirror keeps: the labels are the same with
    and without the flip, and calibration and the pass tag each batch twice."""
    from engine_rounds import Calibration

    box = (8, 8, 40, 56)
    calib = [Sample(f"c{i}", synthetic_image([(0, box)], jitter=i)) for i in range(4)]
    samples = [Sample("a", synthetic_image([(0, box), (2, (44, 8, 60, 30))])), Sample("b", synthetic_image([]))]
    out = {}
    for flip in (False, True):
        model = StandInModel()
        cfg = EngineConfig(adapt_epochs=0, cleaning=False, captioning=False, batch_size=2, report_tags=0, tta_flip=flip,
                           calibration_min_positives=2)
        res = engine_core(model, samples, {"a": [], "b": []}, NAMES, cfg, tmp_path / f"{flip}.parquet",
                          tmp_path / f"r{flip}", calibration=Calibration(calib, {s.key: [0] for s in calib}))
        assert res.generation["calibration_images"] == 4
        out[flip] = ([list(v) for v in pd.read_parquet(tmp_path / f"{flip}.parquet")["union_label_ids"]],
                     model.calls)
    assert out[True][0] == out[False][0] and 0 in out[True][0][0]
    assert out[True][1] == 2 * out[False][1] == 6   # calibration (2 batches) and the pass (1 batch), each twice
