"""Scene backgrounds: sky/ground/water bands with jittered colours and horizon.

Backgrounds never contain anything that is an object class (no stars, trees or houses),
so an image's truth tags are exactly its drawn objects + its scene + their colours.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# scene -> (top colour, horizon colour, ground near colour, ground far colour)
_PALETTES: dict[str, tuple[RGB, RGB, RGB, RGB]] = {
    "beach": ((110, 175, 235), (190, 225, 250), (238, 214, 160), (225, 195, 135)),
    "night": ((8, 12, 40), (35, 40, 95), (20, 28, 35), (10, 15, 22)),
    "snow": ((170, 195, 220), (220, 228, 238), (236, 240, 248), (212, 222, 238)),
    "meadow": ((100, 165, 235), (185, 220, 250), (110, 185, 80), (75, 150, 55)),
    "street": ((140, 180, 225), (205, 220, 235), (110, 110, 115), (85, 85, 90)),
    "lake": ((120, 170, 225), (200, 225, 245), (60, 120, 190), (35, 90, 160)),
    "desert": ((150, 195, 240), (240, 225, 190), (235, 195, 120), (215, 160, 85)),
    "room": ((215, 200, 175), (200, 185, 160), (160, 110, 70), (135, 90, 55)),
}


def _jitter(c: RGB, rng: np.random.Generator, amount: int = 12) -> np.ndarray:
    return np.clip(np.asarray(c, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)


def _jitter_all(colors, rng: np.random.Generator, amount: int = 12) -> np.ndarray:
    """All palette colours jittered at once: (n, 3) float32."""
    c = np.asarray(colors, np.float32)
    return np.clip(c + rng.integers(-amount, amount + 1, c.shape), 0, 255)


def _vertical(size: int, y0: int, y1: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(1, y1 - y0), dtype=np.float32)[:, None]  # (rows, 1)
    band = top[None, :] * (1 - t) + bottom[None, :] * t  # (rows, 3)
    return band[:, None, :]  # (rows, 1, 3), broadcast over columns by the caller


def paint_background(scene: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB background of one scene type; the horizon height and colours vary per image."""
    top, horizon, near, far = _jitter_all(_PALETTES[scene], rng)
    hy = int(size * rng.uniform(0.38, 0.55))  # horizon row
    arr = np.empty((size, size, 3), np.float32)
    arr[:hy] = _vertical(size, 0, hy, top, horizon)
    arr[hy:] = _vertical(size, hy, size, far, near)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    s = size / 96.0
    if scene == "beach":  # a sea band between sky and sand, with a foam line
        sea_bottom = hy + int(size * rng.uniform(0.08, 0.14))
        sea = tuple(int(v) for v in _jitter((45, 120, 200), rng))
        draw.rectangle([0, hy, size, sea_bottom], fill=sea)
        draw.line([0, sea_bottom, size, sea_bottom], fill=(245, 245, 240), width=max(1, int(2 * s)))
    elif scene == "night":  # dark hills
        pts = [(0, hy)] + [(x, hy - rng.uniform(0, 8 * s)) for x in np.linspace(0, size, 6)]
        draw.polygon(pts + [(size, size), (0, size)], fill=(18, 25, 30))
    elif scene == "street":  # pavement strip and a dashed lane marking
        draw.rectangle([0, hy, size, hy + int(10 * s)], fill=(175, 170, 160))
        lane_y = (hy + int(10 * s) + size) // 2
        for x in range(int(rng.integers(0, int(16 * s) + 1)) - int(16 * s), size, int(24 * s)):
            draw.rectangle([x, lane_y, x + int(12 * s), lane_y + max(1, int(2 * s))],
                           fill=(240, 240, 235))
    elif scene == "lake":  # far shore line and ripples
        draw.rectangle([0, hy - int(4 * s), size, hy], fill=(70, 120, 70))
        for _ in range(5):
            x = rng.uniform(0, size)
            y = rng.uniform(hy + 6 * s, size - 2)
            draw.line([x, y, x + 10 * s, y], fill=(150, 190, 235), width=max(1, int(s)))
    elif scene == "meadow":  # grass tufts
        for _ in range(int(14 * s)):
            x, y = rng.uniform(0, size), rng.uniform(hy + 4, size)
            draw.line([x, y, x + 2 * s, y - 4 * s], fill=(50, 120, 40), width=max(1, int(s)))
    elif scene == "desert":  # a dune curve
        pts = [(x, hy + 10 * s + 6 * s * np.sin(x / size * 6 + rng.uniform(0, 6)))
               for x in np.linspace(0, size, 12)]
        draw.line(pts, fill=(200, 150, 80), width=max(1, int(2 * s)))
    elif scene == "room":  # skirting board between wall and floor
        draw.rectangle([0, hy - int(3 * s), size, hy], fill=(240, 235, 225))
    # snow: the gradient alone (white ground, pale sky)
    return img
