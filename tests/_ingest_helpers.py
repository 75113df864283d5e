"""Builders of tiny ingestion inputs (images, tars, COCO files, tables) for the ingest tests."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image


def image_bytes(size=(40, 30), colour=(10, 120, 200), fmt="JPEG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour + (128,)).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A valid JPEG header followed by only part of the entropy-coded data."""
    image = Image.effect_noise((64, 64), 40).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def png_bomb_header(width=200_000, height=200_000) -> bytes:
    """A PNG whose header claims width*height pixels (PIL refuses it at open), 1 tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def write_tar(path: Path, members: list[tuple[str, bytes]], symlinks: tuple[str, ...] = ()) -> Path:
    """A tar with the given ``(name, data)`` members (in order) plus symlink members."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in symlinks:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "elsewhere.jpg"
            tar.addfile(info)
    return path


def sample_members(key: str, caption: str | None = "a photo", image: bytes | None = None, meta=None):
    members = [(f"{key}.jpg", image if image is not None else image_bytes())]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps(meta or {"key": key, "url": f"http://x/{key}"}).encode()))
    return members


def write_coco(folder: Path, images: dict[str, bytes], captions: dict[str, list[str]], orphan_ids=()) -> Path:
    """COCO captions JSON ``folder/captions.json`` + ``folder/images/``; returns the JSON path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i, (name, data) in enumerate(sorted(images.items()), start=1):
        if data is not None:
            (folder / "images" / name).write_bytes(data)
        entries.append({"id": i, "file_name": name, "width": 1, "height": 1})
        for caption in captions.get(name, []):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "caption": caption})
    for image_id in orphan_ids:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": "lost"})
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path


def cut_tar_inside(path: Path, member: str) -> Path:
    """Truncate a tar in the middle of ``member``'s data (as a failed download would)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + info.size // 2])
    return path
