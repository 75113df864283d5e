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


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of ``(name, data)`` members, in memory (as :func:`write_tar` writes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_layout(data: bytes) -> dict[str, tuple[int, int, int]]:
    """``name -> (header offset, data offset, data size)`` of every member of a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: (info.offset, info.offset_data, info.size) for info in tar.getmembers()}


def members_end(data: bytes) -> int:
    """Where the end-of-archive blocks start (after the last member's padded data)."""
    return max(start + -(-size // 512) * 512 for _, start, size in tar_layout(data).values())


def tar_boundaries(data: bytes) -> list[int]:
    """Byte offsets around every member's header and data (start, +1, data start, middle,
    data end, padded end) and the end-of-archive blocks: the cut points that matter most."""
    points = set()
    for offset, start, size in tar_layout(data).values():
        padded = start + -(-size // 512) * 512
        points.update({offset, offset + 1, offset + 511, start, start + size // 2, start + size, padded - 1, padded})
    last = members_end(data)
    points.update({last + 1, last + 511, last + 512, last + 513, last + 1024, len(data)})
    return sorted(p for p in points if 0 <= p <= len(data))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
