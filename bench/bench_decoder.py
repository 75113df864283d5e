"""Why the small configs change RAM's recognition decoder: test mAP of decoder variants trained on
frozen image features, side by side with a linear probe on the same features, in one run.

Images come from the embedded corpus (truth tags: objects, scene, colours), encoded once by the
frozen ImageNet ``tf_efficientnet_lite0`` at the corpus size. Every head then trains for the same
number of steps with BCE on the truth tags, so the only difference is the head:

- ``linear_probe``: one linear layer on the mean token (a closed-set baseline, one weight per tag);
- ``ram_plain``: RAM's decoder (queries = relu(proj(text embedding)), cross-attention-only
  layers, one shared fc);
- ``ram_norm``: + LayerNorm on queries and image tokens;
- ``ram_norm_readout``: + the query-conditioned readout ``<x_c, W q_c> / sqrt(D)`` (still open set).

Usage::

    python bench/bench_decoder.py [--n-train 5000] [--n-test 1000] [--epochs 3] [--lr 3e-3]
        [--out bench_decoder.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger("bench_decoder")

VARIANTS: dict[str, dict] = {
    "ram_plain": {"query_norm": False, "token_norm": False, "query_readout": False},
    "ram_norm": {"query_norm": True, "token_norm": True, "query_readout": False},
    "ram_norm_readout": {"query_norm": True, "token_norm": True, "query_readout": True},
}


def corpus_arrays(split: str, n: int, image_size: int):
    """Images ``[n, 3, S, S]`` uint8 and truth tag lists of the first ``n`` items of ``split``."""
    from data_engine.corpus import CorpusConfig, iter_corpus

    cfg = CorpusConfig(image_size=image_size, **{f"n_{split}": n})
    images, tags = [], []
    for item in tqdm(iter_corpus(cfg, split, 0, n), total=n, desc=f"corpus {split}"):
        images.append(np.asarray(item.image.convert("RGB")))
        tags.append(item.truth["tags"])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), tags


@torch.no_grad()
def backbone_features(images: torch.Tensor, batch: int = 200) -> torch.Tensor:
    """Frozen ImageNet effnet-lite0 tokens ``[N, hw, 1280]`` (mean = std = 0.5 normalisation)."""
    from ram_model.backbones import backbone_tokens, create_backbone
    from ram_model.registry import EFFNET_LITE0_PACKAGE

    backbone = create_backbone("tf_efficientnet_lite0", {}, EFFNET_LITE0_PACKAGE, True).eval()
    out = [backbone_tokens(backbone, (images[i:i + batch].float() / 255 - 0.5) / 0.5)[0]
           for i in tqdm(range(0, len(images), batch), desc="features")]
    return torch.cat(out)


def tag_targets(tags: list[list[str]], names: list[str]) -> torch.Tensor:
    """``[N, C]`` multi-hot of tag names over ``names`` (names outside it are dropped)."""
    from ram_model.data import multi_hot

    index = {n: i for i, n in enumerate(names)}
    return multi_hot([[index[t] for t in item_tags if t in index] for item_tags in tags], len(names))


def train_head(logits_fn, params, feats: torch.Tensor, targets: torch.Tensor, epochs: float, lr: float,
               batch: int, seed: int) -> float:
    """AdamW + one-cycle on ``logits_fn(tokens [B, hw, Cb]) -> [B, C]``; returns seconds."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = max(1, int(epochs * len(feats) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="train", leave=False):
        idx = torch.randint(0, len(feats), (batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(logits_fn(feats[idx]), targets[idx], reduction="sum") / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ram_model.evaluate import mean_average_precision
    from ram_model.registry import create_model

    train_images, train_tags = corpus_arrays("pretrain", args.n_train, args.image_size)
    test_images, test_tags = corpus_arrays("test", args.n_test, args.image_size)
    names = sorted({t for tags in train_tags for t in tags})  # held-out classes are test-only: left out
    y_train, y_test = tag_targets(train_tags, names), tag_targets(test_tags, names)
    f_train, f_test = backbone_features(train_images), backbone_features(test_images)

    rows = []
    torch.manual_seed(args.seed)
    probe = nn.Linear(f_train.shape[-1], len(names))
    heads = {"linear_probe": (lambda t: probe(t.mean(1)), list(probe.parameters()))}
    for name, flags in VARIANTS.items():
        torch.manual_seed(args.seed)
        model = create_model("ram_effnet_lite0", pretrained=False, tag_names=names, caption=False,
                             image_size=args.image_size, **flags)
        model.visual_encoder = None  # frozen features are precomputed: what is left is the head
        heads[name] = ((lambda t, m=model: m._decode_tags(m.project_tokens(t)).logits), list(model.parameters()))
    for name, (fn, params) in heads.items():
        seconds = train_head(fn, params, f_train, y_train, args.epochs, args.lr, args.batch, args.seed)
        with torch.no_grad():
            scores = torch.cat([torch.sigmoid(fn(f_test[i:i + 250])) for i in range(0, len(f_test), 250)])
        rows.append({"head": name, "mAP": mean_average_precision(scores.numpy(), y_test.numpy()),
                     "train_seconds": seconds, "params": sum(p.numel() for p in params)})
        log.info("%s: mAP %.3f (%.0f s)", name, rows[-1]["mAP"], seconds)
    base = rows[0]["mAP"]
    print(f"{'head':<18} {'mAP':>6} {'vs probe':>9} {'params':>9} {'train s':>8}")
    for r in rows:
        r["ratio_to_linear_probe"] = r["mAP"] / base
        print(f"{r['head']:<18} {r['mAP']:>6.3f} {r['ratio_to_linear_probe']:>8.2f}x {r['params']:>9,} "
              f"{r['train_seconds']:>8.1f}")
    result = {"args": vars(args), "tags": len(names), "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
