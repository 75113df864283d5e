"""``ramflow parse`` and ``ramflow labels``: caption parsing and the label system.

``ramflow parse`` with no ``--split``: reads captions one per line on stdin (or ``--input``)
and writes one JSON list of tags per line, in order, flushing after every micro-batch. A
micro-batch is whatever has arrived when the parser is free (at most ``batch_size`` lines),
so a persistent caller that writes N lines and waits for N answers never blocks. With
``--label-system DIR`` tags are normalized to canonical label names; tags the label system
cannot map are dropped (``--unmapped keep`` keeps them as parsed). Input is read as bytes:
invalid UTF-8 is replaced (U+FFFD) and counted (``bad_utf8`` in the closing log line), so every
input line gets its output line.

``ramflow parse --split S``: the pipeline stage, raw shards -> ``parsed/S.parquet``.
``ramflow labels build`` / ``ramflow labels assign --split S``: the label-system stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path

from data_engine.cli import add_common_args, data_root
from data_engine.label_system import LabelSystem, LabelSystemConfig, assign_label_ids, build_label_system
from data_engine.parsing import ParseConfig, ParserPool, ParseSummary, parse_split
from ramflow_io import formats
from ramflow_io.formats import SPLITS
from ramflow_io.params import given, stage_config

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    add_common_args(p)


def register(subparsers) -> None:
    """Add ``parse`` and ``labels`` to the ``ramflow`` parser."""
    p = subparsers.add_parser("parse", help="captions -> tags (stdin/stdout, or a split's shards)",
                              description=__doc__.split("\n\n")[1])
    _common(p)
    p.add_argument("--split", choices=SPLITS, nargs="+", default=None,
                   help="run the stage on these splits' shards instead of stdin")
    p.add_argument("--input", default="-", help="caption file, one per line (default stdin)")
    p.add_argument("--output", default="-", help="output file (default stdout)")
    p.add_argument("--label-system", default=None, help="label system folder/JSON to normalize tags")
    p.add_argument("--unmapped", choices=("drop", "keep"), default="drop",
                   help="with --label-system: drop tags it cannot map (default) or keep them")
    p.add_argument("--with-categories", action="store_true",
                   help="write [[tag, category], ...] instead of [tag, ...]")
    p.add_argument("--only", default=None, metavar="CATS",
                   help="comma-separated categories to output, e.g. object,scene (default: parse.categories)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-process", type=int, default=None)
    p.set_defaults(func=_cmd_parse)

    lab = subparsers.add_parser("labels", help="build the label system / assign label ids")
    lsub = lab.add_subparsers(dest="labels_command", required=True)
    b = lsub.add_parser("build", help="parsed/*.parquet + seeds -> label_system/")
    _common(b)
    b.add_argument("--splits", nargs="+", default=["pretrain"], help="parsed splits to count")
    b.add_argument("--previous", default=None, help="label system to extend (ids kept)")
    b.add_argument("--min-freq", type=int, default=None)
    b.set_defaults(func=_cmd_labels_build)
    a = lsub.add_parser("assign", help="parsed/S.parquet -> labels/S.parquet")
    _common(a)
    a.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS))
    a.set_defaults(func=_cmd_labels_assign)


def _root(args) -> Path:
    return data_root(args)


def _parse_config(args):
    only = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    return stage_config(ParseConfig, "parse", args.params,
                        **given(batch_size=args.batch_size, n_process=args.n_process, categories=only))


def _cmd_parse(args: argparse.Namespace) -> int:
    cfg = _parse_config(args)
    label_system = None
    if args.label_system:
        label_system = LabelSystem.load(args.label_system)
    extra = sorted(label_system.compounds()) if label_system is not None else []
    if args.split:
        root = _root(args)
        for split in args.split:
            summary = parse_split(formats.list_shards(root, split),
                                  formats.parsed_path(root, split), cfg, extra)
            print(json.dumps({"split": split, **summary.as_dict()}))
        return 0
    # Bytes in: each line is decoded here, bad UTF-8 replaced and counted (never a crash).
    fin = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    if args.output == "-":
        sys.stdout.reconfigure(encoding="utf-8")  # tags may hold U+FFFD or other non-ASCII
        fout = sys.stdout
    else:
        fout = open(args.output, "w", encoding="utf-8")
    try:
        stats = serve_lines(fin, fout, cfg, label_system, args.unmapped == "keep",
                            args.with_categories, extra)
    finally:
        if fin is not sys.stdin.buffer:
            fin.close()
        if fout is not sys.stdout:
            fout.close()
    if stats.get("bad_utf8"):
        log.warning("parse: %d input lines had invalid UTF-8 (bytes replaced by U+FFFD)",
                    stats["bad_utf8"])
    log.info("parse: %s", json.dumps(stats))
    return 0


def decode_line(raw: bytes | str) -> tuple[str, bool]:
    """``(text, had_bad_utf8)`` of one input line, without its line ending.

    Invalid UTF-8 bytes become U+FFFD (``errors="replace"``): one bad byte must cost one
    caption's quality, never the stream.
    """
    if isinstance(raw, str):
        return raw.rstrip("\r\n"), False
    raw = raw.rstrip(b"\r\n")
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def serve_lines(fin, fout, cfg, label_system=None, keep_unmapped: bool = False,
                with_categories: bool = False, extra_compounds=()) -> dict:
    """Read lines from ``fin``, write one JSON list per line to ``fout`` (flushed per batch).

    ``fin`` yields bytes (decoded by :func:`decode_line`: bad UTF-8 replaced and counted as
    ``bad_utf8``) or already-decoded str. A reader thread queues lines; the parser takes
    whatever is queued (up to ``batch_size``, at least one line), so output never waits for
    input that is not coming. Anything the reader raises is handed to the main thread and
    re-raised there, so a failed read ends the command instead of leaving it waiting.
    """
    lines: queue.Queue = queue.Queue(maxsize=8 * cfg.batch_size)
    done = object()

    class _ReaderFailed:  # queued in place of a line when the reader raises
        def __init__(self, err: BaseException):
            self.err = err

    def reader() -> None:
        try:
            for raw in fin:
                lines.put(raw)
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            lines.put(_ReaderFailed(err))
            return
        lines.put(done)

    summary = ParseSummary()
    with ParserPool(cfg, extra_compounds) as pool:  # workers start before the reader thread
        start = time.perf_counter()  # throughput without the model's load time
        threading.Thread(target=reader, daemon=True, name="parse-reader").start()
        finished = False
        while not finished:
            batch = [lines.get()]
            while len(batch) < cfg.batch_size and batch[-1] is not done \
                    and not isinstance(batch[-1], _ReaderFailed):
                try:
                    batch.append(lines.get_nowait())
                except queue.Empty:
                    break
            failed = batch.pop() if isinstance(batch[-1], _ReaderFailed) else None
            if failed is not None or batch[-1:] == [done]:
                finished = True
                if failed is None:
                    batch.pop()
            texts = []
            for raw in batch:
                text, bad = decode_line(raw)
                summary.bad_utf8 += bad
                texts.append(text)
            out = []
            for res in pool.parse_batch(texts):
                summary.update(res)
                tags, cats = res.tags, res.categories
                if label_system is not None:
                    tags, cats = _normalize(label_system, tags, cats, keep_unmapped)
                out.append(json.dumps([list(tc) for tc in zip(tags, cats)] if with_categories
                                      else tags, ensure_ascii=False) + "\n")
            fout.write("".join(out))
            fout.flush()
            summary.seconds = time.perf_counter() - start
            if failed is not None:  # the lines read before the failure were answered above
                raise RuntimeError(f"reading the captions failed: {failed.err!r}") from failed.err
    return summary.as_dict()


def _normalize(ls, tags: list[str], cats: list[str], keep: bool) -> tuple[list[str], list[str]]:
    """Canonical names (label categories); unmapped tags dropped or kept as parsed."""
    seen: dict[str, str] = {}
    for tag, cat in zip(tags, cats):
        idx = ls.id_of(tag)
        if idx is not None:
            seen.setdefault(ls.labels[idx].name, ls.category(idx))
        elif keep:
            seen.setdefault(tag, cat)
    return list(seen), list(seen.values())


def _cmd_labels_build(args: argparse.Namespace) -> int:
    cfg = stage_config(LabelSystemConfig, "label_system", args.params, **given(min_freq=args.min_freq))
    root = _root(args)
    parsed = [formats.parsed_path(root, s) for s in args.splits]
    missing = [str(p) for p in parsed if not p.exists()]
    if missing:
        raise SystemExit(f"missing parsed files {missing}: run `ramflow parse --split ...` first")
    ls = build_label_system(parsed, cfg, formats.label_system_dir(root),
                            Path(args.previous) if args.previous else None)
    print(json.dumps({"labels": len(ls), "out": str(formats.label_system_dir(root))}))
    return 0


def _cmd_labels_assign(args: argparse.Namespace) -> int:
    root = _root(args)
    ls = LabelSystem.load(formats.label_system_dir(root))
    for split in args.split:
        src = formats.parsed_path(root, split)
        if not src.exists():
            log.warning("labels assign: %s missing, split %s skipped", src, split)
            continue
        summary = assign_label_ids(src, ls, formats.labels_path(root, split))
        print(json.dumps({"split": split, **summary}))
    return 0
