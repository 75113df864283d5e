"""Benchmark the data engine on an ingested split with a trained preliminary model.

Reports, all measured in this run:

* throughput (images/s) of the full engine (generation + captioning branch + regions +
  cleaning) and, as the baseline, of a tagging-only pass over the same images (ratio);
* the engine's per-step label precision/recall against the corpus truth;
* the real-model region check: for each truth object of the first ``--region-images`` images,
  the box found from the tag's cross-attention (:mod:`engine_rounds.regions`) against the
  object's true box (best IoU over the instances of that class), with the whole-image box and
  a centred half-size box as baselines.

Usage::

    .venv/bin/python bench/bench_engine.py --root data --model data/models/preliminary_model \\
        --split pretrain --max-images 1000 --out bench/results/engine.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _skip import skip_unless_present  # noqa: E402

from ramflow_io import formats  # noqa: E402
from engine_rounds import EngineConfig, load_engine_model, run_engine  # noqa: E402
from engine_rounds.regions import attention_to_box, box_iou, to_tensor  # noqa: E402
from ramflow_io.params import stage_config  # noqa: E402

log = logging.getLogger("bench_engine")


def region_check(model, shards, id_of, cfg: EngineConfig, n_images: int) -> dict:
    """IoU of attention regions with true object boxes (truth read here: evaluation code)."""
    from ramflow_io.shards import iter_samples

    ious, whole, centre = [], [], []
    done = 0
    for sample in iter_samples(shards, decode=True):
        truth = sample.meta.get(formats.TRUTH_FIELD)
        if not truth or not truth.get("objects"):
            continue
        boxes: dict[int, list] = {}
        for obj in truth["objects"]:
            tag = id_of(obj["name"])
            if tag is not None:
                boxes.setdefault(int(tag), []).append(tuple(float(v) for v in obj["box"]))
        if not boxes:
            continue
        tags = sorted(boxes)
        x = to_tensor([sample.image], model.data_config)
        with torch.inference_mode():
            att = model.tag_attention(x, tag_ids=torch.tensor(tags)).float().numpy()[0]  # [T, h, w]
        if att.shape[0] != len(tags):
            att = att[tags]
        w, h = sample.image.size
        for j, tag in enumerate(tags):
            box = attention_to_box(att[j], (w, h), cfg.attention_threshold, cfg.region_margin)
            ious.append(max(box_iou(box, b) for b in boxes[tag]))
            whole.append(max(box_iou((0, 0, w, h), b) for b in boxes[tag]))
            centre.append(max(box_iou((w / 4, h / 4, 3 * w / 4, 3 * h / 4), b) for b in boxes[tag]))
        done += 1
        if done >= n_images:
            break
    ious, whole, centre = map(np.asarray, (ious, whole, centre))
    return {
        "images": done, "objects": int(len(ious)),
        "mean_iou": float(ious.mean()) if len(ious) else 0.0,
        "hit_rate_iou50": float((ious >= 0.5).mean()) if len(ious) else 0.0,
        "baseline_whole_image_mean_iou": float(whole.mean()) if len(whole) else 0.0,
        "baseline_whole_image_hit_rate_iou50": float((whole >= 0.5).mean()) if len(whole) else 0.0,
        "baseline_centre_box_mean_iou": float(centre.mean()) if len(centre) else 0.0,
        "baseline_centre_box_hit_rate_iou50": float((centre >= 0.5).mean()) if len(centre) else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("data"))
    ap.add_argument("--model", type=Path, default=None, help="preliminary model (default: ROOT/models/preliminary_model)")
    ap.add_argument("--split", default="pretrain")
    ap.add_argument("--params", default=None)
    ap.add_argument("--max-images", type=int, default=1000)
    ap.add_argument("--region-images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    ap.add_argument("--report-dir", type=Path, default=None, help="engine report (default: next to --out)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from data_engine.label_system import LabelSystem

    model_path = args.model or formats.model_dir(args.root, "preliminary_model")
    # the pass's speed does not depend on the weights: no adaptation fine-tune here
    cfg = stage_config(EngineConfig, "engine", args.params, max_images=args.max_images, adapt_epochs=0)
    labels = formats.labels_path(args.root, args.split)
    hint = "a finished pipeline's data root: run `make run` first, or pass --root / --model"
    skip_unless_present(labels, hint)
    skip_unless_present(model_path, hint)
    ls_dir = formats.label_system_dir(args.root)
    report_dir = args.report_dir or args.out.parent / "engine_report"
    results: dict = {"config": cfg.model_dump(), "split": args.split, "model": str(model_path)}

    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = cfg.model_copy(update={"captioning": False, "cleaning": False, "report_tags": 0})
        base = run_engine(model_path, args.root, args.split, labels, ls_dir, Path(tmp) / "base.parquet",
                          base_cfg, Path(tmp) / "base_report")
    full = run_engine(model_path, args.root, args.split, labels, ls_dir, args.out.parent / f"engine_{args.split}.parquet",
                      cfg, report_dir)
    results["baseline_tagging_only_images_per_s"] = base.images_per_s
    results["engine_images_per_s"] = full.images_per_s
    results["engine_vs_tagging_only_ratio"] = full.images_per_s / max(base.images_per_s, 1e-9)
    results["engine"] = full.model_dump()

    model = load_engine_model(model_path, cfg.device)
    ls = LabelSystem.load(ls_dir)
    results["region_check"] = region_check(model, formats.list_shards(args.root, args.split), ls.id_of, cfg,
                                           args.region_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    m = full.metrics
    print(f"images: {full.images}  pairs: {full.pairs}  added: {full.added}  removed: {full.removed}")
    print(f"throughput: engine {full.images_per_s:.2f} img/s, tagging-only {base.images_per_s:.2f} img/s "
          f"(ratio {results['engine_vs_tagging_only_ratio']:.3f})")
    for step in ("parsed", "generated", "cleaned"):
        if step in m:
            print(f"labels {step:<9} precision {m[step]['precision']:.4f} recall {m[step]['recall']:.4f}")
    rc = results["region_check"]
    print(f"regions: mean IoU {rc['mean_iou']:.3f} (whole image {rc['baseline_whole_image_mean_iou']:.3f}, "
          f"centre box {rc['baseline_centre_box_mean_iou']:.3f}); IoU>=0.5 {rc['hit_rate_iou50']:.3f} "
          f"over {rc['objects']} objects")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
