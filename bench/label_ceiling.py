"""How far per-class thresholds on a tagger can lift the training labels' recall at a precision.

Issue 5 sets the engine a goal: labels with precision >= 0.95 and recall >= 0.90. The engine adds
a tag where its tagger's probability passes a per-class threshold, so the tagger bounds what
any threshold rule can reach. This bench measures that bound for three taggers side by side:

- ``engine_model``: the engine's tagger (the preliminary model adapted on clean data,
  ``engine/engine_model``), what the pipeline really uses;
- ``preliminary``: the preliminary model (``models/preliminary_model``);
- ``truth_trained``: the preliminary recipe trained on the pretrain split's *true* tags (its
  caption branch still learns from the captions): the tagger a perfect engine would converge
  to with this model and budget.

All three are scored on the ``test`` split, which none was trained on; its caption labels
(``labels/test.parquet``) are the base the tagger adds to, as the pretrain captions are for the
engine. :func:`engine_rounds.report.recall_ceiling` then chooses every class's threshold
on the truth (an oracle the engine does not have) and gives the best recall reached at
``--precision`` and an upper bound that no threshold choice exceeds, once with the captions'
labels as they are and once with their wrong labels removed (a perfect cleaner). Only the tags
the pretrain truth can contain are scored, as in the engine's report.

Usage::

    .venv/bin/python bench/label_ceiling.py --root data --out-dir bench/results/label_ceiling
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablation import parse_overrides  # noqa: E402  (bench/ is on sys.path: this runs as a script)
from ramflow_io import formats  # noqa: E402
from engine_rounds.report import load_truth, recall_ceiling, truth_ids  # noqa: E402
from data_engine.label_system import LabelSystem  # noqa: E402
from ramflow_io.params import stage_config  # noqa: E402

log = logging.getLogger("label_ceiling")

CATEGORIES = ("object", "attribute", "scene")


def write_truth_labels(root: Path, truth: dict[str, set[int]], out_path: Path) -> dict[str, int]:
    """``labels/pretrain.parquet`` with ``union_label_ids`` set to each image's true tags.

    The trainer tags on ``union_label_ids`` and captions on ``parse_label_ids``, so the
    caption branch keeps learning from the captions. ``truth``: key -> true tag ids. Returns
    counts (images written, images without truth).
    """
    table = pq.read_table(formats.labels_path(root, "pretrain"), columns=["key", "parse_label_ids"]).to_pydict()
    keep = [i for i, k in enumerate(table["key"]) if k in truth]
    out = pa.table({
        "key": [table["key"][i] for i in keep],
        "parse_label_ids": [table["parse_label_ids"][i] for i in keep],
        "union_label_ids": [sorted(truth[table["key"][i]]) for i in keep],
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, out_path)
    return {"images": len(keep), "without_truth": len(table["key"]) - len(keep)}


def train_truth_tagger(root: Path, params: str | None, overrides: dict, out_dir: Path, labels: Path) -> Path:
    """The preliminary recipe on true tags; no missing-label rejection (nothing is missing)."""
    from ram_model.train_stage import TrainStageConfig, train_stage

    cfg = stage_config(TrainStageConfig, "preliminary_model", params,
                       **{"missing_label_rejection": 0.0, **overrides})
    t0 = time.perf_counter()
    result = train_stage(cfg, root, out_dir, labels)
    log.info("trained the truth tagger in %.0fs -> %s", time.perf_counter() - t0, result.checkpoint)
    return out_dir


def score_split(model_dir: Path, root: Path, split: str, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
    """Keys and tag probabilities ``[N, C]`` of every readable image of ``split``."""
    from collections import Counter

    import torch

    from engine_rounds.streaming import iter_shard_samples, score_samples
    from ram_model.registry import load_model

    model = load_model(model_dir).eval()
    skipped: Counter = Counter()
    with torch.inference_mode():
        keys, probs = score_samples(model, iter_shard_samples(formats.list_shards(root, split), skipped), batch_size)
    if skipped:
        log.warning("%s: skipped %s", split, dict(skipped))
    return keys, probs


def ceiling_rows(name: str, probs: np.ndarray, truth: np.ndarray, captions: np.ndarray,
                 categories: np.ndarray, precision: float) -> list[dict]:
    """One row per base (captions as they are / a perfect cleaner) for one tagger's ``probs``."""
    from ram_model.evaluate import per_class_ap

    ap = per_class_ap(probs, truth.astype(np.float32))
    rows = []
    for base_name, base in (("captions", captions), ("captions, wrong removed", captions & truth)):
        res = recall_ceiling(probs, truth, base, precision)
        right = res["labels"] & truth
        rows.append({
            "tagger": name, "base": base_name, "test_mAP": float(np.nanmean(ap)),
            "reached": bool(res["reached"]), "precision": float(res["precision"]), "recall": float(res["recall"]),
            "recall_upper_bound": float(res["recall_upper_bound"]),
            **{f"recall_{c}": float(right[:, categories == c].sum() / max(truth[:, categories == c].sum(), 1))
               for c in CATEGORIES},
        })
    return rows


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict], base: dict, out_dir: Path, precision: float) -> Path:
    cols = ["tagger", "base", "test_mAP", "reached", "precision", "recall", "recall_upper_bound",
            *(f"recall_{c}" for c in CATEGORIES)]
    lines = [f"Target precision {precision}. Test caption labels alone: precision {base['precision']:.4f}, "
             f"recall {base['recall']:.4f} ({base['images']} images, {base['classes']} tags).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    md = out_dir / "label_ceiling.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "label_ceiling.json").write_text(json.dumps({"captions": base, "rows": rows}, indent=2), encoding="utf-8")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("data"))
    ap.add_argument("--params", default=None)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/label_ceiling"))
    ap.add_argument("--truth-trained", type=Path, help="reuse this truth-trained model folder")
    ap.add_argument("--tagger", nargs="*", default=[], help="more taggers to score, name=model_dir")
    ap.add_argument("--train-set", nargs="*", default=[], help="truth tagger training overrides key=value")
    ap.add_argument("--precision", type=float, default=0.95)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root, out = args.root, args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ls = LabelSystem.load(formats.label_system_dir(root))
    pretrain_truth, oov = truth_ids(load_truth(formats.list_shards(root, "pretrain")), ls.id_of)
    log.info("pretrain truth: %d images, %d truth names the label system lacks", len(pretrain_truth), oov)

    taggers = {"engine_model": formats.engine_labels_path(root, "pretrain").parent / "engine_model",
               "preliminary": formats.model_dir(root, "preliminary_model")}
    taggers = {k: v for k, v in taggers.items() if (v / "model.pt").exists()}
    taggers.update({k: Path(v) for k, v in (p.split("=", 1) for p in args.tagger)})
    if args.truth_trained:
        taggers["truth_trained"] = args.truth_trained
    else:
        labels = out / "truth_labels" / "pretrain.parquet"
        log.info("truth labels: %s", write_truth_labels(root, pretrain_truth, labels))
        taggers["truth_trained"] = train_truth_tagger(root, args.params, parse_overrides(args.train_set),
                                                      out / "models" / "truth_trained", labels)

    # The scored tags: those the pretrain truth contains (test also holds the open-set classes).
    vocab = sorted(set().union(*pretrain_truth.values()))
    test_truth, _ = truth_ids(load_truth(formats.list_shards(root, "test")), ls.id_of)
    captions = dict(zip(*pq.read_table(formats.labels_path(root, "test"),
                                       columns=["key", "parse_label_ids"]).to_pydict().values()))
    categories = np.array([ls.category(i) for i in vocab])
    col = {t: j for j, t in enumerate(vocab)}

    def matrix(keys: list[str], ids: dict) -> np.ndarray:
        m = np.zeros((len(keys), len(vocab)), dtype=bool)  # [N, V]
        for i, k in enumerate(keys):
            for t in ids.get(k) or ():
                if t in col:
                    m[i, col[t]] = True
        return m

    keys = sorted(test_truth)  # every tagger's scores are put in this order
    truth, capt = matrix(keys, test_truth), matrix(keys, captions)  # [N, V] each
    right = int((capt & truth).sum())
    base = {"precision": right / max(int(capt.sum()), 1), "recall": right / max(int(truth.sum()), 1),
            "images": len(keys), "classes": len(vocab)}
    rows = []
    for name, path in taggers.items():
        scored, probs = score_split(path, root, "test")
        index = {k: i for i, k in enumerate(scored)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise ValueError(f"{name}: {len(missing)} test images with truth were not scored, e.g. {missing[:3]}")
        probs = probs[[index[k] for k in keys]][:, vocab]  # [N, V]
        rows += ceiling_rows(name, probs, truth, capt, categories, args.precision)
        log.info("%s: %s", name, rows[-2:])
    md = write_table(rows, base, out, args.precision)
    print(md.read_text())
    print(f"total {time.perf_counter() - t_start:.0f}s; table: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
