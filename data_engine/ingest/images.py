"""Image checks and normalisation, caption cleaning and key sanitising for ingestion.

Every image is fully decoded (a header-only check misses truncated files), turned upright
(EXIF orientation), converted to RGB (transparent pixels onto white), shrunk with antialiased
bicubic resampling so its longest side is at most ``max_side`` (aspect kept, never enlarged)
and re-encoded as JPEG. A pixel
count above ``max_pixels`` is a decompression bomb and is rejected from the header, before
any pixel is decoded; PIL's own bomb warning is turned into an error here (locally, with
``warnings.catch_warnings``) so it can never be skipped silently.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class ImageRejected(Exception):
    """An image that must be skipped; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class EncodedImage:
    jpeg: bytes
    width: int
    height: int
    sha256: str


def sanitize_key(key: object) -> str:
    """Keep ``[A-Za-z0-9_-]``; every other run of characters (``.``, ``/``, spaces) becomes ``_``."""
    return _KEY_BAD_CHARS.sub("_", str(key)).strip("_")


def clean_caption(caption: object) -> str | None:
    """One line of text with single spaces; ``None`` when the caption is missing."""
    if caption is None:
        return None
    if isinstance(caption, float) and caption != caption:  # NaN from pandas
        return None
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return " ".join(str(caption).split())


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after shrinking so ``max(w, h) <= max_side`` (aspect kept, never enlarged)."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as err:  # a broken EXIF block must not lose an otherwise good image
        log.debug("ignoring unreadable EXIF orientation: %s", err)
        return image


def _open_checked(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    """Open, bomb-check and fully decode ``data``; raise :class:`ImageRejected`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected("decompression_bomb", str(err)) from None
        except UnidentifiedImageError as err:
            raise ImageRejected("corrupt_image", str(err)) from None
        except Exception as err:
            raise ImageRejected("corrupt_image", f"{type(err).__name__}: {err}") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageRejected("corrupt_image", f"size {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
        try:
            if image.format == "JPEG":
                # DCT-domain downscale while decoding (only by powers of two, never below the
                # final size): the whole entropy-coded stream is still read and checked.
                image.draft("RGB", target_size(width, height, max_side))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected("decompression_bomb", str(err)) from None
        except OSError as err:
            reason = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
            raise ImageRejected(reason, str(err)) from None
        except Exception as err:
            raise ImageRejected("corrupt_image", f"{type(err).__name__}: {err}") from None
    return image


def normalize_image(
    image: bytes | Image.Image, *, max_side: int, max_pixels: int, jpeg_quality: int
) -> EncodedImage:
    """Check and re-encode one image (bytes of any PIL format, or a PIL image).

    Raises :class:`ImageRejected` with reason ``corrupt_image``, ``truncated_image`` or
    ``decompression_bomb``.
    """
    if isinstance(image, Image.Image):
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
        decoded = image
    else:
        decoded = _open_checked(bytes(image), max_pixels, max_side)
    try:
        rgb = _to_rgb(_upright(decoded))
        size = target_size(*rgb.size, max_side)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=jpeg_quality)
    except ImageRejected:
        raise
    except Exception as err:  # e.g. an exotic mode PIL cannot convert
        raise ImageRejected("corrupt_image", f"{type(err).__name__}: {err}") from None
    jpeg = buffer.getvalue()
    return EncodedImage(jpeg=jpeg, width=size[0], height=size[1], sha256=hashlib.sha256(jpeg).hexdigest())
