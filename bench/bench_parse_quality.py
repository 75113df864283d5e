"""COCO-80 object recovery from real captions: ramflow parser vs SceneGraphParser.

Scoring reference: ../shared/tools/parse_eval next to the repository, or --harness (its
coco80_synonyms.json matcher, dev/holdout split and `--parser cmd` adapter), so the figures
compare with that harness's README table.

Steps: (1) parse the 25k COCO val2017 captions and build a label system from them (seeds +
frequent tags + synonyms, as the pipeline does); (2) run the harness on coco_dev with
`ramflow parse` (persistent cmd adapter) in four settings: raw tags, object/scene tags only
(`--only object,scene`: SceneGraphParser outputs entities only, while the harness maps any tag
string, so a colour "orange" or an action "tie" counts as the fruit or the necktie), and both
again normalized by the label system; and with the harness's built-in `sng` adapter; (3) print
P / R / F1. `--no-label-system` skips step (1) and the normalized rows (minutes faster).

Results: bench/results/parse_quality.json (no machine paths).

    .venv/bin/python bench/bench_parse_quality.py [--harness DIR] [--captions FILE] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _skip import skip_unless_present  # noqa: E402
SHARED = ROOT.parent / "shared"


def build_reference_label_system(captions_json: Path, work: Path, n_process: int) -> Path:
    """Parse real captions into a parsed parquet and build a label system from it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_engine.label_system import LabelSystemConfig, build_label_system
    from data_engine.parsing import ParseConfig, ParserPool

    caps = [a["caption"] for a in json.loads(captions_json.read_text())["annotations"]]
    with ParserPool(ParseConfig(n_process=n_process)) as pool:
        res = list(pool.parse_stream(caps))
    table = pa.table({"key": [str(i) for i in range(len(caps))], "caption": caps,
                      "tags": [r.tags for r in res], "categories": [r.categories for r in res],
                      "status": [r.status for r in res]})
    parsed = work / "parsed.parquet"
    pq.write_table(table, parsed)
    out = work / "label_system"
    ls = build_label_system([parsed], LabelSystemConfig(), out)
    print(f"label system from {len(caps)} captions: {len(ls)} labels -> {out}", flush=True)
    return out


def run_harness(harness: Path, args: list[str], json_out: Path, data: Path | None) -> dict:
    cmd = [sys.executable, str(harness / "parse_eval.py"), *args, "--json-out", str(json_out)]
    if data is not None:
        cmd += ["--data", str(data)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(json_out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", type=Path, default=SHARED / "tools" / "parse_eval")
    ap.add_argument("--captions", type=Path,
                    default=SHARED / "data" / "captions" / "coco_captions_val2017.json")
    ap.add_argument("--data", type=Path, default=None,
                    help="captions+objects JSONL for the harness (default: its own, coco_dev)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--n-process", type=int, default=2)
    ap.add_argument("--no-label-system", action="store_true", help="raw rows only (no 25k parse)")
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "parse_quality.json")
    args = ap.parse_args(argv)
    skip_unless_present(args.harness / "parse_eval.py", "give --harness")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_parse_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    cli = f"{sys.executable} -m orchestration.cli parse"
    settings = {"ramflow raw": cli, "ramflow obj": f"{cli} --only object,scene"}
    if not args.no_label_system:
        ls_dir = build_reference_label_system(args.captions, work, args.n_process)
        settings["ramflow+labels"] = f"{cli} --label-system {ls_dir}"
        settings["ramflow obj+labels"] = f"{cli} --only object,scene --label-system {ls_dir}"
    rows = {}
    for name, command in settings.items():
        slug = name.replace(" ", "_").replace("+", "_")
        rows[name] = run_harness(args.harness, ["--parser", "cmd", "--cmd-persistent", "--cmd", command,
                                                "--dump", str(work / f"{slug}.jsonl")],
                                 work / f"{slug}.json", args.data)
    rows["sng"] = run_harness(args.harness, ["--parser", "sng", "--dump", str(work / "sng.jsonl")],
                              work / "sng.json", args.data)
    ours = rows["ramflow raw"]
    print(f"\n{'split':<8} {'parser':<16} {'P':>6} {'R':>6} {'F1':>6} {'mentR':>6}  TP/FP/FN")
    summary = {}
    for split in [s for s in ("dev", "holdout") if ours["eval"][s]["n_images"]]:
        for name, res in rows.items():
            m = res["eval"][split]["parser"]
            summary[f"{split}/{name}"] = {k: m[k] for k in ("precision", "recall", "f1", "mention_recall",
                                                            "tp", "fp", "fn")}
            print(f"{split:<8} {name:<16} {m['precision']:>6.3f} {m['recall']:>6.3f} {m['f1']:>6.3f} "
                  f"{m['mention_recall']:>6.3f}  {m['tp']}/{m['fp']}/{m['fn']}")
        o = ours["eval"][split]["oracle"]
        print(f"{split:<8} {'oracle-mention':<16} {o['precision']:>6.3f} {o['recall']:>6.3f} {o['f1']:>6.3f}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
