"""Caption parsing throughput: ramflow (1 and 2 processes) vs SceneGraphParser vs naive spaCy.

Data: COCO val2017 captions (25,014). Reports captions/s after a warm-up (pool start-up and
model loading excluded, reported apart), ratios against SceneGraphParser (sng_parser 0.1.0
driven as the parse_eval harness does: one nlp() call per caption, full pipeline) and against
a naive baseline (our tag extraction, one nlp() call per caption, full pipeline), and peak RSS
of a fresh process parsing 5k vs 25k captions (streaming: memory should stay flat). On a
shared machine wall-clock rates swing with load; single-process runs also report captions per
CPU-second of the main process, which load does not change (1-process runs only).

    .venv/bin/python bench/bench_parse_speed.py [--limit N] [--baseline-limit 5000]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAPTIONS = Path("/work/shared/data/captions/coco_captions_val2017.json")
HARNESS = Path("/work/shared/tools/parse_eval")


def load_captions(path: Path, limit: int | None) -> list[str]:
    caps = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
    return caps[:limit] if limit else caps


def timed(fn, captions: list[str], warmup: int) -> dict:
    fn(captions[:warmup])
    t0, c0 = time.perf_counter(), time.process_time()
    n_tags = fn(captions)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"captions": len(captions), "seconds": dt, "captions_per_s": len(captions) / dt,
            "main_process_cpu_seconds": cpu,
            "captions_per_cpu_s": len(captions) / cpu if cpu > 0.05 * dt else None,
            "tags_per_caption": n_tags / len(captions)}


def bench_ours(captions, n_process: int, batch_size: int, warmup: int) -> dict:
    from data_engine.parsing import ParseConfig, ParserPool

    t0 = time.perf_counter()
    with ParserPool(ParseConfig(n_process=n_process, batch_size=batch_size)) as pool:
        pool.parse_batch(["warm up the workers"] * n_process * 2)
        start_s = time.perf_counter() - t0
        out = timed(lambda c: sum(len(r.tags) for r in pool.parse_stream(c)), captions, warmup)
    out["startup_seconds"] = start_s
    return out


def bench_naive(captions, warmup: int) -> dict:
    from data_engine.parsing import CaptionParser, ParseConfig, clean_caption

    parser = CaptionParser(ParseConfig(exclude_components=[]))

    def run(caps):
        n = 0
        for c in caps:
            text, _, skip = clean_caption(c, parser.cfg)
            if skip is None:
                n += len(parser.extract(parser.nlp(text))[0])
        return n
    return timed(run, captions, warmup)


def bench_sng(captions, warmup: int) -> dict:
    sys.path.insert(0, str(HARNESS))
    from parse_eval import SngAdapter

    adapter = SngAdapter()
    return timed(lambda c: sum(len(t) for t in adapter.parse(c)), captions, warmup)


def rss_child(n: int, n_process: int) -> None:
    """In a fresh process: stream n captions, print peak RSS (self + children) in MiB."""
    from data_engine.parsing import ParseConfig, ParserPool

    caps = load_captions(CAPTIONS, n)
    with ParserPool(ParseConfig(n_process=n_process)) as pool:
        count = sum(1 for _ in pool.parse_stream(iter(caps)))
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"captions": count, "peak_rss_mib": me, "peak_rss_children_mib": kids}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, default=CAPTIONS)
    ap.add_argument("--limit", type=int, default=None, help="captions for ramflow (default all)")
    ap.add_argument("--baseline-limit", type=int, default=5000, help="captions for the baselines")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-procs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_procs)
        return 0
    caps = load_captions(args.captions, args.limit)
    base = caps[: args.baseline_limit]
    res = {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    for n in (1, 2):
        res[f"ramflow_{n}proc"] = bench_ours(caps, n, args.batch_size, args.warmup)
        print(f"ramflow {n} proc: {res[f'ramflow_{n}proc']['captions_per_s']:.0f} cap/s", flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(res, indent=1))
    def save() -> None:  # partial results survive an interrupted run
        if args.json_out:
            args.json_out.write_text(json.dumps(res, indent=1))
    save()
    res["naive_nlp_per_caption"] = bench_naive(base, min(args.warmup, 200))
    save()
    print(f"naive: {res['naive_nlp_per_caption']['captions_per_s']:.0f} cap/s", flush=True)
    try:
        res["sng"] = bench_sng(base, min(args.warmup, 200))
        print(f"sng: {res['sng']['captions_per_s']:.0f} cap/s", flush=True)
        save()
    except ImportError as err:
        res["sng"] = {"error": f"sng_parser not importable: {err}"}
    for n in (5000, len(load_captions(args.captions, None))):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        res[f"rss_{n}"] = json.loads(out.stdout.strip().splitlines()[-1])
        save()
    print(f"\nload average at the end: {os.getloadavg()}")
    print("\n| parser | captions | cap/s (wall) | vs sng | vs naive | cap per CPU-s (1 proc) |"
          "\n|---|---|---|---|---|---|")
    for name in ("ramflow_1proc", "ramflow_2proc", "naive_nlp_per_caption", "sng"):
        r = res[name]
        if "captions_per_s" not in r:
            print(f"| {name} | - | {r.get('error')} | | |")
            continue
        sng = res["sng"].get("captions_per_s")
        print(f"| {name} | {r['captions']} | {r['captions_per_s']:.0f} | "
              f"{r['captions_per_s'] / sng if sng else float('nan'):.2f}x | "
              f"{r['captions_per_s'] / res['naive_nlp_per_caption']['captions_per_s']:.2f}x | "
              f"{r['captions_per_cpu_s'] or float('nan'):.0f} |")
    for key in [k for k in res if k.startswith("rss_")]:
        print(f"peak RSS, {res[key]['captions']} captions streamed (1 proc): {res[key]['peak_rss_mib']:.0f} MiB")
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
