"""Generate corpus items: a scene, some objects, a caption and the truth behind them.

Item ``i`` of a split depends only on ``(cfg, split, i)``: its random generator is seeded
from ``(seed, split id, i)``, so slices can be produced in any order, by any worker, with
flat memory, and the same config always gives the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from data_engine.corpus.captions import NoiseParams, make_caption
from data_engine.corpus.config import CorpusConfig
from data_engine.corpus.pen import Pen
from data_engine.corpus.scenes import paint_background
from data_engine.corpus.shapes import DRAWERS
from data_engine.corpus.vocab import COLORS, OBJECTS, PATTERNS, SCENE_NAMES, ObjectClass
from ramflow_io.formats import SPLITS

log = logging.getLogger(__name__)

_CLASS_COUNT_P = (0.3, 0.35, 0.22, 0.13)  # P(1, 2, 3, 4 distinct classes), truncated by cfg
_INSTANCE_P = (0.72, 0.18, 0.1)  # P(1, 2, 3 instances of a class), truncated by cfg
_ZONES = {"sky": (0.1, 0.45), "ground": (0.5, 0.88), "any": (0.15, 0.85)}


@dataclass
class CorpusItem:
    """One image-text pair; ``truth`` is for evaluation code only (see formats.TRUTH_FIELD)."""

    key: str
    split: str
    image: Image.Image
    caption: str
    truth: dict


def split_size(cfg: CorpusConfig, split: str) -> int:
    """Number of items of ``split`` under ``cfg``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return int(getattr(cfg, f"n_{split}"))


def item_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def _rng(cfg: CorpusConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS.index(split), index])


def _probs(p: tuple[float, ...], n: int) -> np.ndarray:
    q = np.asarray(p[:n], np.float64)
    return q / q.sum()


def _classes_for(cfg: CorpusConfig, split: str) -> list[ObjectClass]:
    held = set(cfg.held_out)
    return [o for o in OBJECTS if split == "test" or o.name not in held]


def _place(rng: np.random.Generator, size: int, w: float, h: float, zone: str,
           boxes: list[tuple[float, float, float, float]], max_overlap: float):
    """A box of ``w x h`` px inside the image, centred in its zone, overlapping little."""
    lo, hi = _ZONES[zone]
    best, best_ov = None, 2.0
    for _ in range(12):
        cy = rng.uniform(lo, hi) * size
        y0 = float(np.clip(cy - h / 2, 0, size - h))
        x0 = float(rng.uniform(0, size - w))
        box = (x0, y0, x0 + w, y0 + h)
        ov = max((_overlap(box, b) for b in boxes), default=0.0)
        if ov < best_ov:
            best, best_ov = box, ov
        if ov <= max_overlap:
            break
    return best


def _overlap(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _sample_objects(cfg: CorpusConfig, split: str, scene: str,
                    rng: np.random.Generator) -> list[dict]:
    """Choose classes (scene-affine ones x3 more likely), instances, colours, poses, boxes."""
    classes = _classes_for(cfg, split)
    weights = np.array([3.0 if scene in c.scenes else 1.0 for c in classes])
    k = 1 + int(rng.choice(min(cfg.max_classes, 4), p=_probs(_CLASS_COUNT_P, cfg.max_classes)))
    k = min(k, len(classes))
    chosen = rng.choice(len(classes), size=k, replace=False, p=weights / weights.sum())
    size = cfg.image_size
    specs = []
    for ci in chosen:
        cls = classes[int(ci)]
        n = 1 + int(rng.choice(min(cfg.max_instances, 3),
                               p=_probs(_INSTANCE_P, cfg.max_instances)))
        n = min(n, cls.max_count)
        shared = _pick_color(rng, cls) if rng.random() < 0.6 else None
        for _ in range(n):
            frac = rng.uniform(cfg.min_object_frac, cfg.max_object_frac) * (0.85 if n > 1 else 1)
            specs.append({"cls": cls, "frac": frac, "color": shared or _pick_color(rng, cls)})
    specs.sort(key=lambda s: -s["frac"])  # big first so small ones stay visible on top
    lo, hi = cfg.min_object_frac, cfg.max_object_frac
    objects, boxes = [], []
    for s in specs:
        cls: ObjectClass = s["cls"]
        # frac sets the geometric-mean side, so wide and tall classes get the same area
        side = s["frac"] * size
        w = min(side * cls.aspect ** 0.5, 0.95 * size)
        h = min(side / cls.aspect ** 0.5, 0.95 * size)
        box = _place(rng, size, w, h, cls.zone, boxes, cfg.max_overlap)
        boxes.append(box)
        rel = (s["frac"] - lo) / max(hi - lo, 1e-6)
        objects.append({
            "name": cls.name, "color": s["color"],
            "pattern": _pick_pattern(rng, cls),
            "size": "small" if rel < 0.3 else "big" if rel > 0.7 else "medium",
            "angle": float(rng.uniform(-cls.max_rot, cls.max_rot)),
            "flip": bool(cls.flip and rng.random() < 0.5),
            "draw_box": box,
        })
    return objects


def _pick_color(rng: np.random.Generator, cls: ObjectClass) -> str:
    return cls.colors[int(rng.integers(len(cls.colors)))]


def _pick_pattern(rng: np.random.Generator, cls: ObjectClass) -> str:
    if not cls.patternable:
        return "plain"
    return PATTERNS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]


def _render(scene: str, objects: list[dict], size: int,
            rng: np.random.Generator) -> Image.Image:
    """Paint the background and every object; fills each object's pixel ``box``."""
    img = paint_background(scene, size, rng).convert("RGBA")
    outline = max(1, round(size / 96))
    for o in objects:
        base = np.asarray(COLORS[o["color"]], np.int64) + rng.integers(-12, 13, 3)
        color = tuple(int(v) for v in np.clip(base, 0, 255))
        pen = Pen(size, o["draw_box"], o["angle"], o["flip"], color, o["pattern"])
        DRAWERS[o["name"]](pen, color)
        layer, box = pen.finish(outline)
        o["box"] = box or [int(v) for v in o["draw_box"]]
        img.alpha_composite(layer)
    return img.convert("RGB")


def _noise(cfg: CorpusConfig, split: str) -> NoiseParams:
    clean = split == "finetune"
    return NoiseParams(
        omit_rate=0.0 if clean else cfg.omit_rate,
        hallucinate_rate=0.0 if clean else cfg.hallucinate_rate,
        synonym_rate=cfg.synonym_rate, attribute_rate=cfg.attribute_rate,
        pattern_rate=cfg.pattern_rate, verb_rate=cfg.verb_rate, filler_rate=cfg.filler_rate,
    )


def generate_item(cfg: CorpusConfig, split: str, index: int) -> CorpusItem:
    """Item ``index`` of ``split``; depends only on ``(cfg, split, index)``."""
    n = split_size(cfg, split)
    if not 0 <= index < n:
        raise IndexError(f"{split} index {index} outside [0, {n})")
    rng = _rng(cfg, split, index)
    scene = SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))]
    objects = _sample_objects(cfg, split, scene, rng)
    image = _render(scene, objects, cfg.image_size, rng)
    pool = [c.name for c in _classes_for(cfg, split)]
    cap = make_caption(rng, scene, objects, _noise(cfg, split), pool,
                       complete=split == "finetune")
    present = sorted({o["name"] for o in objects})
    colors = sorted({o["color"] for o in objects})
    truth = {
        "tags": sorted(set(present) | {scene} | set(colors)),
        "mentioned": cap.mentioned,
        "scene": scene,
        "objects": [{"name": o["name"], "color": o["color"], "box": o["box"],
                     "pattern": o["pattern"], "size": o["size"]} for o in objects],
        "synonyms_used": cap.synonyms_used,
        "hallucinated": cap.hallucinated,
    }
    return CorpusItem(item_key(split, index), split, image, cap.caption, truth)


def iter_corpus(cfg: CorpusConfig, split: str, start: int = 0,
                stop: int | None = None) -> Iterator[CorpusItem]:
    """Items ``start..stop-1`` of ``split`` (``stop`` defaults to the split size), lazily."""
    n = split_size(cfg, split)
    stop = n if stop is None else min(stop, n)
    if start < 0 or start > stop:
        raise ValueError(f"bad range [{start}, {stop}) for {split} of size {n}")
    for i in range(start, stop):
        yield generate_item(cfg, split, i)
