"""Contact sheets: look at corpus items (with captions) or at every object class.

    python -m data_engine.corpus.contact_sheet items out.png --split pretrain --n 24
    python -m data_engine.corpus.contact_sheet classes out.png --size 96
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_engine.corpus.config import CorpusConfig
from data_engine.corpus.generate import iter_corpus
from data_engine.corpus.pen import Pen
from data_engine.corpus.shapes import DRAWERS
from data_engine.corpus.vocab import COLORS, OBJECTS

log = logging.getLogger(__name__)


def items_sheet(cfg: CorpusConfig, split: str, path: str | Path, n: int = 24,
                start: int = 0, cols: int = 6, show_boxes: bool = False) -> Path:
    """Grid of ``n`` items of ``split`` with their captions (and truth boxes if asked)."""
    size = cfg.image_size
    text_h = 64
    tile_w = max(size, 160)
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile_w, rows * (size + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, item in enumerate(iter_corpus(cfg, split, start, start + n)):
        x, y = (k % cols) * tile_w, (k // cols) * (size + text_h)
        img = item.image.copy()
        if show_boxes:
            d = ImageDraw.Draw(img)
            for o in item.truth["objects"]:
                d.rectangle([o["box"][0], o["box"][1], o["box"][2] - 1, o["box"][3] - 1],
                            outline=(255, 0, 255))
        sheet.paste(img, (x, y))
        lines = textwrap.wrap(item.caption, width=tile_w // 6)[:5]
        draw.multiline_text((x + 2, y + size + 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    log.info("wrote %s (%d items of %s)", path, n, split)
    return path


def classes_sheet(path: str | Path, size: int = 96, cols: int = 8, seed: int = 0) -> Path:
    """Every object class drawn alone on gray, in two colours and random poses, labelled."""
    rng = np.random.default_rng(seed)
    label_h = 14
    rows = (len(OBJECTS) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * 2 * size, rows * (size + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, cls in enumerate(OBJECTS):
        x, y = (k % cols) * 2 * size, (k // cols) * (size + label_h)
        for j in range(2):
            color = COLORS[cls.colors[int(rng.integers(len(cls.colors)))]]
            long_side = 0.8 * size
            w, h = (long_side, long_side / cls.aspect) if cls.aspect >= 1 else (
                long_side * cls.aspect, long_side)
            box = ((size - w) / 2, (size - h) / 2, (size + w) / 2, (size + h) / 2)
            pattern = ("plain", "striped", "dotted")[j + 1 if cls.patternable else 0]
            pen = Pen(size, box, float(rng.uniform(-cls.max_rot, cls.max_rot)),
                      bool(cls.flip and j == 1), color, pattern)
            DRAWERS[cls.name](pen, color)
            layer, _ = pen.finish(max(1, round(size / 96)))
            tile = Image.new("RGBA", (size, size), (150, 185, 215, 255))
            tile.alpha_composite(layer)
            sheet.paste(tile.convert("RGB"), (x + j * size, y))
        draw.text((x + 2, y + size + 1), cls.name, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    log.info("wrote %s (%d classes)", path, len(OBJECTS))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("items", "classes"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", default="pretrain")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boxes", action="store_true", help="draw truth boxes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.what == "items":
        cfg = CorpusConfig(seed=args.seed, image_size=args.size)
        items_sheet(cfg, args.split, args.out, args.n, args.start, show_boxes=args.boxes)
    else:
        classes_sheet(args.out, args.size, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
