"""The data engine (RAM step 3): generate missing tags, then clean wrong ones.

``run_engine`` is the stage function. It loads the preliminary model, the label system and the
parsed labels of a split; optionally fine-tunes the model on half of the clean calibration
split (:mod:`.adapt`); calibrates generation and keep thresholds on the other half
(:mod:`.calibration`); streams the split's shards once (:mod:`.streaming`); removes labels the
image scores too low and clusters each tag's region crops (:mod:`.cleaning`); and writes
``engine/{split}.parquet`` (``key, parse_label_ids, union_label_ids, added_ids, removed_ids``)
and a report (:mod:`.report`): per-step precision/recall against the corpus truth when it
exists, per-tag additions and removals, removals per rule, the generation thresholds and a
picture of kept and removed crops.

:func:`engine_core` does the same from in-memory inputs (model object, sample iterable,
parsed-label mapping), which is what tests and benchmarks drive with a stand-in model.

This package sits above ``data_engine`` (parsing, label system) and ``ram_model`` (the model,
training): it is the one place the data side drives the model (``tests/test_layers.py``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from data_engine.label_system import LabelSystem
from data_engine.parsing import CaptionParser, ParseConfig
from ram_model.registry import load_model
from ramflow_io.formats import list_shards
from ramflow_io.params import stage_config

from . import adapt
from .calibration import Calibration, calibrate, load_calibration
from .cleaning import CleaningResult, clean_tags
from .regions import crop_image
from .report import crop_figure, load_images, load_truth, per_tag_changes, precision_recall, truth_ids, write_json
from .streaming import Sample, StreamOptions, StreamState, iter_shard_samples, stream_labels
from .tag_generation import caption_parser

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "EngineResult", "Calibration", "run_engine", "engine_core", "engine_variants",
           "finish_engine", "Sample"]


class EngineConfig(BaseModel):
    """Settings of the data engine (``engine:`` in params.yaml; it also switches on ``adapt_epochs``,
    which is off here because it needs a trained preliminary model and the calibration split)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    device: str = "cpu"
    batch_size: int = Field(32, ge=1)
    max_images: int | None = Field(None, ge=1, description="cap on images processed (benchmarks)")
    # generation
    generation: bool = True
    captioning: bool = Field(False, description="also parse the generation branch's captions (on the embedded "
                             "corpus their tags were 50% wrong for colours, 29% for objects)")
    margin: float = Field(0.1, description="add a tag when prob >= class threshold + margin (the rule for "
                          "classes that generation_precision cannot calibrate)")
    generation_precision: float | None = Field(
        0.95, gt=0, le=1, description="per-class generation thresholds set for this precision on the "
        "calibration split (None: threshold + margin for every class)")
    generation_pooled: bool = Field(
        True, description="one generation threshold for every calibrated class, set on their pooled calibration "
        "predictions (False: one per class, each at generation_precision; see tag_generation.precision_thresholds)")
    calibration_split: str = Field("finetune", description="split with complete, correct captions whose parsed "
                                   "labels calibrate generation")
    calibration_min_positives: int = Field(5, ge=1, description="fewer positives there: threshold + margin")
    keep_quantile: float | None = Field(
        0.1, ge=0, lt=1, description="flag a label the image scores below this quantile of the class's "
        "probabilities on calibration positives (None: no flags)")
    keep_above_threshold: bool = Field(True, description="never flag a label the model scores at or above its "
                                       "class threshold (the keep threshold is capped there)")
    adapt_epochs: int = Field(5, ge=0, description="first fine-tune the preliminary model this many epochs on "
                              "the part of the calibration split not held out (0: use it as is)")
    adapt_lr: float = Field(5e-4, gt=0)
    adapt_holdout: float = Field(0.5, gt=0, lt=1, description="fraction of the calibration split kept out of "
                                 "the adaptation: only these images calibrate")
    tta_flip: bool = Field(False, description="tag probabilities (calibration, generation, image-score cleaning) "
                           "averaged over the image and its mirror image; one more forward pass per batch")
    # regions
    attention_threshold: float = Field(0.5, gt=0, le=1, description="mask = attention >= this * max")
    region_margin: float = Field(0.15, ge=0, description="box expansion, fraction of its size per side")
    # cleaning
    cleaning: bool = True
    n_clusters: int = Field(3, ge=1)
    outlier_fraction: float = Field(0.1, ge=0, le=1, description="farthest fraction of a tag's crops = candidates")
    outlier_z: float = Field(2.0, ge=0, description="candidates also beyond median + z * MAD (0: all candidates)")
    rescore_scale: float = Field(0.5, ge=0, description="remove when crop prob < this * class threshold")
    min_cluster_fraction: float = Field(0.05, ge=0, le=1, description="smaller k-means clusters are outliers")
    use_outliers: bool = Field(False, description="region rule: remove k-means outlier crops (80-91% of "
                               "those removed were right labels here; on, every crop is embedded)")
    use_rescore: bool = Field(False, description="region rule: remove when the crop's prob < rescore_scale * "
                              "class threshold (on the embedded corpus 80% of its removals were right labels)")
    use_image_score: bool = Field(True, description="cleaning also removes labels flagged by keep_quantile")
    min_count: int = Field(20, ge=1, description="tags with fewer pairs are not cleaned")
    clean_categories: list[str] | None = Field(
        ["object"], description="label-system categories that region cleaning applies to (None: all). Scenes "
        "are whole-image tags: a crop of a beach photo is not a beach, so rescoring crops removed 464 scene "
        "labels of the embedded corpus, none of them wrong")
    # report
    report_tags: int = Field(4, ge=0)
    report_crops: int = Field(6, ge=1)


class EngineResult(BaseModel):
    out_path: str
    images: int
    pairs: int
    skipped: dict[str, int]
    added: int
    removed: int
    tags_cleaned: int
    removed_by: dict[str, int] = Field(default_factory=dict, description="removals per cleaning rule")
    images_per_s: float
    generation: dict[str, Any] = Field(default_factory=dict, description="how generation thresholds were set")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict, description="per step, vs truth")
    artifacts: dict[str, str] = Field(default_factory=dict)


def _check_model(model, names: Sequence[str], cfgs: Sequence[EngineConfig]) -> list[EngineConfig]:
    """The model's tag set must be the label system (class i = label id i); captioning needs a
    model built with its caption branch (else that switch is turned off, with a warning)."""
    tag_names = getattr(model, "tag_names", None)
    if tag_names is not None and list(tag_names) != list(names):
        raise ValueError(f"model tag set ({len(tag_names)} tags) differs from the label system ({len(names)}): "
                         "the engine needs the preliminary model trained on this label system")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "caption", True) is False:
        if any(c.captioning for c in cfgs):
            log.warning("model has no caption branch: captioning switched off")
        return [c.model_copy(update={"captioning": False}) for c in cfgs]
    return list(cfgs)


def _thresholds(model, num_classes: int) -> np.ndarray:
    thr = getattr(model, "thresholds", None)
    if thr is None:
        log.warning("model has no per-class thresholds: using 0.5 for every class")
        return np.full(num_classes, 0.5, dtype=np.float32)
    thr = np.asarray(thr.detach().cpu() if isinstance(thr, torch.Tensor) else thr, dtype=np.float32)
    if thr.shape != (num_classes,):
        raise ValueError(f"model thresholds shape {thr.shape} != ({num_classes},)")
    return thr


def _figure_rows(state: StreamState, arrays: dict, cleaning: CleaningResult, names: Sequence[str],
                 cfg: EngineConfig, image_loader: Callable[[set[str]], Mapping[str, Image.Image]] | None):
    """Pick the tags with the most removals; crop kept and removed examples for the figure."""
    tags = sorted((t for t in cleaning.per_tag.values() if t.cleaned and t.removed > 0),
                  key=lambda t: -t.removed)[: cfg.report_tags]
    if not tags or image_loader is None:
        return []
    chosen: list[tuple[str, list[int], list[int]]] = []
    for t in tags:
        idx = np.flatnonzero(arrays["tag"] == t.tag)
        removed = idx[cleaning.remove[idx]]
        kept = idx[~cleaning.remove[idx]]
        # most confidently removed first; kept ones closest to their centroid first
        removed = removed[np.argsort(-np.nan_to_num(cleaning.distance[removed], nan=0.0))][: cfg.report_crops]
        kept = kept[np.argsort(np.nan_to_num(cleaning.distance[kept], nan=0.0))][: cfg.report_crops]
        chosen.append((names[t.tag] if t.tag < len(names) else str(t.tag), kept.tolist(), removed.tolist()))
    keys = {state.keys[arrays["image"][i]] for _, k, r in chosen for i in (*k, *r)}
    images = image_loader(keys)

    def crops(pairs: list[int]) -> list[Image.Image]:
        out = []
        for i in pairs:
            img = images.get(state.keys[arrays["image"][i]])
            if img is not None:
                out.append(crop_image(img, tuple(arrays["box"][i].tolist())))
        return out

    return [(name, crops(k), crops(r)) for name, k, r in chosen]


def _stream_options(variants: Sequence[EngineConfig]) -> StreamOptions:
    """One streaming pass that serves every variant (the superset of their switches)."""
    first = variants[0]
    shared = ("batch_size", "margin", "generation_precision", "generation_pooled", "calibration_split",
              "calibration_min_positives", "keep_quantile", "keep_above_threshold", "adapt_epochs", "adapt_lr",
              "adapt_holdout", "attention_threshold", "region_margin", "max_images", "device", "seed", "tta_flip")
    for v in variants[1:]:
        diff = [k for k in shared if getattr(v, k) != getattr(first, k)]
        if diff:
            raise ValueError(f"variants sharing one pass must agree on {diff}")
    return StreamOptions(
        batch_size=first.batch_size, generation=any(v.generation for v in variants),
        captioning=any(v.generation and v.captioning for v in variants),
        regions=any(v.cleaning and (v.use_outliers or v.use_rescore) for v in variants), margin=first.margin,
        attention_threshold=first.attention_threshold, region_margin=first.region_margin,
        max_images=first.max_images, flip=first.tta_flip,
    )


def _variant_union(g, cfg: EngineConfig) -> set[int]:
    """A variant's pre-cleaning labels from the superset pass (captions belong to generation)."""
    out = set(g.parsed)
    if cfg.generation:
        out |= set(g.by_tagging)
        if cfg.captioning:
            out |= set(g.by_caption)
    return out


def engine_variants(
    model,
    samples: Iterable[Sample],
    parsed: Mapping[str, Sequence[int]],
    names: Sequence[str],
    variants: Mapping[str, EngineConfig],
    out_paths: Mapping[str, Path],
    report_dirs: Mapping[str, Path],
    caption_to_ids: Callable[[list[str]], list[list[int]]] | None = None,
    truth: Mapping[str, set[int]] | Callable[[set[str]], Mapping[str, set[int]]] | None = None,
    image_loader: Callable[[set[str]], Mapping[str, Image.Image]] | None = None,
    total: int | None = None,
    extra_skipped: Counter | None = None,
    categories: Sequence[str] | None = None,
    calibration: Calibration | None = None,
) -> dict[str, EngineResult]:
    """Several engine variants (e.g. ablations) from ONE streaming pass over the samples.

    ``categories`` (one per tag, from the label system) select the tags that cleaning applies
    to (``EngineConfig.clean_categories``); without them every tag is cleaned.

    The pass computes everything any variant needs (model tags, caption tags, regions of every
    candidate tag); each variant then takes its own labels and cleans its own pairs, exactly as
    if it had run alone (same per-pair regions, embeddings and scores).
    """
    variants = dict(zip(variants, _check_model(model, names, list(variants.values()))))
    cfgs = list(variants.values())
    torch.manual_seed(cfgs[0].seed)
    thresholds = _thresholds(model, len(names))
    options = _stream_options(cfgs)  # checks that the variants agree on the generation rule
    add_at, keep_at, generation = calibrate(model, cfgs[0], thresholds, names, calibration)
    options.add_thresholds, options.keep_thresholds = add_at, keep_at
    state = stream_labels(model, samples, parsed, thresholds, options, caption_to_ids,
                          torch.device(cfgs[0].device), total)
    skipped = Counter(state.skipped) + Counter(extra_skipped or {})
    if callable(truth):  # evaluation only, read after the pass for the processed keys
        truth = truth(set(state.keys))
    return {
        name: finish_engine(state, thresholds, names, cfg, Path(out_paths[name]), Path(report_dirs[name]),
                            truth, image_loader, skipped, categories, generation)
        for name, cfg in variants.items()
    }


def engine_core(
    model,
    samples: Iterable[Sample],
    parsed: Mapping[str, Sequence[int]],
    names: Sequence[str],
    cfg: EngineConfig,
    out_path: Path,
    report_dir: Path,
    caption_to_ids: Callable[[list[str]], list[list[int]]] | None = None,
    truth: Mapping[str, set[int]] | None = None,
    image_loader: Callable[[set[str]], Mapping[str, Image.Image]] | None = None,
    total: int | None = None,
    extra_skipped: Counter | None = None,
    calibration: Calibration | None = None,
) -> EngineResult:
    """Generation + cleaning + outputs from in-memory inputs (``run_engine`` without loading)."""
    return engine_variants(model, samples, parsed, names, {"engine": cfg}, {"engine": out_path},
                           {"engine": report_dir}, caption_to_ids, truth, image_loader, total,
                           extra_skipped, calibration=calibration)["engine"]


def _skipped_tags(categories: Sequence[str] | None, wanted: Sequence[str] | None) -> frozenset[int]:
    """Tag ids whose category is not cleaned (none without categories or a category filter)."""
    if categories is None or wanted is None:
        return frozenset()
    wanted = set(wanted)
    return frozenset(i for i, c in enumerate(categories) if c not in wanted)


def finish_engine(
    state: StreamState,
    thresholds: np.ndarray,
    names: Sequence[str],
    cfg: EngineConfig,
    out_path: Path,
    report_dir: Path,
    truth: Mapping[str, set[int]] | None = None,
    image_loader: Callable[[set[str]], Mapping[str, Image.Image]] | None = None,
    skipped: Counter | None = None,
    categories: Sequence[str] | None = None,
    generation: dict[str, Any] | None = None,
) -> EngineResult:
    """Cleaning, engine parquet and report of one variant, from a finished streaming pass."""
    unions = [_variant_union(g, cfg) for g in state.labels]
    n_pairs = 0
    removed: dict[int, set[int]] = {}
    artifacts: dict[str, str] = {}
    per_tag_rows: list[dict] = []
    removed_by: dict[str, int] = {}
    n_clean = 0
    if cfg.cleaning and state.pairs:
        full = state.store.arrays()
        c = len(names)
        wanted = np.fromiter((i * c + t for i, u in enumerate(unions) for t in u), dtype=np.int64)
        mask = np.isin(full["image"].astype(np.int64) * c + full["tag"], wanted)   # [P] this variant's pairs
        arrays = {k: v[mask] for k, v in full.items()}
        n_pairs = int(mask.sum())
        cleaning = clean_tags(
            arrays, thresholds, n_clusters=cfg.n_clusters, outlier_fraction=cfg.outlier_fraction,
            outlier_z=cfg.outlier_z, rescore_scale=cfg.rescore_scale, min_count=cfg.min_count,
            min_cluster_fraction=cfg.min_cluster_fraction,
            use_outliers=cfg.use_outliers, use_rescore=cfg.use_rescore, seed=cfg.seed,
            skip_tags=_skipped_tags(categories, cfg.clean_categories),
        )
        for img, tag in cleaning.removed_pairs(arrays):
            removed.setdefault(img, set()).add(tag)
        per_tag_rows = [
            {"tag": names[t.tag] if t.tag < len(names) else str(t.tag), "id": t.tag, "count": t.count,
             "cleaned": t.cleaned, "kept": t.kept, "removed_outlier": t.removed_outlier,
             "removed_score": t.removed_score}
            for t in sorted(cleaning.per_tag.values(), key=lambda t: -t.count)
        ]
        removed_by["region"] = sum(len(v) for v in removed.values())
        if cfg.report_tags:
            rows = _figure_rows(state, arrays, cleaning, names, cfg, image_loader)
            if rows:
                artifacts["crops_png"] = str(crop_figure(rows, report_dir / "crops.png", cfg.report_crops))
        n_clean = sum(t.cleaned for t in cleaning.per_tag.values())

    if cfg.cleaning and cfg.use_image_score:  # whole-image score below the class's keep threshold
        flagged = 0
        for row, (g, union) in enumerate(zip(state.labels, unions)):
            low = set(g.low_score) & (union - removed.get(row, set()))
            if low:
                removed.setdefault(row, set()).update(low)
                flagged += len(low)
        removed_by["image_score"] = flagged

    records = []
    for row, (key, g, union) in enumerate(zip(state.keys, state.labels, unions)):
        rm = removed.get(row, set())
        records.append({
            "key": key,
            "parse_label_ids": g.parsed,
            "union_label_ids": sorted(union - rm),
            "added_ids": sorted(union - set(g.parsed)),
            "removed_ids": sorted(rm),
        })
    df = pd.DataFrame.from_records(
        records, columns=["key", "parse_label_ids", "union_label_ids", "added_ids", "removed_ids"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out_path, index=False)

    metrics: dict[str, dict[str, float]] = {}
    by_key = {r["key"]: r for r in records}
    if truth:
        truth = {k: v for k, v in truth.items() if k in by_key}
        steps = {
            "parsed": {k: r["parse_label_ids"] for k, r in by_key.items()},
            "generated": {k: sorted(set(r["parse_label_ids"]) | set(r["added_ids"])) for k, r in by_key.items()},
            "cleaned": {k: r["union_label_ids"] for k, r in by_key.items()},
        }
        vocabulary = set().union(*truth.values()) if truth else set()
        metrics = {step: precision_recall(labels, truth, vocabulary) for step, labels in steps.items()}
        for step, m in metrics.items():
            log.info("labels %-9s precision %.4f recall %.4f (%d labels)", step, m["precision"], m["recall"],
                     m["labels"])
    changes = per_tag_changes(
        {k: r["added_ids"] for k, r in by_key.items()}, {k: r["removed_ids"] for k, r in by_key.items()},
        names, truth or None)
    result = EngineResult(
        out_path=str(out_path), images=state.images, pairs=n_pairs, skipped=dict(skipped or {}),
        added=sum(len(r["added_ids"]) for r in records), removed=sum(len(r["removed_ids"]) for r in records),
        tags_cleaned=n_clean, removed_by=removed_by, images_per_s=state.images / max(state.seconds, 1e-9),
        generation={k: v for k, v in (generation or {}).items() if k != "thresholds"}, metrics=metrics,
        artifacts=artifacts,
    )
    if generation and "thresholds" in generation:
        artifacts["generation_thresholds_json"] = str(
            write_json(report_dir / "generation_thresholds.json", generation["thresholds"]))
    artifacts["tag_changes_json"] = str(write_json(report_dir / "tag_changes.json", changes))
    artifacts["cleaning_json"] = str(write_json(report_dir / "cleaning_per_tag.json", per_tag_rows))
    artifacts["report_json"] = str(report_dir / "engine_report.json")
    result.artifacts = artifacts
    write_json(report_dir / "engine_report.json", {"config": cfg.model_dump(), **result.model_dump()})
    return result


def load_engine_model(model_ckpt: Path, device: str = "cpu"):
    """The tagger of an engine round (a ramflow model folder), in eval mode on ``device``."""
    return load_model(Path(model_ckpt)).to(torch.device(device)).eval()


def _caption_parser(label_system) -> Callable[[list[str]], list[list[int]]]:
    """captions -> label ids through the project's caption parser and the label system.

    The parser is configured by the ``parse:`` section of params.yaml, like the parse stage,
    so a generated caption is read exactly as a web caption is.
    """
    parser = CaptionParser(stage_config(ParseConfig, "parse"), extra_compounds=label_system.compounds())
    return caption_parser(lambda caps: [p.tags for p in parser.parse_batch(caps)], label_system.to_ids)


def run_engine(
    model_ckpt: Path,
    data_root: Path,
    split: str,
    labels_path: Path,
    label_system_dir: Path,
    out_path: Path,
    cfg: EngineConfig,
    report_dir: Path,
    tracking: Mapping[str, Any] | None = None,
) -> EngineResult:
    """Stage function: engine labels for ``split`` (see the module docstring). ``tracking``
    (``tracking_uri``, ``experiment``, ``parent_run_id``) goes to the adaptation's MLflow run."""
    return run_engine_variants(model_ckpt, data_root, split, labels_path, label_system_dir,
                               {"engine": cfg}, {"engine": out_path}, {"engine": report_dir}, tracking)["engine"]


def run_engine_variants(
    model_ckpt: Path,
    data_root: Path,
    split: str,
    labels_path: Path,
    label_system_dir: Path,
    variants: Mapping[str, EngineConfig],
    out_paths: Mapping[str, Path],
    report_dirs: Mapping[str, Path],
    tracking: Mapping[str, Any] | None = None,
) -> dict[str, EngineResult]:
    """Like :func:`run_engine` for several configs sharing one pass (ablations)."""
    shards = list_shards(data_root, split)
    if not shards:
        raise FileNotFoundError(f"no shards for split {split!r} under {data_root}")
    cfgs = list(variants.values())
    calibration = load_calibration(data_root, cfgs[0])
    if calibration is not None:
        # images the preliminary model trained on (its clean_mix) cannot calibrate its thresholds
        calibration.exclude = frozenset(adapt.mixed_in(Path(model_ckpt), cfgs[0].calibration_split, calibration.labels))
    if cfgs[0].adapt_epochs > 0:
        if calibration is None:
            raise FileNotFoundError(f"adapt_epochs > 0 needs the {cfgs[0].calibration_split!r} split and its labels")
        model_ckpt = adapt.adapt_model(Path(model_ckpt), Path(data_root), cfgs[0].calibration_split,
                                       cfgs[0].adapt_epochs, cfgs[0].adapt_lr, cfgs[0].adapt_holdout,
                                       Path(next(iter(out_paths.values()))).parent / "engine_model", tracking)
        calibration.exclude |= frozenset(adapt.trained_on(calibration.labels, cfgs[0].adapt_holdout))
        calibration.adapted_model = str(model_ckpt)
    model = load_engine_model(model_ckpt, cfgs[0].device)
    label_system = LabelSystem.load(Path(label_system_dir))
    names = list(label_system.names)
    labels = pd.read_parquet(labels_path, columns=["key", "parse_label_ids"])
    parsed = {k: [int(i) for i in ids] for k, ids in zip(labels["key"], labels["parse_label_ids"])}
    wants_captions = any(c.generation and c.captioning for c in cfgs)
    caption_to_ids = _caption_parser(label_system) if wants_captions else None

    def truth_for(keys: set[str]) -> dict[str, set[int]] | None:
        """Evaluation only: truth of the processed keys, read after the engine pass."""
        raw_truth = load_truth(shards, keys)
        if not raw_truth:
            return None
        truth, oov = truth_ids(raw_truth, label_system.id_of)
        log.info("truth for %d images (%d truth tags outside the label system)", len(truth), oov)
        return truth

    skipped: Counter = Counter()
    return engine_variants(
        model, iter_shard_samples(shards, skipped), parsed, names, variants, out_paths, report_dirs,
        caption_to_ids=caption_to_ids, truth=truth_for,
        image_loader=lambda keys: load_images(shards, keys), total=len(parsed), extra_skipped=skipped,
        categories=[label_system.category(i) for i in range(len(names))], calibration=calibration,
    )
