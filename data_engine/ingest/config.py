"""Ingestion config (the ``ingest:`` section of params.yaml), skip reasons and the summary."""

from __future__ import annotations

from collections import Counter
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

SOURCES: tuple[str, ...] = ("embedded", "img2dataset", "coco", "table")

# Why an input item was not written. Every item read from a source ends up either written
# or counted under exactly one of these, so ``seen == written + sum(skipped.values())``.
SKIP_REASONS: dict[str, str] = {
    "unreadable_member": "a tar member could not be read, or a shard could not be opened / is not a tar",
    "truncated_shard": "a tar shard ends early (cut, corrupt header, data after its end): one count "
    "per shard for the sample being read and the rest, whose number is unknowable",
    "stray_member": "a tar member that is not part of a {key}.{ext} sample",
    "missing_image": "no image: absent file, or a sample without an image member",
    "invalid_key": "the key is empty after sanitizing",
    "duplicate_key": "an earlier item of this run already used the (sanitized) key",
    "missing_caption": "no caption field/member, or a null caption",
    "empty_caption": "the caption is only whitespace",
    "corrupt_image": "the bytes are not a decodable image",
    "truncated_image": "the image data ends early (fully decoding it fails)",
    "decompression_bomb": "width*height above max_pixels (checked before decoding)",
}


class IngestConfig(BaseModel):
    """How raw image-text pairs become canonical shards. Defaults are the real defaults."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    shard_size: int = Field(1000, ge=1, description="samples written per shard")
    max_side: int = Field(512, ge=16, description="longest image side after resizing (aspect kept)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the re-encoded images")
    max_pixels: int = Field(
        64_000_000, ge=1, description="width*height above this is a decompression bomb (skipped)"
    )
    workers: int = Field(1, ge=1, description="processes decoding images / writing embedded shards")
    split: str = Field("pretrain", description="target split for non-embedded sources")
    image_column: str = Field("image", description="table source: column with image paths")
    caption_column: str = Field("caption", description="table source: column with captions")
    key_column: str | None = Field(None, description="table source: key column (default: image file stem)")
    progress: bool = Field(True, description="show tqdm progress bars")

    @field_validator("max_pixels")
    @classmethod
    def _within_pil_limit(cls, value: int) -> int:
        """PIL's own bomb warning (turned into an error while ingesting) fires above
        ``Image.MAX_IMAGE_PIXELS``; a larger cap could never be reached, so refuse it."""
        if Image.MAX_IMAGE_PIXELS is not None and value > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels {value} exceeds PIL's limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}")
        return value


class SplitCounts(BaseModel):
    """Counts of one split (or of all splits): what was read, written and skipped by reason."""

    seen: int = 0
    written: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)
    shards: int = 0

    @property
    def counts_add_up(self) -> bool:
        return self.seen == self.written + sum(self.skipped.values())

    def add(self, other: SplitCounts) -> SplitCounts:
        skipped = Counter(self.skipped)
        skipped.update(other.skipped)
        return SplitCounts(
            seen=self.seen + other.seen,
            written=self.written + other.written,
            skipped=dict(sorted(skipped.items())),
            shards=self.shards + other.shards,
        )


class IngestSummary(BaseModel):
    """What ``raw/summary.json`` holds, and what every ingest function returns."""

    root: str
    splits: dict[str, SplitCounts]
    total: SplitCounts
    counts_add_up: bool
    sources: list[str] = Field(default_factory=list)
    noise: dict[str, dict[str, Any]] | None = None
    truncated_shards: dict[str, list[str]] = Field(
        default_factory=dict, description="per split: input shards that ended early (truncated_shard)"
    )
    seconds: float | None = None

    def format(self) -> str:
        """Human-readable table (the CLI prints it)."""
        lines = [f"ingested into {self.root}/raw  (sources: {', '.join(self.sources) or '-'})"]
        header = f"{'split':<10} {'seen':>8} {'written':>8} {'shards':>6}  skipped by reason"
        lines.append(header)
        for name, counts in [*self.splits.items(), ("total", self.total)]:
            skipped = ", ".join(f"{k}={v}" for k, v in counts.skipped.items()) or "none"
            lines.append(f"{name:<10} {counts.seen:>8} {counts.written:>8} {counts.shards:>6}  {skipped}")
        for name, urls in self.truncated_shards.items():
            lines.append(f"{name}: truncated input shard(s), samples after the cut lost: {', '.join(urls)}")
        verdict = "yes" if self.counts_add_up else "NO"
        lines.append(f"counts add up (seen == written + skipped): {verdict}")
        if self.noise:
            lines.append("caption noise measured against truth (written samples):")
            for split, rates in self.noise.items():
                shown = ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rates.items()
                )
                lines.append(f"  {split:<10} {shown}")
        if self.seconds is not None and self.seconds > 0:
            lines.append(f"time {self.seconds:.1f}s, {self.total.seen / self.seconds:.1f} items/s")
        return "\n".join(lines)
