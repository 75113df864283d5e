"""Caption parsing speed: ramflow's parser vs SceneGraphParser, side by side in one run.

Each parser runs in its own fresh subprocess (so start-up time and peak RSS, ``ru_maxrss``, are
that parser's alone) on the same COCO val2017 captions (25,014 by default): start-up = from the
child's first line to a parser ready to answer; then a warm-up on the first ``--warmup``
captions, then the rest are timed. Reported per parser: captions/s (wall), captions per
CPU-second of the process (steadier on a shared machine), peak RSS, start-up (wall, and the
process's CPU seconds up to that point), tags/caption, and ramflow's ratio to SceneGraphParser
for each figure. ``--rounds`` alternates the order. On a machine shared with other jobs the
wall figures drop with the load; the per-CPU-second figures and the ratios much less.

SceneGraphParser (sng_parser 0.1.0) runs as ../shared/tools/parse_eval drives it (its
``SngAdapter``: one ``nlp()`` per caption on the full en_core_web_sm pipeline, as its API
does). ramflow runs as ``ramflow parse`` does: the ``parse:`` section of params.yaml.

Data is found relative to the repository (../shared/...) or given by flags; results go to
bench/results/parse_speed.json with no machine paths.

    .venv/bin/python bench/bench_parse_speed.py [--captions FILE] [--harness DIR] [--limit N]
    .venv/bin/python bench/bench_parse_speed.py --check-same-tags   # cache on vs off: 0 changed
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one thread per process: the figure is per process

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from _skip import skip_unless_present

_T0 = time.perf_counter()  # child start-up is measured from here
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CAPTIONS = SHARED / "data" / "captions" / "coco_captions_val2017.json"
HARNESS = SHARED / "tools" / "parse_eval"
RESULTS = ROOT / "bench" / "results" / "parse_speed.json"
PARSERS = ("ramflow", "sng")


def load_captions(path: Path, limit: int | None) -> list[str]:
    caps = [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    return caps[:limit] if limit else caps


def make_parser(name: str, harness: Path):
    """``captions -> number of tags`` for one parser, built in this (fresh) process."""
    if name == "ramflow":
        sys.path.insert(0, str(ROOT))
        from ramflow_io.params import stage_config
        from data_engine.parsing import ParseConfig, ParserPool

        cfg = stage_config(ParseConfig, "parse", None).model_copy(update={"n_process": 1})
        pool = ParserPool(cfg).__enter__()
        pool.parse_batch(["A dog on a beach."])  # model and lexicon loaded, first call done
        return lambda caps: sum(len(r.tags) for r in pool.parse_stream(caps))
    if name == "sng":
        sys.path.insert(0, str(harness))
        from parse_eval import SngAdapter

        adapter = SngAdapter()
        adapter.parse(["A dog on a beach."])
        return lambda caps: sum(len(t) for t in adapter.parse(caps))
    raise ValueError(name)


def child(name: str, captions: Path, harness: Path, limit: int | None, warmup: int) -> dict:
    """Run one parser in this process; return its figures (printed as JSON by main)."""
    import resource

    parse = make_parser(name, harness)
    startup = time.perf_counter() - _T0
    startup_cpu = time.process_time()  # CPU of the whole process so far (load-robust start-up)
    caps = load_captions(captions, limit)
    parse(caps[:warmup])
    timed = caps[warmup:]  # not the warm-up captions: ramflow's result cache must not help
    t0, c0 = time.perf_counter(), time.process_time()
    n_tags = parse(timed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"parser": name, "startup_s": startup, "startup_cpu_s": startup_cpu,
            "captions": len(timed), "seconds": wall,
            "captions_per_s": len(timed) / wall, "cpu_seconds": cpu,
            "captions_per_cpu_s": len(timed) / cpu, "tags_per_caption": n_tags / len(timed),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def check_same_tags(captions: Path, limit: int | None, out: Path | None) -> dict:
    """Tags with ``parse.cached_token_attrs`` on and off, caption by caption (same process).

    The cache must not change a single tag; the result counts the captions whose tags or
    categories differ and the CPU seconds of each setting.
    """
    sys.path.insert(0, str(ROOT))
    from ramflow_io.params import stage_config
    from data_engine.parsing import CaptionParser, ParseConfig

    cfg = stage_config(ParseConfig, "parse", None).model_copy(update={"n_process": 1,
                                                                      "cache_size": 0})
    caps = load_captions(captions, limit)
    res: dict = {"captions_file": _rel(captions), "captions": len(caps)}
    tags = {}
    for cached in (False, True):
        parser = CaptionParser(cfg.model_copy(update={"cached_token_attrs": cached}))
        c0 = time.process_time()
        out_tags = []
        for i in range(0, len(caps), cfg.batch_size):
            out_tags += [(r.tags, r.categories) for r in parser.parse_batch(caps[i:i + cfg.batch_size])]
        res[f"cpu_seconds_cached_{cached}".lower()] = time.process_time() - c0
        tags[cached] = out_tags
        if cached:
            res["cache_stats"] = dict(parser._attrs.stats) if parser._attrs else None
    diff = [i for i, (a, b) in enumerate(zip(tags[False], tags[True])) if a != b]
    res["captions_changed"] = len(diff)
    res["changed_examples"] = [{"caption": caps[i], "uncached": tags[False][i], "cached": tags[True][i]}
                               for i in diff[:20]]
    print(json.dumps({k: v for k, v in res.items() if k != "changed_examples"}))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    return res


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--captions",
           str(args.captions), "--harness", str(args.harness), "--warmup", str(args.warmup)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    if out.returncode != 0:
        return {"parser": name, "error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rel(path: Path) -> str:
    """A path as written in results: relative to the repository root, never absolute."""
    try:
        return os.path.relpath(Path(path).resolve(), ROOT)
    except ValueError:
        return Path(path).name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, default=CAPTIONS, help="COCO captions JSON")
    ap.add_argument("--harness", type=Path, default=HARNESS, help="parse_eval folder (sng adapter)")
    ap.add_argument("--limit", type=int, default=None, help="first N captions only (default all)")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each parser, order alternating")
    ap.add_argument("--parsers", nargs="+", choices=PARSERS, default=list(PARSERS))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json-out", type=Path, default=RESULTS)
    ap.add_argument("--check-same-tags", action="store_true",
                    help="instead: tags with the token-attribute cache on vs off (must not differ)")
    ap.add_argument("--child", choices=PARSERS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check_same_tags:
        out = args.json_out.with_name("parse_cached_attrs_check.json") if args.json_out else None
        return 0 if check_same_tags(args.captions, args.limit, out)["captions_changed"] == 0 else 1
    if args.child:
        print(json.dumps(child(args.child, args.captions, args.harness, args.limit, args.warmup)))
        return 0
    skip_unless_present(args.captions, "give --captions")
    skip_unless_present(args.harness, "give --harness")
    res = {"captions_file": _rel(args.captions), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "loadavg_start": os.getloadavg(),
           "note": "one process per parser, 1 BLAS thread; run on a machine shared with other "
                   "jobs: compare the ratios, not the absolute rates", "runs": []}
    for r in range(args.rounds):
        order = args.parsers if r % 2 == 0 else args.parsers[::-1]
        for name in order:
            out = run_child(name, args)
            out["round"] = r
            res["runs"].append(out)
            print(json.dumps(out), flush=True)
    res["loadavg_end"] = os.getloadavg()
    best = {}
    for name in args.parsers:
        ok = [x for x in res["runs"] if x["parser"] == name and "error" not in x]
        if ok:
            best[name] = {"captions_per_s": max(x["captions_per_s"] for x in ok),
                          "captions_per_cpu_s": max(x["captions_per_cpu_s"] for x in ok),
                          "peak_rss_mib": max(x["peak_rss_mib"] for x in ok),
                          "startup_s": min(x["startup_s"] for x in ok),
                          "startup_cpu_s": min(x["startup_cpu_s"] for x in ok),
                          "tags_per_caption": ok[0]["tags_per_caption"], "captions": ok[0]["captions"]}
    res["best"] = best
    if {"ramflow", "sng"} <= set(best):
        r, s = best["ramflow"], best["sng"]
        res["ratio_ramflow_vs_sng"] = {k: r[k] / s[k] for k in
                                       ("captions_per_s", "captions_per_cpu_s", "peak_rss_mib",
                                        "startup_s", "startup_cpu_s")}
    print(f"\nload average {res['loadavg_start']} -> {res['loadavg_end']} on {os.cpu_count()} CPUs")
    print("| parser | captions | cap/s (wall) | cap per CPU-s | peak RSS MiB | start-up s (wall) "
          "| start-up CPU-s |\n|---|---|---|---|---|---|---|")
    for name, b in best.items():
        print(f"| {name} | {b['captions']} | {b['captions_per_s']:.0f} | {b['captions_per_cpu_s']:.0f} | "
              f"{b['peak_rss_mib']:.0f} | {b['startup_s']:.1f} | {b['startup_cpu_s']:.1f} |")
    if "ratio_ramflow_vs_sng" in res:
        q = res["ratio_ramflow_vs_sng"]
        print(f"| ramflow / sng | | {q['captions_per_s']:.2f}x | {q['captions_per_cpu_s']:.2f}x | "
              f"{q['peak_rss_mib']:.2f}x | {q['startup_s']:.2f}x | {q['startup_cpu_s']:.2f}x |")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
