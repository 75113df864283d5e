"""Caption-parsed tags vs true COCO labels as training targets, on real COCO photos.

The question RAM's data engine answers: how much tagging quality is lost when the training
labels come from parsing captions instead of human object annotations? Both runs train the
registered ``ram_effnet_lite0`` (ImageNet EfficientNet-Lite0, caption branch off) on the same
half of ``coco_dev`` with the same seed, steps and hyper-parameters; only ``tag_targets``
differ: (a) tags parsed from the 5 captions of each image (``CaptionParser``), normalised with
the pipeline's label system (``build_label_system``: COCO-80 seed + synonyms file + WordNet merges,
built from those same parsed captions) and restricted to the 80 COCO classes; (b) the true COCO
labels. Both are scored on the other half against the true labels; the figure of interest is the
ratio parsed / true, measured in the same run. The split is deterministic: images sorted by
``sha1(str(image_id))``, first half trains.

    .venv/bin/python bench/bench_coco_tags.py --epochs 20 --json-out /tmp/coco_tags.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_coco_tags")

DATA = Path("/work/shared/data/coco_dev")


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Sort by sha1 of the image id; first half trains, second half evaluates."""
    rows = sorted(rows, key=lambda r: hashlib.sha1(str(r["image_id"]).encode()).hexdigest())
    half = len(rows) // 2
    return rows[:half], rows[half:]


def multi_hot(label_lists: list[list[str]], names: list[str]) -> np.ndarray:
    """``[N, C]`` float32 multi-hot of name lists over ``names`` (unknown names raise)."""
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(label_lists), len(names)), dtype=np.float32)
    for i, labels in enumerate(label_lists):
        for name in labels:
            out[i, index[name]] = 1.0
    return out


def parsed_coco_labels(rows: list[dict], coco_names: list[str], work: Path) -> tuple[list[list[str]], dict]:
    """Per image: COCO-80 names its captions' parsed tags map to (pipeline label system)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_engine.label_system import LabelSystemConfig, build_label_system
    from data_engine.parsing import CaptionParser, ParseConfig

    caps = [c for r in rows for c in r["captions"]]
    owner = [i for i, r in enumerate(rows) for _ in r["captions"]]
    t0 = time.perf_counter()
    parsed = CaptionParser(ParseConfig(n_process=1)).parse_batch(caps)
    parse_s = time.perf_counter() - t0
    path = work / "parsed.parquet"
    pq.write_table(pa.table({"key": [str(i) for i in range(len(caps))], "caption": caps,
                             "tags": [p.tags for p in parsed], "categories": [p.categories for p in parsed],
                             "status": [p.status for p in parsed]}), path)
    ls = build_label_system([path], LabelSystemConfig(seed_files=["coco80"]), work / "label_system")
    coco = set(coco_names)
    missing = sorted(coco - set(ls.names))
    if missing:
        raise RuntimeError(f"label system lost COCO classes {missing}")
    per_image: list[dict[str, None]] = [{} for _ in rows]
    for i, p in zip(owner, parsed):
        for idx in ls.to_ids(p.tags):
            name = ls.labels[idx].name
            if name in coco:
                per_image[i][name] = None
    stats = {"captions": len(caps), "parse_seconds": round(parse_s, 2),
             "skipped_captions": sum(p.status != "ok" for p in parsed),
             "label_system_size": len(ls)}
    return [sorted(d) for d in per_image], stats


def label_agreement(pred: np.ndarray, true: np.ndarray) -> dict:
    """Micro P/R/F1 of parsed labels against true labels, plus per-image averages."""
    tp, fp, fn = (pred * true).sum(), (pred * (1 - true)).sum(), ((1 - pred) * true).sum()
    return {"micro_precision": float(tp / max(tp + fp, 1)), "micro_recall": float(tp / max(tp + fn, 1)),
            "micro_f1": float(2 * tp / max(2 * tp + fp + fn, 1)),
            "labels_per_image_parsed": float(pred.sum(1).mean()),
            "labels_per_image_true": float(true.sum(1).mean())}


def load_images(rows: list[dict], data_config: dict):
    """All images of ``rows`` preprocessed once: ``[N, 3, S, S]``."""
    from ram_model.inference import load_image, preprocess

    return preprocess([load_image(DATA / r["image_path"]) for r in rows], data_config)


def train_and_score(args, names: list[str], emb, x_train, y_train: np.ndarray, x_eval) -> tuple[np.ndarray, dict]:
    """Train one model on ``(x_train, y_train)`` and return sigmoid scores on ``x_eval``."""
    import torch

    from ram_model.registry import create_model

    torch.manual_seed(args.seed)
    model = create_model("ram_effnet_lite0", tag_names=names, tag_embeddings=emb, caption=False,
                         image_size=args.image_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)  # same batch order / flips in both runs
    y = torch.from_numpy(y_train)
    n = x_train.shape[0]
    steps = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - args.batch_size + 1, args.batch_size):  # drop last partial batch
            idx = order[start : start + args.batch_size]
            images = x_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            loss = model({"image": images, "tag_targets": y[idx]})["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
        log.info("epoch %d/%d loss %.4f (%.0fs)", epoch + 1, args.epochs, np.mean(losses[-(n // args.batch_size):]),
                 time.perf_counter() - t0)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        scores = torch.cat([torch.sigmoid(model.tag_logits(x_eval[i : i + 32]))
                            for i in range(0, x_eval.shape[0], 32)]).numpy()
    return scores, {"steps": steps, "train_seconds": round(train_s, 1), "first_loss": losses[0],
                    "last_epoch_loss": float(np.mean(losses[-(n // args.batch_size):]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA / "coco_caption_objects.jsonl")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--thresholds", default="0.5,0.7,0.9",
                    help="comma list; micro P/R/F1 at each (0.5 is the brief's operating point)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from ram_model.evaluate import evaluate_scores
    from ram_model.registry import get_config
    from ram_model.text_encoder import build_text_encoder, embed_tag_names

    torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    wall0 = time.perf_counter()
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_rows, eval_rows = split_rows(rows)
    seed_file = ROOT / "data_engine" / "resources" / "seeds" / "coco80.txt"
    names = [ln.strip() for ln in seed_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    cfg = get_config("ram_effnet_lite0", caption=False, image_size=args.image_size)
    emb = embed_tag_names(names, build_text_encoder(cfg.text_encoder), cfg.prompt_templates)  # [80, 384]

    with tempfile.TemporaryDirectory() as tmp:
        parsed_lists, parse_stats = parsed_coco_labels(train_rows, names, Path(tmp))
    y_parsed = multi_hot(parsed_lists, names)
    y_true_train = multi_hot([r["objects"] for r in train_rows], names)
    y_true_eval = multi_hot([r["objects"] for r in eval_rows], names)
    agreement = label_agreement(y_parsed, y_true_train)
    log.info("parsed vs true labels on the training half: %s", agreement)

    data_config = {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
    x_train, x_eval = load_images(train_rows, data_config), load_images(eval_rows, data_config)

    results = {}
    for variant, y in (("parsed", y_parsed), ("true", y_true_train)):
        log.info("training on %s labels", variant)
        scores, train_stats = train_and_score(args, names, emb, x_train, y, x_eval)
        res = {**train_stats, "mean_score": float(scores.mean())}
        for thr in thresholds:
            metrics = evaluate_scores(scores, y_true_eval, thr, tag_names=names)
            res["mAP"] = metrics["mAP"]
            res["num_classes_with_positives"] = metrics["num_classes_with_positives"]
            for k in ("micro_precision", "micro_recall", "micro_f1"):
                res[f"{k}@{thr:g}"] = metrics[k]
            res[f"predicted_per_image@{thr:g}"] = float((scores >= thr).sum(1).mean())
        results[variant] = res
    wall = time.perf_counter() - wall0

    keys = ["mAP"] + [f"{k}@{t:g}" for t in thresholds for k in ("micro_precision", "micro_recall", "micro_f1")]
    ratio = {k: results["parsed"][k] / results["true"][k] if results["true"][k] else float("nan") for k in keys}
    print(f"\ncoco_dev: {len(train_rows)} train / {len(eval_rows)} eval images, ram_effnet_lite0 "
          f"@{args.image_size}px, {results['true']['steps']} steps (batch {args.batch_size}, {args.epochs} epochs), "
          f"lr {args.lr}, seed {args.seed}")
    print(f"{'metric (eval half, true labels)':34s} {'parsed':>8s} {'true':>8s} {'parsed/true':>12s}")
    for k in keys:
        print(f"{k:34s} {results['parsed'][k]:8.4f} {results['true'][k]:8.4f} {ratio[k]:12.3f}")
    for t in thresholds:
        k = f"predicted_per_image@{t:g}"
        print(f"{k:34s} {results['parsed'][k]:8.2f} {results['true'][k]:8.2f}")
    print(f"{'train seconds':34s} {results['parsed']['train_seconds']:8.1f} {results['true']['train_seconds']:8.1f}")
    print(f"parse labels vs true (train half): P={agreement['micro_precision']:.4f} "
          f"R={agreement['micro_recall']:.4f} F1={agreement['micro_f1']:.4f} "
          f"(labels/image parsed {agreement['labels_per_image_parsed']:.2f}, "
          f"true {agreement['labels_per_image_true']:.2f})")
    print(f"wall time {wall:.0f}s")
    if args.json_out:
        out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "split": {"train": len(train_rows), "eval": len(eval_rows), "by": "sha1(str(image_id))"},
               "parse": {**parse_stats, **agreement}, "results": results, "ratio_parsed_over_true": ratio,
               "wall_seconds": round(wall, 1)}
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
