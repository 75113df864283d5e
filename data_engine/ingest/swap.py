"""Replace whole splits so that a failed or crashed ingest leaves the previous data intact.

A split is one folder, ``raw/{split}/`` (its shards and, under ``parts/``, its manifest parts).
A re-ingest writes the new split into a staging folder ``raw/.{split}.tmp-{id}/`` and, only
once it is complete and the new manifest has been built and checked, swaps it in with one
rename: Linux ``renameat2(RENAME_EXCHANGE)`` (the two folders trade places atomically), else
two renames, the first moving the old folder aside to ``raw/.{split}.old-{id}``. A marker file
``raw/.manifest-pending`` lives from just before the first swap until ``manifest.parquet`` and
``summary.json`` (each written to a temporary file and renamed) are in place.

:func:`recover` runs at the start of every ingest (under :func:`ingest_lock`) and undoes what a
crash left: an old folder moved aside while its split is missing is put back, staging folders
and temporary files are deleted, and it reports whether the manifest must be rebuilt (the
marker was left). It also moves manifest parts of the former layout (``raw/parts/``) into
their split folders.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

from data_engine.ingest.writer import LEGACY_PARTS_DIR, PARTS
from ramflow_io.formats import file_lock, raw_dir

log = logging.getLogger(__name__)

PENDING = ".manifest-pending"
_TMP = ".tmp-"
_OLD = ".old-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def ingest_lock(root: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``{root}/.locks/raw_ingest.lock`` (one ingest or manifest merge at a time per
    root, across processes; not re-entrant)."""
    return file_lock(Path(root) / ".locks" / "raw_ingest.lock")


def _token() -> str:
    return uuid.uuid4().hex[:12]


def new_staging_dir(root: str | Path, split: str) -> Path:
    """A fresh, empty ``raw/.{split}.tmp-{id}/`` (same file system as ``raw/{split}``)."""
    path = raw_dir(root) / f".{split}{_TMP}{_token()}"
    path.mkdir(parents=True)
    return path


def temp_sibling(path: Path) -> Path:
    """A temporary name next to ``path`` that :func:`recover` deletes if it is left behind."""
    return path.with_name(f".{path.name}{_TMP}{_token()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, flush it to disk, then rename it onto ``path``."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # e.g. a file system without RENAME_EXCHANGE
    raise OSError(code, f"renameat2 exchange {a} <-> {b}: {os.strerror(code)}")


def swap_in(staged: Path, target: Path) -> Path | None:
    """Put the folder ``staged`` at ``target``; return where the previous ``target`` now is
    (to delete), or None if there was none."""
    if not target.exists():
        os.rename(staged, target)
        return None
    if _exchange(staged, target):
        return staged
    aside = target.with_name(f".{target.name}{_OLD}{_token()}")
    os.rename(target, aside)  # a crash before the next rename is undone by recover()
    os.rename(staged, target)
    return aside


def migrate_legacy_parts(root: str | Path) -> None:
    """Move ``raw/parts/{split}-*`` (the former layout) into ``raw/{split}/parts/``."""
    legacy = Path(root).joinpath(*LEGACY_PARTS_DIR)
    if not legacy.is_dir():
        return
    for part in sorted(legacy.iterdir()):
        split = part.name.rsplit("-", 1)[0]
        split_dir = raw_dir(root, split)
        if split_dir.is_dir():
            (split_dir / PARTS).mkdir(exist_ok=True)
            os.replace(part, split_dir / PARTS / part.name)
        else:  # its shards are gone
            part.unlink()
    legacy.rmdir()
    log.info("moved manifest parts from %s into the split folders", legacy)


def recover(root: str | Path) -> bool:
    """Undo what a crashed ingest left under ``raw/`` (hold :func:`ingest_lock`).

    Returns True when the manifest must be rebuilt from the split folders (a swap was under
    way: :data:`PENDING` exists).
    """
    raw = raw_dir(root)
    if not raw.is_dir():
        return False
    migrate_legacy_parts(root)
    for aside in sorted(raw.glob(f".*{_OLD}*")):
        target = raw / aside.name[1:].rsplit(_OLD, 1)[0]
        if target.exists():
            shutil.rmtree(aside)
        else:  # the crash came between moving the old split aside and moving the new one in
            os.rename(aside, target)
            log.warning("restored %s from %s (an ingest crashed mid-swap)", target, aside)
    for leftover in sorted(raw.glob(f".*{_TMP}*")):
        log.warning("removing %s, left by an ingest that did not finish", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    return (raw / PENDING).exists()
