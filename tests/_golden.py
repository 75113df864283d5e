"""The tiny pipeline's outputs reduced to one JSON-able digest, and the golden copy of it.

Issue 21 asks for a redesign with no behaviour change: the tiny pipeline's outputs must stay
identical. :func:`digest` reduces a finished tiny data root to what the pipeline *produced*
(not how long it took, where it ran or which code version wrote it):

``data`` (no trained model involved, exact at any thread count)
    raw shards (per split counts, the manifest's rows, every tar member's bytes), the parsed
    tags and the label ids of every split, the label system (id, name, category of every tag;
    synonyms, frequencies and thresholds hashed).
``models`` (everything a trained model decides, exact at one torch thread count)
    per model folder (the four pipeline models and the two engine rounds' adapted taggers):
    the weights (a name-independent digest of every tensor), thresholds, the loss history and
    the training result's metrics; per engine round: the label sets written (hashed, with
    counts), its counts, generation settings, label quality against the truth and its tables;
    per evaluated model: every metric of ``evaluation/{model}.json``; the registry decision.

Measured on the 2-core development machine (2026-12-03, the tree at e30db37): two runs with
the same thread count wrote byte-identical shards, parquet files and ``model.pt`` files, so
every value here is compared exactly (floats as JSON writes them, no rounding). One torch
thread against two changes the weights (loss 7.6e-6 apart after three steps) and with them
ranking metrics (finetuned mAP 0.3546 vs 0.3588, one tag's AP 0.42 vs 0.67); the data section
and both engine rounds' label sets were the same. So the golden file holds one ``models``
section per torch thread count (``models_by_threads``); a session at a thread count without
one compares the data section only and says so.

Left out on purpose: timings and throughputs, absolute paths, MLflow run ids and model URIs,
code or input fingerprints, the ``engine``/``backend`` name of the training backend (a
rename, not a behaviour), configs (inputs, not outputs) and the PNG plots.

Regenerate (only when a behaviour change is intended; say so in the commit)::

    OMP_NUM_THREADS=1 .venv/bin/python -m tests._golden --write      # new file: this run's data + models
    OMP_NUM_THREADS=2 .venv/bin/python -m tests._golden --add-threads # add/replace this thread count's models
    .venv/bin/python -m tests._golden --root DATA_ROOT --threads N --write  # digest a finished data root

Without ``--root`` the command runs the tiny pipeline (tests/_pipeline.py, as the session
fixture does) in a temporary folder first. ``--check`` compares instead of writing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GOLDEN = Path(__file__).resolve().parent / "data" / "tiny_pipeline_golden.json"
SPLITS = ("pretrain", "finetune", "test")
MODEL_STAGES = ("preliminary_model", "retrained_model", "refined_model", "finetuned_model")
ENGINE_ROUNDS = {"engine_cleaned_data": "engine", "engine_refined_data": "engine_refined"}
# keys that measure time or name the machine, the run or the backend: never part of a digest
_VOLATILE = frozenset({"train_seconds", "samples_per_s", "images_per_s", "launch_seconds", "seconds",
                       "engine", "backend", "checkpoint", "out_path", "adapted_model", "artifacts",
                       "mlflow_run_id", "model_uri", "fingerprint", "checkpoint_sha256", "root", "config"})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _drop_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict[str, Any]]:
    """A parquet file's rows sorted by key (content only: no file metadata, no writer version)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: str(r.get("key", "")))


def table_digest(path: Path, id_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Rows, a sha256 of their content and the total length of each list column in ``id_columns``."""
    rows = _rows(path)
    out: dict[str, Any] = {"rows": len(rows), "sha256": _sha(_canonical(rows).encode())}
    for col in id_columns:
        out[f"{col}_total"] = sum(len(r.get(col) or []) for r in rows)
    return out


def shard_digest(path: Path) -> str:
    """sha256 over every tar member's name and bytes (tar headers left out)."""
    h = hashlib.sha256()
    with tarfile.open(path) as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            h.update(member.name.encode())
            h.update(_sha(tar.extractfile(member).read()).encode())
    return h.hexdigest()


def weights_digest(path: Path) -> dict[str, Any]:
    """A digest of every tensor a checkpoint holds, independent of their names and nesting (a
    checkpoint format change that keeps the numbers keeps the digest): sorted per-tensor hashes."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    found: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous().cpu()
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            found.append(f"{t.dtype}:{tuple(t.shape)}:{_sha(raw)}")
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return {"tensors": len(found), "sha256": _sha("\n".join(sorted(found)).encode())}


def data_digest(root: Path) -> dict[str, Any]:
    """What the data stages wrote (raw_pairs, parsed_tags, label_system): no model involved."""
    summary = _read_json(root / "raw" / "summary.json")
    raw = {"summary": _drop_volatile(summary),
           "manifest": table_digest(root / "raw" / "manifest.parquet"),
           "shards": {p.relative_to(root / "raw").as_posix(): shard_digest(p)
                      for split in SPLITS for p in sorted((root / "raw" / split).glob("*.tar"))}}
    parsed = {s: table_digest(root / "parsed" / f"{s}.parquet", ("tags",)) for s in SPLITS}
    system = _read_json(root / "label_system" / "label_system.json")
    labels = system["labels"]
    label_system = {
        "version": system.get("version"), "default_threshold": system.get("default_threshold"),
        "tags": [[t["id"], t["name"], t.get("category")] for t in labels],
        "sha256": _sha(_canonical(system).encode()),
        "tag_list_sha256": _sha((root / "label_system" / "ram_tag_list.txt").read_bytes()),
    }
    ids = {s: table_digest(root / "labels" / f"{s}.parquet", ("parse_label_ids", "unmapped")) for s in SPLITS}
    return {"raw": raw, "parsed": parsed, "label_system": label_system, "labels": ids}


def model_folder_digest(folder: Path) -> dict[str, Any]:
    """A trained model folder: weights, thresholds, loss history, training metrics."""
    history = [_drop_volatile(h) for h in _read_json(folder / "history.json")]
    result = _read_json(folder / "train_result.json")
    out = {"weights": weights_digest(folder / "model.pt"),
           "thresholds": _read_json(folder / "thresholds.json"),
           "history": history,
           "train_metrics": _drop_volatile(result.get("metrics", {}))}
    return out


def models_digest(root: Path) -> dict[str, Any]:
    """What the trained models decided: weights, engine label sets, evaluation, registry."""
    out: dict[str, Any] = {"models": {s: model_folder_digest(root / "models" / s) for s in MODEL_STAGES}}
    rounds = {}
    for stage, folder in ENGINE_ROUNDS.items():
        report_dir = root / "plots" / stage
        report = _drop_volatile(_read_json(report_dir / "engine_report.json"))
        rounds[stage] = {
            "labels": table_digest(root / folder / "pretrain.parquet",
                                   ("parse_label_ids", "union_label_ids", "added_ids", "removed_ids")),
            "report": report,
            "generation_thresholds": _read_json(report_dir / "generation_thresholds.json"),
            "tag_changes_sha256": _sha(_canonical(_read_json(report_dir / "tag_changes.json")).encode()),
            "cleaning_sha256": _sha(_canonical(_read_json(report_dir / "cleaning_per_tag.json")).encode()),
        }
        if (root / folder / "engine_model" / "model.pt").exists():
            rounds[stage]["engine_model"] = model_folder_digest(root / folder / "engine_model")
    out["engine_rounds"] = rounds
    out["evaluation"] = {s: _drop_volatile(_read_json(root / "evaluation" / f"{s}.json")) for s in MODEL_STAGES}
    decision = _read_json(root / "registry" / "decision.json")
    out["registry"] = {k: decision.get(k) for k in ("model_name", "version", "promoted", "reason", "metric",
                                                     "challenger_value", "champion_value")}
    return out


def digest(root: str | Path) -> dict[str, Any]:
    """``{"data": ..., "models": ...}`` of a finished tiny data root."""
    root = Path(root)
    return {"data": data_digest(root), "models": models_digest(root)}


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Field-by-field differences, one readable line each (``a/b[3]/c: expected X, got Y``)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        lines = []
        for key in sorted(set(expected) | set(actual), key=str):
            sub = f"{path}/{key}" if path else str(key)
            if key not in actual:
                lines.append(f"{sub}: missing (expected {_short(expected[key])})")
            elif key not in expected:
                lines.append(f"{sub}: unexpected (got {_short(actual[key])})")
            else:
                lines += differences(expected[key], actual[key], sub)
        return lines
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items expected, got {len(actual)}"]
        return [line for i, (e, a) in enumerate(zip(expected, actual)) for line in differences(e, a, f"{path}[{i}]")]
    if expected != actual:
        return [f"{path}: expected {_short(expected)}, got {_short(actual)}"]
    return []


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def load_golden(path: Path = GOLDEN) -> dict[str, Any]:
    return _read_json(path)


def golden_entry(found: dict[str, Any], threads: int) -> dict[str, Any]:
    return {"data": found["data"], "models_by_threads": {str(threads): found["models"]}}


def _write(path: Path, golden: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="digest the tiny pipeline's outputs; write or check the golden file")
    ap.add_argument("--root", type=Path, help="a finished tiny data root (default: run the tiny pipeline now)")
    ap.add_argument("--threads", type=int, help="torch threads the --root run used (default: this process's)")
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="replace the golden file with this digest")
    mode.add_argument("--add-threads", action="store_true",
                      help="add this thread count's models section (the data section must be equal)")
    mode.add_argument("--check", action="store_true", help="print the differences; exit 1 when any")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    with tempfile.TemporaryDirectory(prefix="ramflow_golden_") as tmp:
        root = args.root
        if root is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _pipeline import run_tiny_pipeline

            run = run_tiny_pipeline(Path(tmp))
            if not run.result.success:
                log.error("the tiny pipeline failed; nothing written")
                return 1
            root = run.data_root
        threads = args.threads or torch.get_num_threads()
        found = digest(root)
    if args.write:
        _write(args.golden, golden_entry(found, threads))
        log.info("wrote %s (models at %d torch threads)", args.golden, threads)
        return 0
    golden = load_golden(args.golden)
    diff = differences(golden["data"], found["data"], "data")
    if args.add_threads:
        if diff:
            log.error("the data section differs from the golden file; use --write:\n%s", "\n".join(diff))
            return 1
        golden["models_by_threads"][str(threads)] = found["models"]
        _write(args.golden, golden)
        log.info("added the models section at %d torch threads to %s", threads, args.golden)
        return 0
    models = golden["models_by_threads"].get(str(threads))
    diff += differences(models, found["models"], "models") if models is not None else [
        f"models: no golden section at {threads} torch threads (have {sorted(golden['models_by_threads'])})"]
    print("\n".join(diff) or "identical")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
