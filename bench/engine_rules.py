"""Which engine rule turns a tagger's probabilities into the best training labels.

The engine decides each (image, tag) label of the pretrain split from its tagger's probability
and whether the caption names the tag: it adds a tag above its generation threshold and drops a
label scored below its keep threshold (:mod:`engine_rounds.tag_generation`). Both thresholds
are set on the calibration images. This bench scores one engine tagger (a folder the engine
saved, ``engine/engine_model`` or ``engine_refined/engine_model``) once on the pretrain split
and on the calibration images it never trained on, with and without the mirror image
(``tta_flip``). It then applies the engine's own threshold functions with several settings side
by side, and reports label precision and recall against the corpus truth over the tags the
truth can contain, as the engine's report does.

Region outliers are not part of these rules. With ``--labels`` (that engine pass's
``pretrain.parquet``, made with the same tagger and rule), the labels the rule keeps but the pass
dropped are its region removals, and the bench counts how many of them were right.

Usage::

    .venv/bin/python bench/engine_rules.py --model data/engine_refined/engine_model \\
        --labels data/engine_refined/pretrain.parquet --params params.yaml --section engine_refined
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ramflow_io import formats  # noqa: E402
from engine_rounds import EngineConfig, load_engine_model  # noqa: E402
from engine_rounds.adapt import mixed_in, trained_on  # noqa: E402
from engine_rounds.streaming import iter_shard_samples, score_samples  # noqa: E402
from engine_rounds.tag_generation import keep_thresholds, precision_thresholds  # noqa: E402
from engine_rounds.report import load_truth, truth_ids  # noqa: E402
from data_engine.label_system import LabelSystem  # noqa: E402
from orchestration.pipeline import ENGINE_STAGES, stage_spec  # noqa: E402
from orchestration.stages import engine_round_config  # noqa: E402

log = logging.getLogger("engine_rules")


def label_matrix(ids_by_key: dict, keys: list[str], num_classes: int) -> np.ndarray:
    """``[N, C]`` bool: row i holds the ids of ``keys[i]``."""
    out = np.zeros((len(keys), num_classes), dtype=bool)
    for row, key in enumerate(keys):
        ids = [int(i) for i in ids_by_key.get(key, ()) if 0 <= int(i) < num_classes]
        out[row, ids] = True
    return out


def rule_labels(probs, parsed, calib_probs, calib_labels, thresholds, cfg: EngineConfig, pooled: bool,
                target: float, keep_quantile: float) -> np.ndarray:
    """The engine's generation and image-score rules on a whole split at once: ``[N, C]`` labels.

    A label is kept when the caption names it or the tag passes its generation threshold, and
    the image does not score it below its keep threshold (the class threshold at most).
    """
    add_at, _ = precision_thresholds(calib_probs, calib_labels, target, thresholds + cfg.margin,
                                     cfg.calibration_min_positives, pooled=pooled)        # [C]
    keep_at = np.minimum(keep_thresholds(calib_probs, calib_labels, keep_quantile,
                                         cfg.calibration_min_positives), thresholds)      # [C]
    return ((probs >= add_at) | parsed) & (probs >= keep_at)


def precision_recall(labels: np.ndarray, truth: np.ndarray, vocab: np.ndarray) -> tuple[float, float]:
    right = (labels & truth)[:, vocab].sum()
    return float(right / max(labels[:, vocab].sum(), 1)), float(right / max(truth[:, vocab].sum(), 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an engine tagger folder")
    ap.add_argument("--root", type=Path, default=Path("data"))
    ap.add_argument("--labels", type=Path, help="the engine pass's labels made with this tagger")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--section", default="engine", help="engine_refined: engine with it over it")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/engine_rules"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # the round whose last params section is --section, configured by the pipeline's own merge rule
    rounds = {stage_spec(s).params[-1]: s for s in ENGINE_STAGES}
    if args.section not in rounds:
        ap.error(f"--section must be one of {', '.join(rounds)}")
    cfg: EngineConfig = engine_round_config(args.params, rounds[args.section])
    start = time.perf_counter()

    system = LabelSystem.load(formats.label_system_dir(args.root))
    c = len(system.names)
    model = load_engine_model(args.model)
    thresholds = np.asarray(model.thresholds.detach().cpu(), dtype=np.float64)           # [C]
    shards = formats.list_shards(args.root, "pretrain")
    calib_table = pd.read_parquet(formats.labels_path(args.root, cfg.calibration_split))
    calib_ids = dict(zip(calib_table["key"], calib_table["parse_label_ids"]))
    skip = set(trained_on(calib_ids, cfg.adapt_holdout)) | mixed_in(args.model, cfg.calibration_split, calib_ids)
    probs, calib = {}, {}
    for flip in (False, True):
        keys, probs[flip] = score_samples(model, iter_shard_samples(shards, Counter()), cfg.batch_size, flip=flip)
        calib_samples = (s for s in iter_shard_samples(formats.list_shards(args.root, cfg.calibration_split),
                                                       Counter()) if s.key in calib_ids and s.key not in skip)
        calib_keys, calib[flip] = score_samples(model, calib_samples, cfg.batch_size, flip=flip)
    calib_labels = label_matrix(calib_ids, calib_keys, c)                                 # [M, C]
    truth = label_matrix(truth_ids(load_truth(shards, set(keys)), system.id_of)[0], keys, c)  # [N, C]
    parsed_table = pd.read_parquet(formats.labels_path(args.root, "pretrain"))
    parsed = label_matrix(dict(zip(parsed_table["key"], parsed_table["parse_label_ids"])), keys, c)
    vocab = truth.any(0)
    scored = time.perf_counter() - start

    rows = [{"rule": "parsed labels", **dict(zip(("precision", "recall"), precision_recall(parsed, truth, vocab)))}]
    for flip, pooled, target, quantile in itertools.product((False, True), (False, True), (0.94, 0.95, 0.96),
                                                            (0.05, 0.1)):
        labels = rule_labels(probs[flip], parsed, calib[flip], calib_labels, thresholds, cfg, pooled, target,
                             quantile)
        p, r = precision_recall(labels, truth, vocab)
        rows.append({"tta_flip": flip, "generation_pooled": pooled, "generation_precision": target,
                     "keep_quantile": quantile, "precision": p, "recall": r})
    result = {"model": str(args.model), "section": args.section, "images": len(keys),
              "calibration_images": len(calib_keys), "truth_labels": int(truth[:, vocab].sum()),
              "scoring_seconds": round(scored, 1), "rules": rows}
    if args.labels:  # this pass's region removals: kept by its own rule, absent from its labels
        engine = pd.read_parquet(args.labels)
        done = label_matrix(dict(zip(engine["key"], engine["union_label_ids"])), keys, c)
        own = rule_labels(probs[cfg.tta_flip], parsed, calib[cfg.tta_flip], calib_labels, thresholds, cfg,
                          cfg.generation_pooled, cfg.generation_precision, cfg.keep_quantile)
        removed = (own & ~done)[:, vocab]
        result["region_removed"] = {"labels": int(removed.sum()), "right": int((removed & truth[:, vocab]).sum()),
                                    "not_in_rule": int((done & ~own)[:, vocab].sum())}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = args.model.parent.name
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = ["| tta_flip | pooled | generation precision | keep quantile | label precision | label recall |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.get('tta_flip', '-')} | {r.get('generation_pooled', '-')} | {r.get('generation_precision', '-')} "
              f"| {r.get('keep_quantile', '-')} | {r['precision']:.4f} | {r['recall']:.4f} |" for r in rows]
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    log.info("%s (%d images, scored in %.0fs):\n%s\nregion removals: %s", args.model, len(keys), scored,
             "\n".join(lines), result.get("region_removed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
