"""Benchmark raw-pairs ingestion on real COCO photos (and on the embedded generator).

    .venv/bin/python bench/bench_ingest.py [../shared/data/coco_dev] [--workers 1 2] [--embedded 600]

COCO: builds a COCO captions JSON from ``coco_caption_objects.jsonl`` in a temp dir, ingests
``images/`` with it, and reports items/s plus the counts. Timings are reported against a
baseline measured in the same run: the bare minimum of work per image (read the file and
fully decode it with PIL), so ``ratio = ingest items/s / baseline items/s`` shows the cost of
checking, resizing, re-encoding and writing shards + manifest. The embedded part compares
ingesting N generated items with generating them alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import pandas  # noqa: F401  (imported up front so no timed run pays the one-off import)
import pyarrow.parquet  # noqa: F401
from PIL import Image

from _skip import SKIPPED
from data_engine.ingest import IngestConfig, ingest

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_dev"  # ../shared beside the repo


def build_coco_json(data: Path, out: Path) -> tuple[Path, int, int]:
    """COCO captions JSON from the jsonl; returns (path, n_images, n_captions)."""
    images, annotations = [], []
    with open(data / "coco_caption_objects.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            images.append({"id": row["image_id"], "file_name": Path(row["image_path"]).name,
                           "width": row["width"], "height": row["height"]})
            for caption in row["captions"]:
                annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"], "caption": caption})
    out.write_text(json.dumps({"images": images, "annotations": annotations}))
    return out, len(images), len(annotations)


def baseline_decode(folder: Path, names: list[str]) -> float:
    """items/s of reading + fully decoding every image (nothing written)."""
    start = time.perf_counter()
    for name in names:
        with Image.open(folder / name) as image:
            image.convert("RGB").load()
    return len(names) / (time.perf_counter() - start)


def bench_coco(data: Path, workers: list[int], max_side: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        captions, n_images, n_captions = build_coco_json(data, Path(tmp) / "captions.json")
        names = [e["file_name"] for e in json.loads(captions.read_text())["images"]]
        base = baseline_decode(data / "images", names)
        runs = {}
        for w in workers:
            cfg = IngestConfig(shard_size=64, max_side=max_side, workers=w, progress=False)
            start = time.perf_counter()
            summary = ingest("coco", Path(tmp) / f"out{w}", cfg, path=captions, images=data / "images")
            seconds = time.perf_counter() - start
            runs[f"workers={w}"] = {
                "items_per_s": round(summary.total.seen / seconds, 1),
                "ratio_vs_decode_baseline": round(summary.total.seen / seconds / base, 3),
                "seconds": round(seconds, 2),
                "seen": summary.total.seen, "written": summary.total.written,
                "skipped": summary.total.skipped, "shards": summary.total.shards,
                "counts_add_up": summary.counts_add_up,
            }
            out_bytes = sum(p.stat().st_size for p in (Path(tmp) / f"out{w}" / "raw").rglob("*.tar"))
            runs[f"workers={w}"]["shard_mib"] = round(out_bytes / 2**20, 2)
    in_bytes = sum((data / "images" / n).stat().st_size for n in names)
    return {"images": n_images, "captions": n_captions, "input_mib": round(in_bytes / 2**20, 2),
            "max_side": max_side, "baseline_decode_items_per_s": round(base, 1), "runs": runs}


def bench_embedded(n: int, workers: list[int]) -> dict:
    from data_engine.corpus import CorpusConfig, iter_corpus

    corpus_cfg = CorpusConfig(n_pretrain=n, n_finetune=0, n_test=0)
    start = time.perf_counter()
    for _ in iter_corpus(corpus_cfg, "pretrain"):
        pass
    base = n / (time.perf_counter() - start)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            cfg = IngestConfig(shard_size=max(1, n // 4), workers=w, progress=False)
            start = time.perf_counter()
            summary = ingest("embedded", Path(tmp) / f"emb{w}", cfg, corpus_cfg=corpus_cfg, splits=["pretrain"])
            seconds = time.perf_counter() - start
            runs[f"workers={w}"] = {
                "items_per_s": round(n / seconds, 1), "ratio_vs_generate_only": round(n / seconds / base, 3),
                "written": summary.total.written, "skipped": summary.total.skipped,
                "counts_add_up": summary.counts_add_up,
            }
    return {"items": n, "image_size": corpus_cfg.image_size, "generate_only_items_per_s": round(base, 1), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="coco_dev folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-side", type=int, default=IngestConfig().max_side)
    parser.add_argument("--embedded", type=int, default=600, help="embedded items to ingest (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = {}
    if (args.data / "coco_caption_objects.jsonl").is_file():
        report["coco"] = bench_coco(args.data, args.workers, args.max_side)
    else:
        print(f"skipped the COCO part: {args.data / 'coco_caption_objects.jsonl'} not found (give DATA)",
              file=sys.stderr)
    if args.embedded:
        report["embedded"] = bench_embedded(args.embedded, args.workers)
    if not report:
        raise SystemExit(SKIPPED)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
