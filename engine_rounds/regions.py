"""Find the image region that a tag refers to, from the recognition decoder's attention.

Design (RAM step 3, "region clustering"): RAM cleans a tag by looking at *where* in the
image the model sees it, embedding that region and checking it against the regions of the
same tag in other images. RAM uses an off-the-shelf detector for the regions; we have no
detector, but the tagging head already is one in disguise: each tag is a query of the
recognition decoder, and its cross-attention over the image-token grid says which tokens
support that tag. So for one (image, tag):

1. take the tag query's cross-attention map ``A[h, w]`` (last decoder layer, heads averaged;
   ``model.tag_attention``);
2. threshold it at ``threshold * max(A)`` (a fraction of the peak, so the rule is invariant to
   the map's scale and to the softmax temperature of the decoder);
3. label the connected components of the mask (8-connectivity) and keep the one holding the
   most attention mass; for a compact object that is also the largest component, and it drops
   scattered background tokens that merely pass the threshold;
4. take its bounding box in token cells, map it to pixels of the original image (the model saw
   the image resized to ``image_size``, so token cell ``(r, c)`` covers
   ``[c*W/w, (c+1)*W/w) x [r*H/h, (r+1)*H/h)``), and expand it by ``margin`` times its width
   and height on every side (attention peaks on the most discriminative part, e.g. a head;
   the margin brings back context), clipped to the image;
5. crop that box from the original image and resize it to the model input size.

A tag the image does not contain has no object to attend to: its map is diffuse or lands on
some other object, so its crop embeds far from the crops of that tag elsewhere and its crop
re-scores low for the tag. :mod:`.cleaning` uses both signals.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels of the original image, ``x1``/``y1`` exclusive."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def attention_box_cells(attention: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """Box ``(c0, r0, c1, r1)`` (token cells, end exclusive) of the strongest component.

    ``attention``: ``[h, w]`` non-negative map. A map that is all zero (or not finite) has no
    peak to threshold: the whole grid is returned.
    """
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim != 2:
        raise ValueError(f"attention map must be [h, w], got shape {att.shape}")
    h, w = att.shape
    att = np.where(np.isfinite(att), att, 0.0)
    att = att - min(float(att.min()), 0.0)  # negative inputs (raw scores) shift to >= 0
    peak = float(att.max())
    if peak <= 0.0:
        return 0, 0, w, h
    mask = att >= threshold * peak  # [h, w] bool
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n > 1:
        mass = ndimage.sum_labels(att, labels, index=np.arange(1, n + 1))  # [n]
        keep = int(np.argmax(mass)) + 1
    else:
        keep = 1
    rows, cols = np.nonzero(labels == keep)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def cells_to_pixels(
    cells: tuple[int, int, int, int], grid: tuple[int, int], image_size: tuple[int, int], margin: float = 0.0
) -> Box:
    """Map a token-cell box to pixels of the original image and expand it by ``margin``.

    ``grid``: ``(h, w)`` of the token grid; ``image_size``: ``(W, H)`` of the original image.
    """
    c0, r0, c1, r1 = cells
    gh, gw = grid
    width, height = image_size
    sx, sy = width / gw, height / gh
    x0, y0, x1, y1 = c0 * sx, r0 * sy, c1 * sx, r1 * sy
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return (max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(width), x1 + dx), min(float(height), y1 + dy))


def attention_to_box(
    attention: np.ndarray, image_size: tuple[int, int], threshold: float = 0.5, margin: float = 0.1
) -> Box:
    """Region of one tag in pixels of the original image (see the module docstring)."""
    cells = attention_box_cells(attention, threshold)
    return cells_to_pixels(cells, attention.shape[-2:], image_size, margin)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def crop_image(image: Image.Image, box: Box, size: int | None = None) -> Image.Image:
    """Crop ``box`` (at least one pixel each way) and, if ``size``, resize it to ``size x size``."""
    x0, y0, x1, y1 = (int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3])))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    crop = image.crop((x0, y0, x1, y1))
    if size is not None:
        crop = crop.resize((size, size), Image.BICUBIC)
    return crop


def to_tensor(images: list[Image.Image], data_config: dict) -> torch.Tensor:
    """PIL images -> normalized ``[B, 3, S, S]`` float tensor, as the model's ``data_config`` says.

    Images are resized (not cropped) to ``S x S`` so the whole picture, and every object in
    it, stays in view; attention cells then map linearly back to the original pixels.
    """
    size = int(data_config["image_size"])
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8) for im in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, S, S]
    return (batch - mean) / std
