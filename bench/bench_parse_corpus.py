"""Parser + label system on the embedded corpus: precision / recall vs truth["mentioned"].

The pipeline as it runs: parse N pretrain captions, build the label system from the parsed tags
(seeds + tags with freq >= min_freq + WordNet/synonyms-file merging; the corpus vocabulary is
NOT used), normalize each caption's tags with it, compare with the caption's
truth["mentioned"] (canonical objects, scenes and colours). Truth has no actions or patterns,
so tags whose label is an action or a non-colour attribute are not judged (counted apart).

Results: bench/results/parse_corpus.json (the embedded corpus needs no external data).

    .venv/bin/python bench/bench_parse_corpus.py [--n 3000] [--n-process 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def judged(label_system, colours: set[str], names: list[str]) -> tuple[set[str], int]:
    """Names the truth can judge (object/scene labels, colour attributes), count of the rest."""
    keep, other = set(), 0
    for name in names:
        cat = label_system.category(label_system.id_of(name))
        if cat in ("object", "scene") or name in colours:
            keep.add(name)
        else:
            other += 1
    return keep, other


def evaluate(captions: list[str], truths: list[list[str]], n_process: int, min_freq: int,
             work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from data_engine.label_system import LabelSystemConfig, build_label_system
    from data_engine.parsing import ParseConfig, ParserPool

    t0 = time.perf_counter()
    with ParserPool(ParseConfig(n_process=n_process)) as pool:
        res = list(pool.parse_stream(captions))
    parse_s = time.perf_counter() - t0
    parsed = work / "parsed.parquet"
    pq.write_table(pa.table({"key": [str(i) for i in range(len(captions))], "caption": captions,
                             "tags": [r.tags for r in res], "categories": [r.categories for r in res],
                             "status": [r.status for r in res]}), parsed)
    ls = build_label_system([parsed], LabelSystemConfig(min_freq=min_freq), work / "label_system")
    attrs = yaml.safe_load((ROOT / "data_engine/resources/attributes.yaml").read_text())
    colours = set(attrs["colour"])
    tp = fp = fn = unjudged = 0
    fps, fns = collections.Counter(), collections.Counter()
    examples = []
    for cap, r, truth in zip(captions, res, truths):
        pred, other = judged(ls, colours, ls.normalize(r.tags))
        gold = set(truth)
        unjudged += other
        tp += len(pred & gold)
        fp += len(pred - gold)
        fn += len(gold - pred)
        fps.update(pred - gold)
        fns.update(gold - pred)
        if (pred != gold) and len(examples) < 15:
            examples.append({"caption": cap, "tags": r.tags, "pred": sorted(pred), "gold": sorted(gold)})
    return {"captions": len(captions), "labels": len(ls), "parse_seconds": parse_s,
            "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn),
            "tp": tp, "fp": fp, "fn": fn, "unjudged_action_or_pattern_tags": unjudged,
            "top_fp": fps.most_common(10), "top_fn": fns.most_common(10), "examples": examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n-process", type=int, default=2)
    ap.add_argument("--min-freq", type=int, default=3)
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "parse_corpus.json")
    args = ap.parse_args(argv)
    from data_engine.corpus import CorpusConfig, iter_corpus

    cfg = CorpusConfig(n_pretrain=max(args.n + args.start, CorpusConfig().n_pretrain))
    items = list(iter_corpus(cfg, "pretrain", args.start, args.start + args.n))
    with tempfile.TemporaryDirectory() as tmp:
        out = evaluate([it.caption for it in items], [it.truth["mentioned"] for it in items],
                       args.n_process, args.min_freq, Path(tmp))
    print(json.dumps({k: v for k, v in out.items() if k != "examples"}, indent=1))
    for ex in out["examples"]:
        print(json.dumps(ex))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
