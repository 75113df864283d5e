"""Readers that turn each supported source into a stream of :class:`RawPair`.

A reader yields one ``RawPair`` per input item, including the bad ones: an item the reader
already knows to be bad (an unreadable tar member, an image file that does not exist) comes
with ``skip`` set, so the writer counts it. Checks that need the image or caption (decoding,
empty captions, duplicate keys) happen in :mod:`data_engine.ingest.writer`.

What one "item" is, per source:

* img2dataset tars: one ``{key}.*`` group of contiguous members (webdataset's rule: the key is
  the file name up to its first ``.``). A member that cannot be read makes its whole sample
  ``unreadable_member``; a truncated or corrupt archive makes the rest of that shard one
  ``unreadable_member`` item (its sample count is unknowable); a member named without an
  extension is one ``stray_member`` item.
* COCO captions JSON: one image. Its captions stay together: ``caption`` is the first
  non-empty caption in annotation order and ``{key}.json`` keeps all of them under
  ``captions``. The key is the file-name stem. Annotations whose ``image_id`` has no image
  entry are one ``missing_image`` item per such id.
* CSV/parquet table: one row.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_engine.ingest.images import clean_caption

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})


@dataclass
class RawPair:
    """One input item before checks.

    ``image`` is encoded bytes, a file path (read later, in a worker), a PIL image (the
    embedded generator) or ``None``. ``meta`` holds extra ``{key}.json`` fields (``truth``,
    ``captions``, ``source_meta``).
    """

    key: str
    caption: Any = None
    image: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None
    detail: str = ""


# --------------------------------------------------------------------------- img2dataset


def resolve_tar_urls(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a local folder (its ``*.tar``), a file, a URL or a brace pattern."""
    from webdataset.shardlists import expand_urls

    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in resolve_tar_urls(item)]
    text = str(spec)
    local = Path(text)
    if local.is_dir():
        urls = sorted(str(p) for p in local.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{local}: no *.tar shards in this folder")
        return urls
    return list(expand_urls(text))


def _split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/abc.x.jpg -> ("dir/abc", "x.jpg")`` as webdataset does; no extension -> None."""
    head, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, None
    return head + slash + stem, ext.lower()


class _Group:
    def __init__(self, key: str, url: str) -> None:
        self.key, self.url = key, url
        self.members: dict[str, bytes] = {}
        self.error: str | None = None

    def to_pair(self) -> RawPair:
        if self.error is not None:
            return RawPair(self.key, skip="unreadable_member", detail=self.error)
        image_ext = next(
            (e for e in sorted(self.members) if e.rsplit(".", 1)[-1] in IMAGE_EXTS), None
        )
        source_meta: dict[str, Any] = {"tar": self.url}
        if "json" in self.members:
            try:
                parsed = json.loads(self.members["json"])
                source_meta.update(parsed if isinstance(parsed, dict) else {"json": parsed})
            except ValueError as err:
                log.warning("%s: %s.json is not valid JSON (%s); metadata dropped", self.url, self.key, err)
        if "txt" in self.members:
            caption: Any = self.members["txt"].decode("utf-8", errors="replace")
        else:  # img2dataset also writes the caption into the json
            caption = source_meta.get("caption")
        image = self.members[image_ext] if image_ext is not None else None
        return RawPair(
            self.key,
            caption=caption,
            image=image,
            meta={"source_meta": source_meta},
            skip=None if image is not None else "missing_image",
            detail="" if image is not None else f"members {sorted(self.members)}",
        )


def _iter_tar(url: str) -> Iterator[RawPair]:
    import webdataset as wds

    group: _Group | None = None
    lost = False  # whether a failure of this shard was already counted
    try:
        stream = wds.gopen(url)
    except Exception as err:
        yield RawPair(url, skip="unreadable_member", detail=f"cannot open shard: {err}")
        return
    close_error: Exception | None = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        members = iter(tar)
        while True:
            try:
                info = next(members)
            except StopIteration:
                break
            except Exception as err:  # truncated or corrupt archive: the rest is lost
                if group is None or group.error is None:  # else: the same failure, counted there
                    lost = True
                    yield RawPair(f"{url}#rest", skip="unreadable_member", detail=str(err))
                break
            if info.isdir():
                continue
            key, ext = _split_name(info.name)
            if key is None or ext is None:
                yield RawPair(info.name, skip="stray_member", detail=f"{url}: {info.name!r}")
                continue
            if group is None or group.key != key or ext in group.members:
                if group is not None:
                    yield group.to_pair()
                group = _Group(key, url)
            if not info.isfile():
                group.error = f"{info.name}: not a regular file"
                continue
            try:
                handle = tar.extractfile(info)
                group.members[ext] = handle.read() if handle is not None else b""
            except Exception as err:
                group.error = f"{info.name}: {err}"
                lost = True
    except Exception as err:  # not a tar at all (or an unreadable compressed stream)
        lost = True
        if group is None:
            yield RawPair(url, skip="unreadable_member", detail=f"not a readable tar: {err}")
        elif group.error is None:
            group.error = str(err)
    finally:
        try:
            stream.close()  # a pipe (curl, pipe:...) that exited non-zero raises here
        except Exception as err:
            close_error = err
    if group is not None:
        yield group.to_pair()
    if close_error is not None:
        log.warning("%s: stream ended with an error: %s", url, close_error)
        if not lost:  # data may be missing although the tar looked complete
            yield RawPair(f"{url}#close", skip="unreadable_member", detail=str(close_error))


def iter_img2dataset(spec: str | Path | Sequence[str | Path]) -> Iterator[RawPair]:
    """Pairs from img2dataset-style tar shards (``{key}.jpg/.txt/.json``), local or remote."""
    for url in resolve_tar_urls(spec):
        yield from _iter_tar(url)


# --------------------------------------------------------------------------- COCO captions


def iter_coco(captions_json: str | Path, images_dir: str | Path | None = None) -> Iterator[RawPair]:
    """Pairs from a COCO captions file (``images``: id/file_name; ``annotations``:
    image_id/caption) and its image folder (default: the JSON's folder)."""
    captions_json = Path(captions_json)
    images_dir = Path(images_dir) if images_dir is not None else captions_json.parent
    with open(captions_json, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{captions_json}: not a COCO captions file (needs 'images' and 'annotations')")
    by_image: dict[Any, list[Any]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    image_ids = set()
    for entry in data["images"]:
        image_id, file_name = entry.get("id"), entry.get("file_name")
        image_ids.add(image_id)
        if not file_name:
            yield RawPair(str(image_id), skip="missing_image", detail="image entry without file_name")
            continue
        raw = by_image.get(image_id)
        captions = [c for c in (clean_caption(x) for x in raw or []) if c]
        if raw is None or all(clean_caption(x) is None for x in raw):
            caption = None  # no caption annotation at all
        else:
            caption = captions[0] if captions else ""
        yield RawPair(
            Path(file_name).stem,
            caption=caption,
            image=images_dir / file_name,
            meta={"captions": captions, "source_meta": {"image_id": image_id, "file_name": file_name}},
        )
    for image_id in by_image.keys() - image_ids:
        yield RawPair(str(image_id), skip="missing_image", detail="annotations for an image id not in 'images'")


# --------------------------------------------------------------------------- tables


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        # Empty cells stay "" (an empty caption), not NaN (a missing one).
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    raise ValueError(f"{path}: table must be .csv, .tsv or .parquet")


def iter_table(
    table: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str | None = None,
    images_dir: str | Path | None = None,
) -> Iterator[RawPair]:
    """Pairs from a CSV/parquet table of image path (or image bytes) and caption.

    Relative paths are resolved against ``images_dir`` (default: the table's folder); the key
    is ``key_column`` or the image file stem.
    """
    table = Path(table)
    frame = _read_table(table)
    wanted = [c for c in (image_column, caption_column, key_column) if c is not None]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"{table}: no column(s) {missing}; columns are {list(frame.columns)}")
    base = Path(images_dir) if images_dir is not None else table.parent
    keys = frame[key_column] if key_column else None
    for row, (image, caption) in enumerate(zip(frame[image_column], frame[caption_column])):
        key = str(keys.iloc[row]) if keys is not None else None
        if isinstance(image, (bytes, bytearray)):
            yield RawPair(key if key is not None else f"row{row}", caption, bytes(image), {"source_meta": {"row": row}})
            continue
        if image is None or (isinstance(image, float) and image != image) or str(image).strip() == "":
            yield RawPair(key or f"row{row}", skip="missing_image", detail=f"row {row}: no image path")
            continue
        path = Path(str(image))
        yield RawPair(
            key if key is not None else path.stem,
            caption=caption,
            image=path if path.is_absolute() else base / path,
            meta={"source_meta": {"row": row, "image_path": str(image)}},
        )
