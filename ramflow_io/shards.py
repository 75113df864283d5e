"""Write and read the canonical ``raw/{split}/*.tar`` webdataset shards and the manifest.

Every sample in a shard is three members, ``{key}.jpg`` (RGB JPEG), ``{key}.txt`` (one-line
UTF-8 caption) and ``{key}.json`` (metadata, see :mod:`ramflow_io.formats`). Shards are
written deterministically (fixed member order, mtime 0, no owner names), so the same input
gives byte-identical shards, and atomically (written to ``*.tmp`` then renamed), so a crashed
job never leaves a half shard that looks complete.

Reading a tar as a stream, ``tarfile`` takes a cut or corrupt header after the first member for
the end of the archive, so a truncated file reads as a shorter, complete one. :class:`TarEndWatch`
records why the member list ended, so readers can tell a proper end (an end-of-archive block,
nothing but zeros after it) from a cut (see :meth:`TarEndWatch.end_problem`).

Later stages read shards with :func:`iter_samples` (one process, every sample of the given
shards, in order) or :func:`make_dataset` (a ``webdataset`` pipeline for a torch
``DataLoader``, split across nodes and workers by shard).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ramflow_io.formats import MANIFEST_COLUMNS, manifest_path

IMAGE_EXT = "jpg"
CAPTION_EXT = "txt"
META_EXT = "json"


class TarEndWatch:
    """Remembers the header error that ended a tar's member list (use its ``tarinfo``).

    ``tarfile.open(..., tarinfo=watch.tarinfo)`` reads headers through a ``TarInfo`` subclass
    whose ``fromtarfile`` notes the ``tarfile.HeaderError`` that stopped the listing:
    ``EOFHeaderError`` (a zero block: the end-of-archive marker) is a proper end,
    ``EmptyHeaderError`` (no bytes left), ``TruncatedHeaderError`` (a partial block) and
    ``InvalidHeaderError`` (bad checksum) mean the archive was cut or is corrupt there.
    """

    def __init__(self) -> None:
        self.header_error: tarfile.HeaderError | None = None
        watch = self

        class _WatchedInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
                try:
                    return super().fromtarfile(tar)
                except tarfile.HeaderError as err:
                    watch.header_error = err
                    raise

        self.tarinfo = _WatchedInfo

    @property
    def cut_in_first_header(self) -> bool:
        """After a failed open: the file is empty or ends inside its first header block."""
        return isinstance(self.header_error, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))

    @property
    def marker_seen(self) -> bool:
        """The listing stopped at an end-of-archive block (every member before it is complete)."""
        return isinstance(self.header_error, tarfile.EOFHeaderError)

    def end_problem(self, tar: tarfile.TarFile) -> str | None:
        """Call once iterating ``tar`` stopped: ``None`` for a proper end, else what is wrong.

        A proper end is an end-of-archive block followed by nothing but zero bytes (the second
        zero block and the record padding; a missing second block loses nothing and is
        accepted, as GNU tar does). Reads the rest of the stream to check the trailing bytes.
        """
        err = self.header_error
        if isinstance(err, tarfile.EOFHeaderError):
            try:
                while chunk := tar.fileobj.read(tarfile.RECORDSIZE):
                    if chunk.strip(b"\0"):
                        return "non-zero bytes after the end-of-archive marker"
            except Exception as read_err:  # e.g. a compressed stream cut after the marker
                return f"unreadable after the end-of-archive marker: {read_err}"
            return None
        if isinstance(err, tarfile.EmptyHeaderError):
            return "ends without an end-of-archive marker"
        if isinstance(err, tarfile.TruncatedHeaderError):
            return "ends inside a member header"
        if isinstance(err, tarfile.InvalidHeaderError):
            return f"corrupt member header ({err})"
        return f"member list ended without a header error ({err!r})"


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class ShardWriter:
    """Write one shard; use as a context manager. The file appears only on a clean exit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self.count = 0

    def write(self, key: str, jpeg: bytes, caption: str, meta: dict[str, Any]) -> None:
        """Append one sample; ``key`` must not contain ``.`` or ``/``."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"invalid shard key {key!r}: must be non-empty without '.' or '/'")
        for ext, data in (
            (IMAGE_EXT, jpeg),
            (CAPTION_EXT, caption.encode("utf-8")),
            (META_EXT, json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
        ):
            self._tar.addfile(*_member(f"{key}.{ext}", data))
        self.count += 1

    def close(self, commit: bool = True) -> None:
        self._tar.close()
        if commit:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)


@dataclass
class ShardSample:
    """One sample read back from a shard.

    ``image`` is an RGB ``PIL.Image`` when decoded, else the raw JPEG bytes.
    """

    key: str
    image: Any
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""


def _decode_sample(group: dict[str, Any], decode: bool) -> ShardSample:
    """Turn a ``{"__key__", "jpg", "txt", "json", ...}`` group into a :class:`ShardSample`."""
    missing = [ext for ext in (IMAGE_EXT, CAPTION_EXT, META_EXT) if ext not in group]
    if missing:
        raise ValueError(f"sample {group.get('__key__')!r} in {group.get('__url__')} lacks {missing}")
    image: Any = group[IMAGE_EXT]
    if decode:
        from PIL import Image  # lazy: PIL; the shared I/O layer loads light for the CLIs

        with Image.open(io.BytesIO(image)) as im:
            image = im.convert("RGB")
    return ShardSample(
        key=group["__key__"],
        image=image,
        caption=group[CAPTION_EXT].decode("utf-8"),
        meta=json.loads(group[META_EXT]),
        shard=str(group.get("__url__", "")),
    )


def _iter_groups(path: str | Path) -> Iterator[dict[str, Any]]:
    """Group a canonical shard's members by key (members of a sample are contiguous).

    Raises ``ValueError`` when the shard is truncated or corrupt (canonical shards are written
    atomically, so this is damage on disk; reading on would silently drop its tail).
    """
    current: dict[str, Any] | None = None
    watch = TarEndWatch()
    with tarfile.open(path, "r|", tarinfo=watch.tarinfo) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(path)}
            handle = tar.extractfile(info)
            current[ext] = handle.read() if handle is not None else b""
        problem = watch.end_problem(tar)
    if problem is not None:
        raise ValueError(f"shard {path} is truncated or corrupt: {problem}; re-run `ramflow ingest`")
    if current is not None:
        yield current


def iter_samples(paths: Iterable[str | Path], *, decode: bool = True) -> Iterator[ShardSample]:
    """Stream every sample of ``paths`` in order, in this process.

    ``decode=False`` leaves ``image`` as JPEG bytes (fast: e.g. to read captions or meta).
    """
    for path in paths:
        for group in _iter_groups(path):
            yield _decode_sample(group, decode)


def _to_tuple(decode: bool):
    def convert(group: dict[str, Any]) -> tuple[str, Any, str, dict[str, Any]]:
        s = _decode_sample(group, decode)
        return s.key, s.image, s.caption, s.meta

    return convert


def make_dataset(
    paths: Iterable[str | Path],
    *,
    decode: bool = True,
    shardshuffle: int | bool = False,
    split_by_node: bool = True,
    seed: int | None = None,
):
    """A ``webdataset`` pipeline yielding ``(key, image, caption, meta)`` tuples.

    Shards are split across distributed ranks (``split_by_node``; pass ``False`` to have
    every rank read every shard) and across ``DataLoader`` workers, so each sample is read
    once per epoch: use at most ``len(paths)`` workers per rank. ``image`` is a PIL image when
    ``decode`` (use a ``collate_fn`` or ``batch_size=None``), else JPEG bytes.
    """
    import webdataset as wds  # lazy: webdataset; the shared I/O layer loads light for the CLIs

    urls = [str(p) for p in paths]
    if not urls:
        raise ValueError("make_dataset: no shards given")
    dataset = wds.WebDataset(
        urls,
        shardshuffle=shardshuffle,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker,
        seed=seed,
        empty_check=False,
    )
    return dataset.map(_to_tuple(decode))


def read_manifest(root: str | Path, *, split: str | None = None):
    """``raw/manifest.parquet`` as a pandas DataFrame (optionally one split only)."""
    import pandas as pd  # lazy: pandas; the shared I/O layer loads light for the CLIs

    path = manifest_path(root)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; run `ramflow ingest` first")
    frame = pd.read_parquet(path)
    missing = set(MANIFEST_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    if split is not None:
        frame = frame[frame["split"] == split].reset_index(drop=True)
    return frame


def shard_urls(root: str | Path, split: str) -> list[str]:
    """Shard paths of one split as listed in the manifest (only shards that hold samples)."""
    frame = read_manifest(root, split=split)
    return [str(Path(root) / s) for s in dict.fromkeys(frame["shard"].tolist())]
