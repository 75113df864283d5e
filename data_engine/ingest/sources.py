"""Readers that turn each supported source into a stream of :class:`RawPair`.

A reader yields one ``RawPair`` per input item, including the bad ones: an item the reader
already knows to be bad (an unreadable tar member, an image file that does not exist) comes
with ``skip`` set, so the writer counts it. Checks that need the image or caption (decoding,
empty captions, duplicate keys) happen in :mod:`data_engine.ingest.writer`.

What one "item" is, per source:

* img2dataset tars: one ``{key}.*`` group of contiguous members (webdataset's rule: the key is
  the file name up to its first ``.``). A member that cannot be read makes its whole sample
  ``unreadable_member``; a truncated or corrupt archive (no end-of-archive block, a cut or
  corrupt header, data ending early, non-zero bytes after the end) makes the sample being
  read and the rest of that shard one ``truncated_shard`` item (their count is unknowable);
  a member named without an extension is one ``stray_member`` item.
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
from ramflow_io.shards import TarEndWatch

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


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _expand_tar_urls(spec: str | Path | Sequence[str | Path]) -> list[str]:
    from webdataset.shardlists import expand_urls  # lazy: webdataset, only this source kind

    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in _expand_tar_urls(item)]
    text = str(spec)
    local = Path(text)
    if local.is_dir():
        urls = sorted(str(p) for p in local.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{local}: no *.tar shards in this folder")
        return urls
    return list(expand_urls(text))


def resolve_tar_urls(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a local folder (its ``*.tar``), a file, a URL or a brace pattern.

    Raises ``FileNotFoundError`` when nothing is named, a folder holds no ``*.tar``, or every
    named shard is a local path that does not exist (a mistyped path must not read as an empty
    source). Some missing shards among others that exist are counted later
    (``unreadable_member``) as are remote URLs that fail.
    """
    urls = _expand_tar_urls(spec)
    if not urls:
        raise FileNotFoundError(f"{spec!r}: names no tar shard")
    missing = [u for u in urls if _is_local(u) and not Path(u).exists()]
    if len(missing) == len(urls):
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"no such tar shard: {shown}")
    return urls


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
    """Pairs of one tar shard; a cut or corrupt archive ends in one ``truncated_shard`` item.

    A sample counts as read once the archive shows it ended: the next sample's first header or
    the end-of-archive block. When the archive stops early (no end-of-archive block, a cut or
    corrupt header, a member whose data ends early), the samples before the cut are yielded,
    and the sample being read plus the unknowable rest become one ``truncated_shard`` item
    (key: the shard URL) whose detail names the shard and says how many samples came before.
    """
    import webdataset as wds  # lazy: webdataset, only this source kind

    try:
        stream = wds.gopen(url)
    except Exception as err:
        yield RawPair(url, skip="unreadable_member", detail=f"cannot open shard: {err}")
        return
    watch = TarEndWatch()
    group: _Group | None = None
    samples = 0  # groups yielded so far (the samples read before any cut)
    cut: str | None = None  # why the archive stopped early
    unopened: str | None = None  # not a tar at all (or an unreadable compressed stream)
    close_error: Exception | None = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=watch.tarinfo)
        except Exception as err:
            if watch.cut_in_first_header:
                cut = f"ends inside its first header ({err})"
            else:
                unopened = f"not a readable tar: {err}"
            tar = None
        members = iter(tar) if tar is not None else iter(())
        while tar is not None:
            try:
                info = next(members)
            except StopIteration:
                cut = watch.end_problem(tar)
                break
            except Exception as err:  # a member whose data ends early, a bad header after it
                cut = f"unreadable from byte {tar.offset}: {err}"
                break
            if info.isdir():
                continue
            key, ext = _split_name(info.name)
            if key is None or ext is None:
                yield RawPair(info.name, skip="stray_member", detail=f"{url}: {info.name!r}")
                continue
            if group is None or group.key != key or ext in group.members:
                if group is not None:
                    samples += 1
                    yield group.to_pair()
                group = _Group(key, url)
            if not info.isfile():
                group.error = f"{info.name}: not a regular file"
                continue
            try:
                handle = tar.extractfile(info)
                group.members[ext] = handle.read() if handle is not None else b""
            except Exception as err:  # the data ends early: the next header read reports the cut
                group.error = f"{info.name}: {err}"
    except Exception as err:  # anything else that stops the read: the rest of the shard is lost
        cut = f"read failed: {type(err).__name__}: {err}"
    finally:
        try:
            stream.close()  # a pipe (curl, pipe:...) that exited non-zero raises here
        except Exception as err:
            close_error = err
    if close_error is not None and samples == 0 and group is None and (unopened is not None or cut is not None):
        # nothing came out of a stream whose command failed (pipe:cat of a missing file, a curl
        # 404): the shard could not be read, which is one unreadable item, not a cut archive
        unopened, cut = f"cannot read shard: {close_error}", None
        log.warning("%s: %s", url, unopened)
        close_error = None
    if unopened is not None:
        yield RawPair(url, skip="unreadable_member", detail=unopened)
    elif cut is not None and not watch.marker_seen:
        # the open group is not known to be complete: it is part of what the cut lost
        log.warning("%s: truncated shard, %s; %d sample(s) read before the cut", url, cut, samples)
        yield RawPair(url, skip="truncated_shard", detail=f"{url}: {cut}; {samples} sample(s) before the cut")
    else:
        if group is not None:
            yield group.to_pair()
        if cut is not None:  # every member was read, but something follows the end marker
            log.warning("%s: truncated shard, %s", url, cut)
            yield RawPair(url, skip="truncated_shard", detail=f"{url}: {cut}")
    if close_error is not None:
        log.warning("%s: stream ended with an error: %s", url, close_error)
        if unopened is None and cut is None:  # data may be missing although the tar looked complete
            yield RawPair(f"{url}#close", skip="unreadable_member", detail=str(close_error))


def iter_img2dataset(spec: str | Path | Sequence[str | Path]) -> Iterator[RawPair]:
    """Pairs from img2dataset-style tar shards (``{key}.jpg/.txt/.json``), local or remote."""
    for url in resolve_tar_urls(spec):
        yield from _iter_tar(url)


# --------------------------------------------------------------------------- COCO captions


def _check_coco_types(path: Path, data: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first entry whose JSON type is wrong (a malformed file
    is refused whole rather than half ingested)."""
    for field_name in ("images", "annotations"):
        entries = data[field_name]
        if not isinstance(entries, list):
            raise ValueError(f"{path}: '{field_name}' must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: {field_name}[{i}] must be an object, got {type(entry).__name__}")
            ident = entry.get("image_id" if field_name == "annotations" else "id")
            if not isinstance(ident, (int, str, type(None))) or isinstance(ident, bool):
                raise ValueError(f"{path}: {field_name}[{i}] has an id of type {type(ident).__name__}")
            name = entry.get("file_name")
            if field_name == "images" and not isinstance(name, (str, type(None))):
                raise ValueError(f"{path}: images[{i}].file_name must be a string, got {type(name).__name__}")


def read_coco_captions(captions_json: str | Path) -> tuple[list[dict[str, Any]], dict[Any, list[Any]]]:
    """A COCO captions file -> its ``images`` entries and the raw captions of each image id.
    The file is checked whole first (shape and every entry's JSON type): a malformed file is
    refused with a ``ValueError`` naming the bad entry, before anything is written."""
    captions_json = Path(captions_json)
    with open(captions_json, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{captions_json}: not a COCO captions file (needs 'images' and 'annotations')")
    _check_coco_types(captions_json, data)
    by_image: dict[Any, list[Any]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    return data["images"], by_image


def iter_coco(captions_json: str | Path, images_dir: str | Path | None = None) -> Iterator[RawPair]:
    """Pairs from a COCO captions file (``images``: id/file_name; ``annotations``:
    image_id/caption) and its image folder (default: the JSON's folder)."""
    captions_json = Path(captions_json)
    images_dir = Path(images_dir) if images_dir is not None else captions_json.parent
    images, by_image = read_coco_captions(captions_json)
    image_ids = set()
    for entry in images:
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
    import pandas as pd  # lazy: pandas, only this source kind

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
