"""A tiny stand-in for ``data_engine.corpus`` with the same API (tests of ingestion only).

``CorpusConfig`` / ``split_size`` / ``iter_corpus`` / ``measure_noise``; item ``i`` of a split
depends only on ``(seed, split, i)``, like the real generator. ``flaw_every > 0`` gives every
such item an empty caption, to check that embedded items are skipped and counted too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

from data_engine.corpus import CorpusItem  # the real item type; only generation is faked
from pydantic import BaseModel

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("box", "ball")


class CorpusConfig(BaseModel):
    seed: int = 0
    image_size: int = 48
    n_pretrain: int = 7
    n_finetune: int = 3
    n_test: int = 4
    omit_rate: float = 0.4
    hallucinate_rate: float = 0.2
    flaw_every: int = 0


def split_size(cfg: CorpusConfig, split: str) -> int:
    return {"pretrain": cfg.n_pretrain, "finetune": cfg.n_finetune, "test": cfg.n_test}[split]


def _item(cfg: CorpusConfig, split: str, i: int) -> CorpusItem:
    rng = random.Random(f"{cfg.seed}/{split}/{i}")
    image = Image.new("RGB", (cfg.image_size, cfg.image_size + 8), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    objects, tags = [], set()
    for _ in range(rng.randint(1, 2)):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        x0, y0 = rng.randint(0, 20), rng.randint(0, 20)
        box = [x0, y0, x0 + 20, y0 + 20]
        (draw.rectangle if shape == "box" else draw.ellipse)(box, fill=COLOURS[colour])
        objects.append({"name": shape, "color": colour, "box": box})
        tags.update({shape, colour})
    mentioned = sorted(t for t in tags if t in SHAPES and rng.random() > cfg.omit_rate)
    if rng.random() < cfg.hallucinate_rate:
        mentioned.append("cat")
    caption = "a picture of " + " and ".join(mentioned or ["something"])
    if cfg.flaw_every and i % cfg.flaw_every == 0:
        caption = "   "
    truth = {"tags": sorted(tags), "mentioned": mentioned, "scene": "plain", "objects": objects}
    return CorpusItem(f"{split}_{i:05d}", split, image, caption, truth)


def iter_corpus(cfg: CorpusConfig, split: str, start: int = 0, stop: int | None = None) -> Iterator[CorpusItem]:
    stop = split_size(cfg, split) if stop is None else min(stop, split_size(cfg, split))
    for i in range(start, stop):
        yield _item(cfg, split, i)


def measure_noise(truths: list[dict]) -> dict:
    objs = [t for t in truths]
    present = sum(len({o["name"] for o in t["objects"]}) for t in objs)
    omitted = sum(len({o["name"] for o in t["objects"]} - set(t["mentioned"])) for t in objs)
    mentioned = sum(len(t["mentioned"]) for t in objs)
    hallucinated = sum(len(set(t["mentioned"]) - {o["name"] for o in t["objects"]}) for t in objs)
    return {
        "n": len(objs),
        "omit_rate": omitted / present if present else 0.0,
        "hallucinate_rate": hallucinated / mentioned if mentioned else 0.0,
    }
