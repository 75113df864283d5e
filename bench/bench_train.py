"""Training throughput: DeepSpeed (1 and 2 processes) vs plain torch, as ratios.

Every variant runs through the same torchrun launcher (``launch_train_stage``) on the same data
and config, so start-up costs are alike; throughput is measured from the per-step timings of
the training loop after ``--skip`` warm-up steps (samples / seconds of those steps), never from
wall time. Ratios are against the torch backend measured in the same run.

    python bench/bench_train.py --data-root data --steps 40                  # corpus data (a run's data root)
    python bench/bench_train.py --steps 40                                   # synthetic shards
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_train")

# backend, procs, zero stage. torch x2 (DDP) sees the same per-rank data as deepspeed x2, so it
# separates "2 processes read the data in another order" from "DeepSpeed computes differently".
VARIANTS = (("torch", 1, 0), ("deepspeed", 1, 2), ("torch", 2, 0), ("deepspeed", 2, 2))


def synthetic_root(root: Path, n: int, shards: int, size: int = 96) -> Path:
    """Shards of random coloured rectangles with their colour/shape tags + a label system."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from ramflow_io.formats import labels_path, shard_path
    from data_engine.label_system import Label, LabelSystem
    from ramflow_io.shards import ShardWriter

    colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    names = list(colors) + ["box", "ball"]
    LabelSystem([Label(i, n_) for i, n_ in enumerate(names)]).save(root / "label_system")
    rng = random.Random(0)
    rows, per = [], -(-n // shards)
    for s in range(shards):
        with ShardWriter(shard_path(root, "pretrain", s)) as w:
            for i in range(s * per, min(n, (s + 1) * per)):
                key = f"syn{i:06d}"
                img = Image.new("RGB", (size, size), (rng.randrange(256),) * 3)
                c = rng.choice(list(colors))
                shape = rng.choice(["box", "ball"])
                d = ImageDraw.Draw(img)
                (d.rectangle if shape == "box" else d.ellipse)([20, 20, 76, 76], fill=colors[c])
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                w.write(key, buf.getvalue(), f"a {c} {shape}", {"key": key, "split": "pretrain"})
                rows.append((key, [names.index(c), names.index(shape)]))
    out = labels_path(root, "pretrain")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [k for k, _ in rows], "parse_label_ids": [v for _, v in rows]}), out)
    return root


def steady_rate(history: list[dict], skip: int, batch_size: int) -> float:
    """Samples/s over the steps after ``skip`` (each step's time includes its data wait)."""
    times = [batch_size / h["samples_per_s"] for h in history[skip:]]
    return batch_size * len(times) / sum(times)


def smoothed(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def curve_gap(a: list[float], b: list[float], window: int) -> dict[str, float]:
    """Mean / max |difference| of the moving averages of two loss curves, and relative to ``a``."""
    sa, sb = smoothed(a, window), smoothed(b, window)
    diffs = [abs(x - y) for x, y in zip(sa, sb)]
    mean_a = sum(sa) / len(sa)
    return {"mean_abs_diff": sum(diffs) / len(diffs), "max_abs_diff": max(diffs),
            "rel_mean_abs_diff": sum(diffs) / len(diffs) / mean_a}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, help="ingested corpus (labels/pretrain.parquet); default synthetic")
    p.add_argument("--model", default="ram_tiny")
    p.add_argument("--image-size", type=int, help="input size override (ram_effnet_lite0 trains at 96 on the corpus)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--no-caption", action="store_true", help="tagging branch only (halves a CPU step)")
    p.add_argument("--synthetic-samples", type=int, default=2000)
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the loss-curve comparison")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ramflow_io.formats import labels_path
    from ram_model.train_stage import TrainStageConfig, launch_train_stage

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        root = args.data_root or synthetic_root(tmp / "data", args.synthetic_samples, shards=4)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        results = []
        for backend, nproc, zero in VARIANTS:
            cfg = TrainStageConfig(
                model=args.model, backend=backend, zero_stage=zero, max_steps=args.steps, batch_size=args.batch_size,
                micro_batch_size=args.micro_batch_size if nproc == 1 else args.batch_size // 2,
                num_workers=args.num_workers, checkpoint_every=10**6, warmup_steps=5, validation_fraction=0.0,
                resume=False, caption=not args.no_caption, lr=args.lr, grad_clip=0.0,
                model_overrides={"image_size": args.image_size} if args.image_size else {},
            )
            out = tmp / f"{backend}_{nproc}"
            res = launch_train_stage(cfg, root, out, [labels_path(root, "pretrain")], nproc=nproc,
                                     timeout_s=3600, evaluate_after=False)
            history = json.loads((out / "history.json").read_text())
            rate = steady_rate(history, args.skip, args.batch_size)
            results.append({"backend": backend, "nproc": nproc, "zero_stage": zero, "samples_per_s": rate,
                            "losses": [h["loss"] for h in history],
                            "final_loss": res.metrics["final_loss"], "launch_seconds": res.metrics["launch_seconds"]})
            log.info("%s x%d: %.1f samples/s", backend, nproc, rate)
    base = results[0]["samples_per_s"]
    for r in results:
        r["ratio_vs_torch"] = r["samples_per_s"] / base
    torch_of = {r["nproc"]: r for r in results if r["backend"] == "torch"}
    for r in results:
        r["curve_vs_torch"] = curve_gap(results[0]["losses"], r["losses"], args.smooth)
        r["curve_vs_torch_same_procs"] = curve_gap(torch_of[r["nproc"]]["losses"], r["losses"], args.smooth)
    print(f"{'backend':<10} {'procs':>5} {'zero':>4} {'samples/s':>10} {'vs torch':>9} {'final loss':>10}")
    for r in results:
        print(f"{r['backend']:<10} {r['nproc']:>5} {r['zero_stage']:>4} {r['samples_per_s']:>10.1f} "
              f"{r['ratio_vs_torch']:>8.2f}x {r['final_loss']:>10.4f}  curve gap vs torch (smoothed {args.smooth}): "
              f"mean {r['curve_vs_torch']['mean_abs_diff']:.4f} ({100 * r['curve_vs_torch']['rel_mean_abs_diff']:.2f}%); "
              f"vs torch x{r['nproc']}: {100 * r['curve_vs_torch_same_procs']['rel_mean_abs_diff']:.2f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
