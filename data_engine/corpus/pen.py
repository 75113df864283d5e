"""A tiny vector pen: draws one object in its own normalised frame onto an RGBA layer.

Object drawers describe shapes in box coordinates ``(0, 0)`` (top left) .. ``(1, 1)``
(bottom right); the pen maps them through the object's pose (box, rotation, mirror) to
pixels, so every class gets size, aspect, rotation and position variation for free and
draws crisply at any image size. Parts flagged ``body=True`` form the region that gets
the stripe/dot pattern; the whole silhouette gets a dark outline at the end so objects
stay separable from the background and from each other when they overlap.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
Point = tuple[float, float]

BLACK: RGB = (28, 28, 28)
WHITE: RGB = (246, 246, 246)
GRAY: RGB = (128, 128, 132)
SKYGLASS: RGB = (170, 215, 245)


def dark(c: RGB, f: float = 0.55) -> RGB:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def light(c: RGB, f: float = 0.5) -> RGB:
    return tuple(int(v + (255 - v) * f) for v in c)  # type: ignore[return-value]


def brightness(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


@lru_cache(maxsize=64)
def _arc(a0: float, a1: float) -> tuple[tuple[float, float], ...]:
    """Unit (cos, sin) points from a0 to a1 degrees, one every ~12 degrees."""
    n = max(10, int(abs(a1 - a0) / 12))
    return tuple((math.cos(math.radians(a0 + (a1 - a0) * k / n)),
                  math.sin(math.radians(a0 + (a1 - a0) * k / n))) for k in range(n + 1))


class Pen:
    """Draws primitives of one object; ``finish`` returns the layer and its pixel box."""

    def __init__(self, size: int, box: tuple[float, float, float, float], angle_deg: float,
                 flip: bool, color: RGB, pattern: str = "plain") -> None:
        self.size = size
        self.layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.layer)
        self.body = Image.new("L", (size, size), 0) if pattern != "plain" else None
        self.body_draw = ImageDraw.Draw(self.body) if self.body is not None else None
        x0, y0, x1, y1 = box
        self.cx, self.cy = (x0 + x1) / 2, (y0 + y1) / 2
        self.w, self.h = x1 - x0, y1 - y0
        self.m = min(self.w, self.h)
        a = math.radians(angle_deg)
        self.cos, self.sin = math.cos(a), math.sin(a)
        self.flip = flip
        self.color = color
        self.pattern = pattern
        self._pattern_done = pattern == "plain"

    # ------------------------------------------------------------------ mapping
    def _map(self, pts) -> list[Point]:
        """Box units ``[(x, y), ...]`` -> pixel points (plain Python: lists are short)."""
        w, h, cx, cy, c, s = self.w, self.h, self.cx, self.cy, self.cos, self.sin
        sign, off = (-1.0, 0.5) if self.flip else (1.0, -0.5)
        out = []
        for x, y in pts:
            dx, dy = (sign * x + off) * w, (y - 0.5) * h
            out.append((cx + dx * c - dy * s, cy + dx * s + dy * c))
        return out

    # --------------------------------------------------------------- primitives
    def poly(self, pts: list[Point], fill: RGB | None, body: bool = False) -> None:
        """Filled polygon; ``fill=None`` erases (makes the pixels transparent)."""
        if not body:
            self._apply_pattern()
        xy = self._map(pts)
        self.draw.polygon(xy, fill=(*fill, 255) if fill else (0, 0, 0, 0))
        if self.body_draw is not None:  # only patterned objects need the body mask
            self.body_draw.polygon(xy, fill=255 if (body and fill) else 0)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: RGB | None,
                body: bool = False, a0: float = 0.0, a1: float = 360.0) -> None:
        """Ellipse (or chord of it from angle a0 to a1, degrees, y down) in box units."""
        self.poly([(cx + rx * co, cy + ry * si) for co, si in _arc(a0, a1)], fill, body)

    def circle(self, cx: float, cy: float, r: float, fill: RGB | None, body: bool = False,
               a0: float = 0.0, a1: float = 360.0) -> None:
        """Round circle whatever the box aspect: ``r`` is a fraction of the box's short side."""
        self.ellipse(cx, cy, r * self.m / self.w, r * self.m / self.h, fill, body, a0, a1)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB | None,
             body: bool = False) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill, body)

    def line(self, pts: list[Point], fill: RGB, width: float) -> None:
        """Polyline; ``width`` is a fraction of the box's short side (at least 1 px)."""
        self._apply_pattern()
        px = max(1, round(width * self.m))
        self.draw.line(self._map(pts), fill=(*fill, 255), width=px, joint="curve")

    # ----------------------------------------------------------------- finishing
    def _apply_pattern(self) -> None:
        """Paint stripes or dots over the body parts drawn so far (once)."""
        if self._pattern_done:
            return
        self._pattern_done = True
        bbox = self.body.getbbox() if self.body is not None else None
        if not bbox:
            return
        x0, y0, x1, y1 = bbox
        inside = np.asarray(self.body.crop(bbox)) > 0  # (h, w)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        # coordinates in the object's own (rotated) frame, pixels
        u = (xx - self.cx) * self.cos + (yy - self.cy) * self.sin
        v = -(xx - self.cx) * self.sin + (yy - self.cy) * self.cos
        period = max(3.0, self.m / 5.0)
        if self.pattern == "striped":
            sel = np.floor((u + v) / period) % 2 == 1
        else:  # dotted
            du = (u % period) - period / 2
            dv = (v % period) - period / 2
            sel = du * du + dv * dv < (0.3 * period) ** 2
        accent = BLACK if brightness(self.color) > 170 else WHITE
        arr = np.array(self.layer.crop(bbox))
        arr[inside & sel, :3] = accent
        self.layer.paste(Image.fromarray(arr, "RGBA"), (x0, y0))

    def finish(self, outline_px: int = 1) -> tuple[Image.Image, list[int] | None]:
        """Outline the silhouette; returns ``(layer, [x0, y0, x1, y1])`` (x1, y1 exclusive)."""
        self._apply_pattern()
        bbox = self.layer.getchannel("A").getbbox()
        if not bbox:
            return self.layer, None
        pad = outline_px + 1
        ex = (max(0, bbox[0] - pad), max(0, bbox[1] - pad),
              min(self.size, bbox[2] + pad), min(self.size, bbox[3] + pad))
        alpha = self.layer.crop(ex).getchannel("A")  # binary: polygons are not antialiased
        grown = alpha.filter(ImageFilter.MaxFilter(2 * outline_px + 1))
        edge = ImageChops.subtract(grown, alpha)  # 255 on the ring just outside the shape
        ink = dark(self.color, 0.4) if brightness(self.color) > 60 else (120, 120, 125)
        self.layer.paste((*ink, 255), ex, mask=edge)
        box = self.layer.getchannel("A").getbbox()
        return self.layer, list(box) if box else None
