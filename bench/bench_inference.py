"""Inference throughput (images/s of ``tag_logits``) per model config, as ratios to ram_tiny.

All configs are measured in the same run on random weights (speed does not depend on weights),
each at its own input size, with the same tag-set size. Usage::

``NAME@SIZE`` measures a config at another input size (``ram_effnet_lite0@96``: the size the
pipeline trains it at on the 96 px embedded corpus). Usage::

    python bench/bench_inference.py [--configs ram_tiny ram_effnet_lite0@96 ram_swin_b_224]
        [--batch 4] [--tags 100] [--seconds 10] [--threads N] [--out bench_inference.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

log = logging.getLogger("bench_inference")


def measure(spec: str, batch: int, n_tags: int, seconds: float) -> dict:
    from ram_model.registry import create_model

    name, _, size = spec.partition("@")
    overrides = {"image_size": int(size)} if size else {}
    torch.manual_seed(0)
    model = create_model(name, pretrained=False, caption=False, **overrides).eval()
    model.set_tags([f"tag{i}" for i in range(n_tags)], torch.nn.functional.normalize(torch.randn(n_tags, model.config.text_dim), dim=-1))
    size = model.data_config["image_size"]
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model.tag_logits(x)  # warm-up
        done, start = 0, time.perf_counter()
        while True:
            model.tag_logits(x)
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and done >= 2 * batch:
                break
    return {"config": spec, "image_size": size, "batch": batch, "images": done, "seconds": elapsed,
            "images_per_s": done / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ram_tiny", "ram_effnet_lite0@96", "ram_effnet_lite0", "ram_swin_b_224"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tags", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(n, args.batch, args.tags, args.seconds) for n in args.configs]
    base = next((r["images_per_s"] for r in rows if r["config"] == "ram_tiny"), rows[0]["images_per_s"])
    print(f"{'config':<18} {'size':>5} {'batch':>5} {'img/s':>9} {'vs ram_tiny':>12}")
    for r in rows:
        r["ratio_to_ram_tiny"] = r["images_per_s"] / base
        print(f"{r['config']:<18} {r['image_size']:>5} {r['batch']:>5} {r['images_per_s']:>9.2f} "
              f"{r['ratio_to_ram_tiny']:>11.3f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
