"""Procedural drawings of every object class, in the pen's normalised box frame.

Each drawer gets a :class:`~data_engine.corpus.pen.Pen` and the object's main colour and
draws a silhouette with a class-specific structure (wheels, petals, rays, windows...), so
classes differ in shape and not only in colour. Parts with ``body=True`` take the pattern.
"""

from __future__ import annotations

import math
from typing import Callable

from data_engine.corpus.pen import BLACK, GRAY, RGB, SKYGLASS, WHITE, Pen, dark, light

BROWN: RGB = (120, 75, 35)
GREEN: RGB = (40, 150, 50)
ORANGE: RGB = (245, 135, 20)
YELLOW: RGB = (250, 220, 50)
RED: RGB = (215, 35, 35)


def _accent(c: RGB, default: RGB, other: RGB) -> RGB:
    """``default`` unless it is too close to ``c`` (then ``other``)."""
    return other if sum(abs(a - b) for a, b in zip(c, default)) < 120 else default


# ---------------------------------------------------------------- sky and nature
def sun(p: Pen, c: RGB) -> None:
    for k in range(12):
        a = 2 * math.pi * k / 12
        p.poly([(0.5 + 0.3 * math.cos(a - 0.14), 0.5 + 0.3 * math.sin(a - 0.14)),
                (0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a)),
                (0.5 + 0.3 * math.cos(a + 0.14), 0.5 + 0.3 * math.sin(a + 0.14))], c, True)
    p.circle(0.5, 0.5, 0.31, c, True)


def moon(p: Pen, c: RGB) -> None:
    outer = [(0.5 + 0.48 * math.cos(math.radians(a)), 0.5 + 0.48 * math.sin(math.radians(a)))
             for a in range(50, 311, 10)]
    inner = [(0.72 + 0.38 * math.cos(math.radians(a)), 0.5 + 0.38 * math.sin(math.radians(a)))
             for a in range(284, 75, -12)]
    p.poly(outer + inner, c, True)
    p.circle(0.3, 0.42, 0.05, dark(c, 0.8))


def cloud(p: Pen, c: RGB) -> None:
    p.ellipse(0.28, 0.62, 0.2, 0.26, c, True)
    p.ellipse(0.5, 0.45, 0.26, 0.4, c, True)
    p.ellipse(0.73, 0.6, 0.2, 0.28, c, True)
    p.rect(0.15, 0.6, 0.85, 0.88, c, True)
    p.rect(0.2, 0.8, 0.8, 0.88, dark(c, 0.85))


def tree(p: Pen, c: RGB) -> None:
    p.rect(0.42, 0.55, 0.58, 1.0, BROWN)
    p.ellipse(0.5, 0.32, 0.42, 0.3, c, True)
    p.ellipse(0.28, 0.5, 0.26, 0.18, c, True)
    p.ellipse(0.72, 0.5, 0.26, 0.18, c, True)
    p.circle(0.38, 0.3, 0.08, dark(c, 0.75))
    p.circle(0.62, 0.45, 0.07, dark(c, 0.75))


def flower(p: Pen, c: RGB) -> None:
    p.line([(0.5, 0.45), (0.5, 1.0)], GREEN, 0.1)
    p.ellipse(0.68, 0.75, 0.18, 0.05, GREEN)
    for k in range(6):
        a = 2 * math.pi * k / 6
        p.circle(0.5 + 0.3 * math.cos(a), 0.28 + 0.18 * math.sin(a), 0.2, c, True)
    p.circle(0.5, 0.28, 0.17, _accent(c, YELLOW, BROWN))


def mushroom(p: Pen, c: RGB) -> None:
    p.rect(0.38, 0.45, 0.62, 0.95, (240, 225, 200))
    p.ellipse(0.5, 0.5, 0.49, 0.45, c, True, 180, 360)
    spot = _accent(c, WHITE, BROWN)
    for x, y in ((0.3, 0.33), (0.55, 0.2), (0.72, 0.38)):
        p.circle(x, y, 0.07, spot)


def cactus(p: Pen, c: RGB) -> None:
    p.rect(0.38, 0.12, 0.62, 1.0, c, True)
    p.ellipse(0.5, 0.12, 0.12, 0.1, c, True)
    p.rect(0.1, 0.32, 0.26, 0.62, c, True)
    p.ellipse(0.18, 0.32, 0.08, 0.06, c, True)
    p.rect(0.1, 0.55, 0.45, 0.66, c, True)
    p.rect(0.74, 0.2, 0.9, 0.5, c, True)
    p.ellipse(0.82, 0.2, 0.08, 0.06, c, True)
    p.rect(0.55, 0.44, 0.9, 0.55, c, True)
    p.line([(0.5, 0.2), (0.5, 0.95)], dark(c, 0.7), 0.03)


def apple(p: Pen, c: RGB) -> None:
    p.ellipse(0.36, 0.6, 0.3, 0.36, c, True)
    p.ellipse(0.64, 0.6, 0.3, 0.36, c, True)
    p.line([(0.5, 0.3), (0.56, 0.06)], BROWN, 0.07)
    p.ellipse(0.7, 0.14, 0.14, 0.06, GREEN)
    p.circle(0.32, 0.48, 0.06, light(c, 0.6))


# ----------------------------------------------------------------------- animals
def fish(p: Pen, c: RGB) -> None:
    p.ellipse(0.42, 0.5, 0.34, 0.32, c, True)
    p.poly([(0.7, 0.5), (1.0, 0.15), (1.0, 0.85)], c, True)
    p.poly([(0.35, 0.22), (0.55, 0.0), (0.6, 0.25)], dark(c, 0.75))
    p.circle(0.22, 0.42, 0.08, WHITE)
    p.circle(0.22, 0.42, 0.04, BLACK)


def bird(p: Pen, c: RGB) -> None:
    p.poly([(0.25, 0.58), (0.02, 0.45), (0.04, 0.72)], c, True)
    p.ellipse(0.48, 0.6, 0.28, 0.14, c, True)
    p.circle(0.76, 0.5, 0.14, c, True)
    p.poly([(0.38, 0.56), (0.12, 0.02), (0.58, 0.52)], dark(c, 0.8))
    p.poly([(0.84, 0.46), (1.0, 0.52), (0.84, 0.58)], ORANGE)
    p.circle(0.78, 0.46, 0.04, _accent(c, BLACK, WHITE))


def dog(p: Pen, c: RGB) -> None:
    d = dark(c, 0.7)
    p.line([(0.2, 0.4), (0.04, 0.15)], c, 0.08)
    for x in (0.22, 0.34, 0.6, 0.72):
        p.rect(x, 0.55, x + 0.08, 0.98, c, True)
    p.ellipse(0.47, 0.47, 0.32, 0.16, c, True)
    p.ellipse(0.8, 0.28, 0.15, 0.2, c, True)
    p.ellipse(0.94, 0.35, 0.07, 0.08, c, True)
    p.ellipse(0.74, 0.3, 0.05, 0.16, d)
    p.circle(0.84, 0.22, 0.04, _accent(c, BLACK, WHITE))
    p.circle(0.99, 0.33, 0.035, BLACK)


def cat(p: Pen, c: RGB) -> None:
    p.line([(0.78, 0.9), (0.95, 0.7), (0.88, 0.45)], c, 0.08)
    p.ellipse(0.5, 0.7, 0.34, 0.3, c, True)
    p.poly([(0.28, 0.24), (0.3, 0.0), (0.46, 0.12)], c, True)
    p.poly([(0.54, 0.12), (0.7, 0.0), (0.72, 0.24)], c, True)
    p.circle(0.5, 0.28, 0.3, c, True)
    eye = _accent(c, (90, 200, 60), YELLOW)
    p.circle(0.4, 0.26, 0.06, eye)
    p.circle(0.6, 0.26, 0.06, eye)
    p.poly([(0.46, 0.35), (0.54, 0.35), (0.5, 0.4)], (240, 120, 150))


def butterfly(p: Pen, c: RGB) -> None:
    lc = light(c, 0.35)
    p.ellipse(0.28, 0.3, 0.25, 0.26, c, True)
    p.ellipse(0.72, 0.3, 0.25, 0.26, c, True)
    p.ellipse(0.32, 0.7, 0.18, 0.2, lc, True)
    p.ellipse(0.68, 0.7, 0.18, 0.2, lc, True)
    p.circle(0.28, 0.3, 0.08, dark(c, 0.6))
    p.circle(0.72, 0.3, 0.08, dark(c, 0.6))
    p.ellipse(0.5, 0.5, 0.05, 0.36, BLACK)
    p.line([(0.48, 0.16), (0.38, 0.0)], BLACK, 0.03)
    p.line([(0.52, 0.16), (0.62, 0.0)], BLACK, 0.03)


def snail(p: Pen, c: RGB) -> None:
    body = (215, 200, 160)
    p.ellipse(0.52, 0.88, 0.46, 0.1, body)
    p.line([(0.86, 0.82), (0.92, 0.5)], body, 0.06)
    p.line([(0.92, 0.82), (1.0, 0.52)], body, 0.06)
    p.circle(0.45, 0.5, 0.42, c, True)
    spiral = [(0.45 + 0.3 * t * math.cos(6 * t + 1), 0.5 + 0.3 * t * math.sin(6 * t + 1) * 1.4)
              for t in [k / 24 for k in range(25)]]
    p.line(spiral, dark(c, 0.55), 0.05)


def crab(p: Pen, c: RGB) -> None:
    d = dark(c, 0.75)
    for side in (-1, 1):
        for k in range(3):
            y = 0.55 + 0.1 * k
            p.line([(0.5 + side * 0.2, y), (0.5 + side * 0.4, y + 0.08),
                    (0.5 + side * 0.46, y + 0.25)], d, 0.05)
        p.line([(0.5 + side * 0.22, 0.5), (0.5 + side * 0.36, 0.3)], d, 0.06)
        p.circle(0.5 + side * 0.38, 0.2, 0.14, c, True)
        p.poly([(0.5 + side * 0.38, 0.2), (0.5 + side * 0.33, 0.0), (0.5 + side * 0.46, 0.02)],
               None)
        p.line([(0.5 + side * 0.08, 0.45), (0.5 + side * 0.1, 0.28)], d, 0.03)
        p.circle(0.5 + side * 0.1, 0.27, 0.05, BLACK)
    p.ellipse(0.5, 0.6, 0.3, 0.19, c, True)


def turtle(p: Pen, c: RGB) -> None:
    skin = (110, 160, 70)
    p.ellipse(0.88, 0.66, 0.11, 0.12, skin)
    p.ellipse(0.28, 0.86, 0.08, 0.12, skin)
    p.ellipse(0.7, 0.86, 0.08, 0.12, skin)
    p.ellipse(0.5, 0.75, 0.38, 0.6, c, True, 180, 360)
    d = dark(c, 0.6)
    p.line([(0.3, 0.75), (0.36, 0.45), (0.64, 0.45), (0.7, 0.75)], d, 0.05)
    p.line([(0.5, 0.2), (0.5, 0.45)], d, 0.05)
    p.rect(0.1, 0.72, 0.9, 0.8, dark(c, 0.8))
    p.circle(0.92, 0.62, 0.03, BLACK)


# ---------------------------------------------------------------------- vehicles
def _wheel(p: Pen, x: float, y: float, r: float) -> None:
    p.circle(x, y, r, BLACK)
    p.circle(x, y, r * 0.45, GRAY)


def car(p: Pen, c: RGB) -> None:
    p.poly([(0.22, 0.45), (0.33, 0.12), (0.68, 0.12), (0.82, 0.45)], c, True)
    p.rect(0.02, 0.42, 0.98, 0.8, c, True)
    p.poly([(0.3, 0.43), (0.37, 0.2), (0.48, 0.2), (0.48, 0.43)], SKYGLASS)
    p.poly([(0.53, 0.43), (0.53, 0.2), (0.65, 0.2), (0.74, 0.43)], SKYGLASS)
    p.rect(0.9, 0.5, 0.98, 0.58, YELLOW)
    _wheel(p, 0.24, 0.8, 0.2)
    _wheel(p, 0.76, 0.8, 0.2)


def bus(p: Pen, c: RGB) -> None:
    p.rect(0.02, 0.05, 0.98, 0.84, c, True)
    for k in range(5):
        x = 0.06 + 0.15 * k
        p.rect(x, 0.15, x + 0.11, 0.45, SKYGLASS)
    p.rect(0.84, 0.15, 0.95, 0.75, SKYGLASS)
    p.rect(0.02, 0.55, 0.82, 0.6, dark(c, 0.7))
    _wheel(p, 0.2, 0.84, 0.16)
    _wheel(p, 0.75, 0.84, 0.16)


def truck(p: Pen, c: RGB) -> None:
    p.rect(0.02, 0.02, 0.62, 0.76, c, True)
    p.rect(0.64, 0.28, 0.97, 0.76, dark(c, 0.8) if sum(c) > 150 else light(c, 0.3))
    p.rect(0.72, 0.34, 0.92, 0.52, SKYGLASS)
    p.rect(0.02, 0.7, 0.97, 0.78, GRAY)
    _wheel(p, 0.14, 0.82, 0.17)
    _wheel(p, 0.44, 0.82, 0.17)
    _wheel(p, 0.82, 0.82, 0.17)


def bicycle(p: Pen, c: RGB) -> None:
    for x in (0.2, 0.8):
        p.circle(x, 0.66, 0.34, BLACK)
        p.circle(x, 0.66, 0.27, None)
        p.circle(x, 0.66, 0.05, GRAY)
    frame = [(0.2, 0.66), (0.45, 0.66), (0.68, 0.34), (0.36, 0.34), (0.2, 0.66)]
    p.line(frame, c, 0.07)
    p.line([(0.45, 0.66), (0.33, 0.22)], c, 0.07)
    p.line([(0.8, 0.66), (0.68, 0.34), (0.64, 0.14)], c, 0.07)
    p.line([(0.26, 0.2), (0.4, 0.2)], BLACK, 0.08)
    p.line([(0.58, 0.14), (0.72, 0.12)], BLACK, 0.06)


def boat(p: Pen, c: RGB) -> None:
    p.poly([(0.0, 0.66), (1.0, 0.66), (0.82, 0.95), (0.18, 0.95)], c, True)
    p.line([(0.5, 0.02), (0.5, 0.68)], BROWN, 0.04)
    sail = _accent(c, WHITE, (240, 220, 160))
    p.poly([(0.53, 0.04), (0.53, 0.6), (0.92, 0.6)], sail)
    p.poly([(0.47, 0.14), (0.47, 0.6), (0.16, 0.6)], sail)


def airplane(p: Pen, c: RGB) -> None:
    d = dark(c, 0.75)
    p.poly([(0.04, 0.5), (0.1, 0.06), (0.22, 0.06), (0.3, 0.45)], c, True)
    p.ellipse(0.5, 0.52, 0.47, 0.14, c, True)
    p.poly([(0.38, 0.55), (0.6, 0.55), (0.4, 0.98), (0.3, 0.98)], d)
    for k in range(6):
        p.circle(0.46 + 0.07 * k, 0.48, 0.05, SKYGLASS)


def rocket(p: Pen, c: RGB) -> None:
    fin = _accent(c, RED, (40, 60, 160))
    p.poly([(0.35, 0.82), (0.5, 1.0), (0.65, 0.82)], ORANGE)
    p.poly([(0.3, 0.55), (0.02, 0.88), (0.3, 0.82)], fin)
    p.poly([(0.7, 0.55), (0.98, 0.88), (0.7, 0.82)], fin)
    p.poly([(0.5, 0.0), (0.7, 0.22), (0.72, 0.84), (0.28, 0.84), (0.3, 0.22)], c, True)
    p.circle(0.5, 0.4, 0.16, SKYGLASS)


# --------------------------------------------------------------------- buildings
def house(p: Pen, c: RGB) -> None:
    p.rect(0.12, 0.45, 0.88, 1.0, c, True)
    p.poly([(0.0, 0.5), (0.5, 0.04), (1.0, 0.5)], _accent(c, (160, 50, 40), (70, 70, 90)))
    p.rect(0.42, 0.68, 0.58, 1.0, BROWN)
    p.rect(0.2, 0.58, 0.34, 0.74, SKYGLASS)
    p.rect(0.66, 0.58, 0.8, 0.74, SKYGLASS)


def tent(p: Pen, c: RGB) -> None:
    p.poly([(0.0, 1.0), (0.5, 0.06), (1.0, 1.0)], c, True)
    p.poly([(0.36, 1.0), (0.5, 0.45), (0.64, 1.0)], dark(c, 0.45))
    p.line([(0.5, 0.08), (0.5, 0.0)], BROWN, 0.05)


def lighthouse(p: Pen, c: RGB) -> None:
    band = _accent(c, WHITE, RED)
    p.poly([(0.2, 1.0), (0.32, 0.3), (0.68, 0.3), (0.8, 1.0)], c, True)
    for y0, y1 in ((0.45, 0.58), (0.72, 0.85)):
        dx0, dx1 = 0.12 * (1 - (y0 - 0.3) / 0.7), 0.12 * (1 - (y1 - 0.3) / 0.7)
        p.poly([(0.32 - (0.12 - dx0), y0), (0.68 + (0.12 - dx0), y0),
                (0.68 + (0.12 - dx1), y1), (0.32 - (0.12 - dx1), y1)], band)
    p.rect(0.26, 0.26, 0.74, 0.31, BLACK)
    p.rect(0.34, 0.13, 0.66, 0.26, YELLOW)
    p.poly([(0.28, 0.14), (0.5, 0.0), (0.72, 0.14)], dark(c, 0.5) if sum(c) > 120 else GRAY)


def windmill(p: Pen, c: RGB) -> None:
    p.poly([(0.3, 1.0), (0.4, 0.4), (0.6, 0.4), (0.7, 1.0)], c, True)
    p.rect(0.45, 0.8, 0.55, 1.0, BROWN)
    blade = _accent(c, (235, 230, 215), (120, 90, 60))
    hub = (0.5, 0.38)
    for k in range(4):
        a = math.pi / 4 + k * math.pi / 2
        ca, sa = math.cos(a), math.sin(a)
        pts = [(hub[0] + ca * r * 0.8 - sa * s * 0.14, hub[1] + (sa * r + ca * s * 0.14) * 0.9)
               for r, s in ((0.08, -1), (0.5, -1), (0.5, 1), (0.08, 1))]
        p.poly(pts, blade)
    p.circle(hub[0], hub[1], 0.06, BLACK)


# ---------------------------------------------------------------- toys and things
def balloon(p: Pen, c: RGB) -> None:
    p.ellipse(0.5, 0.4, 0.46, 0.38, c, True)
    p.line([(0.5, 0.78), (0.42, 0.88), (0.56, 1.0)], (90, 90, 90), 0.03)
    p.poly([(0.45, 0.8), (0.5, 0.76), (0.55, 0.8)], dark(c, 0.8))
    p.ellipse(0.34, 0.26, 0.07, 0.1, light(c, 0.6))


def kite(p: Pen, c: RGB) -> None:
    p.poly([(0.5, 0.0), (0.95, 0.33), (0.5, 0.78), (0.05, 0.33)], c, True)
    d = dark(c, 0.6)
    p.line([(0.5, 0.0), (0.5, 0.78)], d, 0.03)
    p.line([(0.05, 0.33), (0.95, 0.33)], d, 0.03)
    tail = [(0.5, 0.78), (0.42, 0.86), (0.55, 0.93), (0.45, 1.0)]
    p.line(tail, (80, 80, 80), 0.03)
    for x, y in tail[1:3]:
        p.poly([(x - 0.08, y - 0.03), (x + 0.08, y + 0.03), (x + 0.08, y - 0.03),
                (x - 0.08, y + 0.03)], _accent(c, RED, YELLOW))


def umbrella(p: Pen, c: RGB) -> None:
    arc = [(0.5 + 0.5 * math.cos(math.radians(a)), 0.48 + 0.44 * math.sin(math.radians(a)))
           for a in range(180, 361, 10)]
    scallop = []
    for k in range(4, 0, -1):
        for t in (0.25, 0.5, 0.75):
            x = (k - t) / 4
            scallop.append((x, 0.48 - 0.08 * math.sin(math.pi * t)))
    p.poly(arc + scallop, c, True)
    p.line([(0.5, 0.04), (0.5, 0.88)], (70, 60, 50), 0.05)
    hook = [(0.5 - 0.09 + 0.09 * math.cos(math.radians(a)), 0.88 + 0.09 * math.sin(math.radians(a)))
            for a in range(0, 181, 30)]
    p.line(hook, (70, 60, 50), 0.05)


def teddy_bear(p: Pen, c: RGB) -> None:
    lc = light(c, 0.45)
    for x in (0.24, 0.76):
        p.circle(x, 0.1, 0.12, c, True)
        p.circle(x, 0.1, 0.06, lc)
    p.ellipse(0.5, 0.7, 0.3, 0.27, c, True)
    p.ellipse(0.18, 0.58, 0.1, 0.14, c, True)
    p.ellipse(0.82, 0.58, 0.1, 0.14, c, True)
    p.ellipse(0.3, 0.92, 0.13, 0.08, c, True)
    p.ellipse(0.7, 0.92, 0.13, 0.08, c, True)
    p.circle(0.5, 0.28, 0.26, c, True)
    p.ellipse(0.5, 0.36, 0.12, 0.08, lc)
    p.ellipse(0.5, 0.7, 0.16, 0.14, lc)
    p.circle(0.4, 0.24, 0.04, BLACK)
    p.circle(0.6, 0.24, 0.04, BLACK)
    p.circle(0.5, 0.33, 0.04, BLACK)


def ice_cream(p: Pen, c: RGB) -> None:
    cone = (215, 165, 95)
    p.poly([(0.12, 0.45), (0.88, 0.45), (0.5, 1.0)], cone)
    d = dark(cone, 0.7)
    p.line([(0.3, 0.48), (0.6, 0.85)], d, 0.04)
    p.line([(0.7, 0.48), (0.4, 0.85)], d, 0.04)
    p.ellipse(0.5, 0.3, 0.46, 0.26, c, True)
    for x in (0.2, 0.4, 0.6, 0.8):
        p.circle(x, 0.48, 0.1, c, True)
    p.circle(0.5, 0.06, 0.08, RED)


def light_bulb(p: Pen, c: RGB) -> None:
    p.circle(0.5, 0.36, 0.48, c, True)
    p.poly([(0.26, 0.6), (0.74, 0.6), (0.66, 0.76), (0.34, 0.76)], c, True)
    p.rect(0.33, 0.74, 0.67, 0.93, (150, 150, 155))
    for y in (0.79, 0.85):
        p.line([(0.33, y), (0.67, y)], (90, 90, 95), 0.04)
    p.rect(0.43, 0.93, 0.57, 1.0, BLACK)
    p.line([(0.42, 0.6), (0.42, 0.38), (0.47, 0.3), (0.53, 0.38), (0.58, 0.3), (0.58, 0.6)],
           (120, 80, 40), 0.04)


def clock(p: Pen, c: RGB) -> None:
    p.circle(0.5, 0.5, 0.5, c, True)
    p.circle(0.5, 0.5, 0.4, WHITE)
    for k in range(12):
        a = 2 * math.pi * k / 12
        p.line([(0.5 + 0.32 * math.cos(a), 0.5 + 0.32 * math.sin(a)),
                (0.5 + 0.38 * math.cos(a), 0.5 + 0.38 * math.sin(a))], BLACK, 0.04)
    p.line([(0.5, 0.5), (0.5, 0.2)], BLACK, 0.06)
    p.line([(0.5, 0.5), (0.7, 0.58)], BLACK, 0.06)


def cup(p: Pen, c: RGB) -> None:
    p.circle(0.76, 0.5, 0.25, c, True)
    p.circle(0.76, 0.5, 0.14, None, True)
    p.poly([(0.05, 0.12), (0.72, 0.12), (0.66, 0.95), (0.11, 0.95)], c, True)
    p.ellipse(0.385, 0.12, 0.33, 0.06, dark(c, 0.6))


def bottle(p: Pen, c: RGB) -> None:
    p.rect(0.1, 0.38, 0.9, 1.0, c, True)
    p.poly([(0.1, 0.4), (0.36, 0.16), (0.64, 0.16), (0.9, 0.4)], c, True)
    p.rect(0.36, 0.04, 0.64, 0.2, c, True)
    p.rect(0.32, 0.0, 0.68, 0.07, dark(c, 0.5))
    p.rect(0.1, 0.55, 0.9, 0.78, _accent(c, (240, 235, 215), (200, 60, 60)))
    p.rect(0.22, 0.42, 0.3, 0.95, light(c, 0.4))


def chair(p: Pen, c: RGB) -> None:
    d = dark(c, 0.65)
    for x0, x1, y1 in ((0.04, 0.14, 1.0), (0.86, 0.96, 1.0), (0.24, 0.32, 0.9), (0.68, 0.76, 0.9)):
        p.rect(x0, 0.6, x1, y1, d)
    p.rect(0.16, 0.0, 0.84, 0.16, c, True)
    for x in (0.18, 0.38, 0.56, 0.74):
        p.rect(x, 0.12, x + 0.08, 0.52, c, True)
    p.poly([(0.14, 0.5), (0.86, 0.5), (1.0, 0.64), (0.0, 0.64)], c, True)


def guitar(p: Pen, c: RGB) -> None:
    p.rect(0.43, 0.04, 0.57, 0.55, (95, 60, 30))
    p.rect(0.36, 0.0, 0.64, 0.09, (60, 40, 20))
    p.ellipse(0.5, 0.56, 0.4, 0.17, c, True)
    p.ellipse(0.5, 0.79, 0.5, 0.21, c, True)
    p.ellipse(0.5, 0.6, 0.15, 0.065, BLACK)
    p.rect(0.36, 0.82, 0.64, 0.86, BLACK)
    p.line([(0.5, 0.04), (0.5, 0.84)], (220, 220, 220), 0.03)


def candle(p: Pen, c: RGB) -> None:
    p.ellipse(0.5, 0.14, 0.22, 0.13, ORANGE)
    p.ellipse(0.5, 0.17, 0.1, 0.07, YELLOW)
    p.line([(0.5, 0.24), (0.5, 0.32)], BLACK, 0.08)
    p.rect(0.2, 0.32, 0.8, 1.0, c, True)
    p.ellipse(0.35, 0.42, 0.08, 0.1, light(c, 0.5))


def flag(p: Pen, c: RGB) -> None:
    top = [(0.11 + 0.84 * t, 0.05 + 0.05 * math.sin(2 * math.pi * t)) for t in
           [k / 10 for k in range(11)]]
    bottom = [(x, y + 0.5) for x, y in reversed(top)]
    p.poly(top + bottom, c, True)
    p.rect(0.04, 0.0, 0.11, 1.0, (110, 110, 115))
    p.circle(0.075, 0.02, 0.05, YELLOW)


def heart(p: Pen, c: RGB) -> None:
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 34, 0.45 - y / 34))
    p.poly(pts, c, True)
    p.ellipse(0.33, 0.28, 0.07, 0.05, light(c, 0.6))


# ---------------------------------------------------------- street and snow
def fire_hydrant(p: Pen, c: RGB) -> None:
    d = dark(c, 0.65)
    p.rect(0.06, 0.42, 0.94, 0.58, d)
    p.rect(0.44, 0.02, 0.56, 0.12, d)
    p.rect(0.24, 0.26, 0.76, 0.9, c, True)
    p.ellipse(0.5, 0.27, 0.26, 0.16, c, True, 180, 360)
    p.rect(0.14, 0.88, 0.86, 1.0, d)
    p.circle(0.5, 0.55, 0.1, d)


def traffic_light(p: Pen, c: RGB) -> None:
    p.rect(0.42, 0.76, 0.58, 1.0, (70, 70, 75))
    p.rect(0.08, 0.0, 0.92, 0.78, c, True)
    for y, lamp in ((0.14, RED), (0.39, YELLOW), (0.64, (40, 210, 80))):
        p.circle(0.5, y, 0.3, BLACK if c != BLACK else (60, 60, 60))
        p.circle(0.5, y, 0.24, lamp)


def stop_sign(p: Pen, c: RGB) -> None:
    p.rect(0.45, 0.5, 0.55, 1.0, (130, 130, 135))
    for r, col in ((0.5, WHITE), (0.44, c)):
        pts = [(0.5 + r * math.cos(math.pi / 8 + k * math.pi / 4),
                0.3 + r * 0.6 * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
        p.poly(pts, col, col == c)
    p.rect(0.2, 0.26, 0.8, 0.34, WHITE)


def traffic_cone(p: Pen, c: RGB) -> None:
    p.rect(0.0, 0.88, 1.0, 1.0, c, True)
    p.poly([(0.12, 0.9), (0.42, 0.0), (0.58, 0.0), (0.88, 0.9)], c, True)
    for y0, y1 in ((0.3, 0.42), (0.58, 0.7)):
        a, b = 0.42 - 0.3 * y0 / 0.9, 0.42 - 0.3 * y1 / 0.9
        p.poly([(a, y0), (1 - a, y0), (1 - b, y1), (b, y1)], WHITE)


def snowman(p: Pen, c: RGB) -> None:
    p.ellipse(0.5, 0.76, 0.45, 0.24, c, True)
    p.ellipse(0.5, 0.44, 0.34, 0.17, c, True)
    p.ellipse(0.5, 0.2, 0.25, 0.13, c, True)
    p.rect(0.3, 0.06, 0.7, 0.1, BLACK)
    p.rect(0.37, -0.0, 0.63, 0.08, BLACK)
    p.poly([(0.5, 0.2), (0.78, 0.23), (0.5, 0.25)], ORANGE)
    for y in (0.4, 0.5, 0.7):
        p.circle(0.5, y, 0.04, BLACK)
    p.circle(0.42, 0.16, 0.035, BLACK)
    p.circle(0.58, 0.16, 0.035, BLACK)
    p.line([(0.2, 0.42), (0.0, 0.3)], BROWN, 0.04)
    p.line([(0.8, 0.42), (1.0, 0.3)], BROWN, 0.04)


DRAWERS: dict[str, Callable[[Pen, RGB], None]] = {
    "sun": sun, "moon": moon, "cloud": cloud, "tree": tree, "flower": flower,
    "mushroom": mushroom, "cactus": cactus, "apple": apple, "fish": fish, "bird": bird,
    "dog": dog, "cat": cat, "butterfly": butterfly, "snail": snail, "crab": crab,
    "turtle": turtle, "car": car, "bus": bus, "truck": truck, "bicycle": bicycle, "boat": boat,
    "airplane": airplane, "rocket": rocket, "house": house, "tent": tent,
    "lighthouse": lighthouse, "windmill": windmill, "balloon": balloon, "kite": kite,
    "umbrella": umbrella, "teddy bear": teddy_bear, "ice cream": ice_cream,
    "light bulb": light_bulb, "clock": clock, "cup": cup, "bottle": bottle, "chair": chair,
    "guitar": guitar, "candle": candle, "flag": flag, "heart": heart,
    "fire hydrant": fire_hydrant, "traffic light": traffic_light, "stop sign": stop_sign,
    "traffic cone": traffic_cone, "snowman": snowman,
}
