"""Cost of a training step by which tag queries it trains (ram_model.query_sampling).

One ``ram_effnet_lite0`` training step (forward, ASL, backward, AdamW) at the default recipe's
shape: batch 32, 96 px, ``--tags`` tag queries of which ``--observed`` have training labels and
each image has about ``--positives`` of them. Modes, timed interleaved in one process so load
and CPU-speed drift hit them alike:

- ``all``: every tag query (the baseline; ``train_tags: all``);
- ``observed``: only the tags with training labels (``train_tags: observed``);
- ``observed_negK``: + each image's positives and K sampled negatives (``sampled_negatives: K``);
- ``image_only``: the image encoder alone, the floor no query setting can go below.

Reports median seconds per step, the speed-up over ``all`` and the paired median of per-repeat
ratios. The embedded corpus' default: 144 tags, 86 observed, about 3 positives per image.

Usage::

    python bench/bench_train_queries.py [--tags 144] [--observed 86] [--negatives 16 32]
        [--repeats 5] [--steps 6] [--out bench/results/train_queries.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from ram_model.query_sampling import select_queries
from ram_model.registry import create_model

log = logging.getLogger("bench_train_queries")


def synthetic_batch(batch: int, tags: int, observed: int, positives: float, size: int, seed: int):
    """Images ``[B, 3, S, S]``, targets ``[B, C]`` (positives only among the first ``observed``)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = torch.zeros(batch, tags)
    targets[:, :observed] = (torch.rand(batch, observed, generator=g) < positives / observed).float()
    trainable = torch.zeros(tags, dtype=torch.bool)
    trainable[:observed] = True
    return images, targets, trainable


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ram_effnet_lite0")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tags", type=int, default=144)
    ap.add_argument("--observed", type=int, default=86)
    ap.add_argument("--positives", type=float, default=3.0, help="mean positive tags per image")
    ap.add_argument("--negatives", type=int, nargs="*", default=[16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and repeat")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    names = [f"tag{i}" for i in range(args.tags)]
    model = create_model(args.model, pretrained=False, tag_names=names,
                         tag_embeddings=torch.nn.functional.normalize(torch.randn(args.tags, 384), dim=-1),
                         image_size=args.image_size).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images, targets, trainable = synthetic_batch(args.batch, args.tags, args.observed, args.positives,
                                                 args.image_size, seed=0)
    gen = torch.Generator().manual_seed(0)

    def tag_step(negatives: int | None, subset: bool) -> None:
        batch = {"image": images, "tag_targets": targets}
        if subset:
            q = select_queries(targets, trainable, negatives, gen)
            batch.update(tag_ids=q.tag_ids, tag_targets=q.targets)
            if q.weights is not None:
                batch["tag_weights"] = q.weights
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def image_step() -> None:
        tokens, _ = model.encode_image(images)
        loss = tokens.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    modes = {"all": lambda: tag_step(None, False), "observed": lambda: tag_step(None, True)}
    for k in args.negatives:
        modes[f"observed_neg{k}"] = lambda k=k: tag_step(k, True)
    modes["image_only"] = image_step
    for fn in modes.values():  # warm-up: allocator, oneDNN primitives
        fn()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
        log.info("repeat %d: %s", r, {m: round(v[-1], 3) for m, v in times.items()})
    base = statistics.median(times["all"])
    rows = {}
    for name, ts in times.items():
        paired = statistics.median(a / b for a, b in zip(times["all"], ts))
        rows[name] = {"median_s_per_step": round(statistics.median(ts), 4),
                      "speedup_vs_all": round(base / statistics.median(ts), 3), "paired_speedup": round(paired, 3)}
    result = {"setup": {k: v for k, v in vars(args).items() if k != "out"} | {"threads": torch.get_num_threads(),
                                                                              "torch": torch.__version__},
              "modes": rows}
    log.info("%s", json.dumps(rows, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
