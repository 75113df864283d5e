"""The stage layer: one function per pipeline stage, shared by Dagster assets and DVC.

Each ``run_<stage>(env, keys=None, overrides=None)`` loads its params section into the
owning package's pydantic config, calls that package's stage function with explicit paths
below ``env.data_root`` and writes ``reports/{stage}.json``; it returns a
:class:`StageOutcome` (flat metrics, plots, MLflow run id) that Dagster turns into metadata.
Nothing here computes results itself: counts and metrics are what the stage functions return.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_engine.coco_source import CocoSourceConfig, ingest_coco_source
from data_engine.corpus.config import CorpusConfig
from data_engine.ingest.config import IngestConfig
from data_engine.ingest.steps import (ingest_embedded, ingest_embedded_shard, measure_written_noise,
                                      merge_manifests)
from data_engine.ingest.writer import part_paths
from data_engine.label_system import LabelSystemConfig, assign_label_ids, build_label_system
from data_engine.parsing import ParseConfig, parse_split
from engine_rounds import EngineConfig, run_engine
from ram_model import train_stage as ts
from ram_model.checkpoint import file_sha256
from ram_model.evaluate import EvaluationConfig, evaluate_checkpoint
from ram_model.serving import log_pyfunc
from ram_model.train_stage import RESULT_FILE, TrainStageConfig
from ramflow_io import formats
from ramflow_io.params import load_params, stage_config

from .model_registry import pipeline_run_id, register_and_gate, registration_fingerprint, write_json
from .partitions import group_by_split, shard_key, shard_keys
from .pipeline import FORCEABLE, MODEL_STAGES, STAGE_NAMES, code_paths, plots_dir, report_path, stage_spec
from .plots import metrics_bars, top_ap_bars
from .settings import StageEnv, registry_config, training_backend

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    stage: str
    metrics: dict[str, Any] = field(default_factory=dict)   # flat scalars (Dagster metadata, DVC metrics)
    details: dict[str, Any] = field(default_factory=dict)   # nested, JSON-able
    plots: list[str] = field(default_factory=list)          # PNG paths
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "metrics": self.metrics, "details": self.details, "plots": self.plots,
                "mlflow_run_id": self.mlflow_run_id, "seconds": round(self.seconds, 3)}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable({k: getattr(value, k) for k in value.__dataclass_fields__})
    return value


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Flatten nested dicts of scalars into ``a/b`` keys (metadata and DVC metrics)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix] = value


def _cfg(cls, section: str, env: StageEnv, overrides: dict | None):
    return stage_config(cls, section, env.params_path, **(overrides or {}))


def _lock(env: StageEnv, name: str) -> contextlib.AbstractContextManager[None]:
    """Serialise merges of per-shard parts across concurrently running partition runs."""
    return formats.file_lock(env.data_root / ".locks" / f"{name}.lock")


# --------------------------------------------------------------------------- data stages


def run_raw_pairs(env: StageEnv, keys: list[str] | None = None, overrides: dict | None = None) -> StageOutcome:
    """Embedded corpus (or the ``source:`` dataset) -> shards. ``keys``: shard partitions to
    (re)write, None = all; a ``coco`` source always writes every split."""
    corpus_cfg = _cfg(CorpusConfig, "corpus", env, (overrides or {}).get("corpus"))
    cfg = _cfg(IngestConfig, "ingest", env, (overrides or {}).get("ingest"))
    all_keys = shard_keys(env.params_path)
    source = _cfg(CocoSourceConfig, "source", env, (overrides or {}).get("source"))
    if source.kind == "coco":  # real photos (data_engine.coco_source): every split at once, under one lock
        with _lock(env, "raw_merge"):
            summary = ingest_coco_source(env.data_root, source, cfg)
        written_keys = all_keys
    elif keys is None or set(keys) >= set(all_keys):
        summary = ingest_embedded(env.data_root, corpus_cfg, cfg)
        written_keys = all_keys
    else:
        for split, indices in group_by_split(keys).items():
            for index in indices:
                ingest_embedded_shard(corpus_cfg, split, index, env.data_root, cfg)
        written_keys = keys
        with _lock(env, "raw_merge"):
            summary = merge_manifests(env.data_root, noise=measure_written_noise(env.data_root))
    metrics: dict[str, Any] = {"shards_written": len(written_keys)}
    _flat("", {"written": summary.total.written, "seen": summary.total.seen,
               "skipped": sum(summary.total.skipped.values()), "counts_add_up": summary.counts_add_up,
               "per_split": {s: c.written for s, c in summary.splits.items()},
               "noise": summary.noise or {}}, metrics)
    return StageOutcome("raw_pairs", metrics, {"summary": _jsonable(summary), "keys": written_keys})


def _merge_parsed(env: StageEnv, split: str) -> int:
    """Concatenate the per-shard parse parts of ``split`` into ``parsed/{split}.parquet``."""
    parts = sorted((env.data_root / "parsed" / "parts").glob(f"{split}-*.parquet"))
    shards = {p.stem for p in formats.list_shards(env.data_root, split)}
    parts = [p for p in parts if p.stem in shards]
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    if table is not None:
        pq.write_table(table, formats.parsed_path(env.data_root, split))
    return 0 if table is None else table.num_rows


def _write_parts_from_split(env: StageEnv, split: str) -> None:
    """Cut ``parsed/{split}.parquet`` into per-shard parts (keys of each shard from its raw
    manifest part), so a later single-partition run can re-merge the split."""
    parts = env.data_root / "parsed" / "parts"
    for old in parts.glob(f"{split}-*.parquet"):
        old.unlink()
    table = pq.read_table(formats.parsed_path(env.data_root, split))
    for shard in formats.list_shards(env.data_root, split):
        index = int(shard.stem.rsplit("-", 1)[1])
        keys = pq.read_table(part_paths(env.data_root, split, index).rows, columns=["key"]).column("key")
        pq.write_table(table.filter(pc.is_in(table.column("key"), value_set=keys)),
                       parts / f"{shard_key(split, index)}.parquet")


def run_parsed_tags(env: StageEnv, keys: list[str] | None = None, overrides: dict | None = None) -> StageOutcome:
    """Captions -> tags, per split. A run holding every shard of a split parses it in one call
    (one parser load) and also keeps per-shard parts; a run holding some shards of a split
    parses those into parts and re-merges ``parsed/{split}.parquet`` from all parts."""
    cfg = _cfg(ParseConfig, "parse", env, overrides)
    summaries: dict[str, Any] = {}
    parts = env.data_root / "parsed" / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    if keys is None:
        keys = [p.stem for split in formats.SPLITS for p in formats.list_shards(env.data_root, split)]
    for split, indices in group_by_split(keys).items():
        wanted = [formats.shard_path(env.data_root, split, i) for i in indices]
        missing = [p for p in wanted if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} missing: materialize raw_pairs ({split}) first")
        with _lock(env, f"parsed_{split}"):
            if set(wanted) == set(formats.list_shards(env.data_root, split)):
                summaries[split] = parse_split(sorted(wanted), formats.parsed_path(env.data_root, split), cfg)
                _write_parts_from_split(env, split)
                continue
        for index, shard in zip(indices, wanted):
            key = shard_key(split, index)
            summaries[key] = parse_split([shard], parts / f"{key}.parquet", cfg)
        with _lock(env, f"parsed_{split}"):
            _merge_parsed(env, split)
    data = {k: _jsonable(v.as_dict()) for k, v in summaries.items()}
    metrics: dict[str, Any] = {name: sum(d[name] for d in data.values())
                               for name in ("captions", "parsed", "tags", "no_tags")}
    metrics["skipped"] = sum(sum(d["skipped"].values()) for d in data.values())
    metrics["tagged_fraction"] = (metrics["captions"] - metrics["no_tags"]) / max(metrics["captions"], 1)
    return StageOutcome("parsed_tags", metrics, {"summaries": data})


def run_label_system(env: StageEnv, keys: list[str] | None = None, overrides: dict | None = None) -> StageOutcome:
    cfg = _cfg(LabelSystemConfig, "label_system", env, overrides)
    parsed = [formats.parsed_path(env.data_root, s) for s in formats.SPLITS
              if formats.parsed_path(env.data_root, s).exists()]
    out_dir = formats.label_system_dir(env.data_root)
    system = build_label_system(parsed, cfg, out_dir)
    assigned = {}
    for path in parsed:
        split = path.stem
        out = formats.labels_path(env.data_root, split)
        out.parent.mkdir(parents=True, exist_ok=True)
        assigned[split] = _jsonable(assign_label_ids(path, system, out))
    metrics: dict[str, Any] = {"tags": len(system)}
    _flat("assigned", assigned, metrics)
    return StageOutcome("label_system", metrics, {"assigned": assigned})


# --------------------------------------------------------------------------- model stages


class TrainInputs(NamedTuple):
    """What a training stage reads below the data root."""

    labels: Path              # label table it trains on
    init_stage: str | None    # stage whose model initialises it (None: from scratch)
    split: str                # split it trains on


# the one place the training stages' inputs are wired (``ramflow stage`` and ``ramflow train`` read it)
_TRAIN_INPUTS: dict[str, Callable[[Path], TrainInputs]] = {
    "preliminary_model": lambda root: TrainInputs(formats.labels_path(root, "pretrain"), None, "pretrain"),
    "retrained_model": lambda root: TrainInputs(formats.engine_labels_path(root, "pretrain"), None, "pretrain"),
    "refined_model": lambda root: TrainInputs(formats.engine_labels_path(root, "pretrain", "engine_refined"), None,
                                              "pretrain"),
    "finetuned_model": lambda root: TrainInputs(formats.labels_path(root, "finetune"), "refined_model", "finetune"),
}


def train_inputs(stage: str, data_root: Path) -> TrainInputs:
    """What training stage ``stage`` reads below ``data_root`` (as the pipeline wires it)."""
    if stage not in _TRAIN_INPUTS:
        raise KeyError(f"{stage!r} is not a training stage; training stages: {', '.join(MODEL_STAGES)}")
    return _TRAIN_INPUTS[stage](Path(data_root))


class EngineRound(NamedTuple):
    """One data-engine round (both rounds start from the parsed labels; its params sections, in
    merge order, are the stage table's ``params``)."""

    model_stage: str            # stage whose model tags the split
    labels_dir: str             # folder of its labels (``formats.engine_labels_path``)


_ENGINE_ROUNDS: dict[str, EngineRound] = {
    "engine_cleaned_data": EngineRound("preliminary_model", "engine"),
    "engine_refined_data": EngineRound("retrained_model", "engine_refined"),
}


def _train(stage: str, env: StageEnv, overrides: dict | None) -> StageOutcome:
    cfg = _cfg(TrainStageConfig, stage, env, overrides)
    training_backend(stage, cfg.backend, env.launcher)  # params decide the backend; a launcher disagreeing fails
    # runs go to this pipeline's tracking store
    labels, init_stage, split = train_inputs(stage, env.data_root)
    update = {"tracking_uri": env.tracking_uri(), "experiment": env.mlflow.experiment}
    if "splits" not in (load_params(env.params_path).get(stage) or {}) and "splits" not in (overrides or {}):
        update["splits"] = [split]  # the data flow decides the split unless params say otherwise
    cfg = cfg.model_copy(update=update)
    init_from = formats.model_dir(env.data_root, init_stage) if init_stage else None
    out_dir = formats.model_dir(env.data_root, stage)
    parent = pipeline_run_id(env)
    result = _launch_training(env, cfg, out_dir, labels, init_from, parent)
    metrics: dict[str, Any] = {}
    _flat("", _jsonable(result.metrics), metrics)
    plots = [str(p) for p in _training_plots(env, stage)]
    return StageOutcome(stage, metrics, {"checkpoint": str(result.checkpoint), "parent_run_id": parent,
                                         "reused": result.reused}, plots, result.mlflow_run_id)


def _launch_training(env: StageEnv, cfg, out_dir: Path, labels: Path, init_from: Path | None, parent: str):
    """In-process torch, or DeepSpeed workers through the training package's torchrun launcher."""
    if cfg.backend == "deepspeed":
        return ts.launch_train_stage(cfg, env.data_root, out_dir, labels, init_from, parent,
                                     nproc=env.launcher.nproc, timeout_s=env.launcher.timeout_s)
    return ts.train_stage(cfg, env.data_root, out_dir, labels, init_from, parent)


def _training_plots(env: StageEnv, stage: str) -> list[Path]:
    """Copy the PNGs the training run wrote (loss curves) into ``plots/{stage}/``."""
    out = plots_dir(env.data_root, stage)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    src = formats.model_dir(env.data_root, stage)
    copied = []
    for png in sorted(src.glob("*.png")):
        shutil.copy2(png, out / png.name)
        copied.append(out / png.name)
    return copied


def run_preliminary_model(env, keys=None, overrides=None) -> StageOutcome:
    return _train("preliminary_model", env, overrides)


def run_retrained_model(env, keys=None, overrides=None) -> StageOutcome:
    return _train("retrained_model", env, overrides)


def run_refined_model(env, keys=None, overrides=None) -> StageOutcome:
    return _train("refined_model", env, overrides)


def run_finetuned_model(env, keys=None, overrides=None) -> StageOutcome:
    outcome = _train("finetuned_model", env, overrides)

    model_dir = formats.model_dir(env.data_root, "finetuned_model")
    logged = _logged_model(model_dir, outcome)
    info = logged or log_pyfunc(model_dir, run_id=outcome.mlflow_run_id, tracking_uri=env.tracking_uri(),
                                data_root=env.data_root)
    outcome.details["model_uri"] = info
    write_json(model_dir / "mlflow_model.json", {"run_id": outcome.mlflow_run_id, "model_uri": info})
    return outcome


def _logged_model(model_dir: Path, outcome: StageOutcome) -> str | None:
    """The pyfunc already logged for this very training run (the stage was reused), else None."""
    path = model_dir / "mlflow_model.json"
    if not outcome.details.get("reused") or not path.exists():
        return None
    logged = json.loads(path.read_text(encoding="utf-8"))
    return logged.get("model_uri") if logged.get("run_id") == outcome.mlflow_run_id else None


def run_engine_cleaned_data(env: StageEnv, keys=None, overrides=None) -> StageOutcome:
    return _engine_round("engine_cleaned_data", env, overrides)


def run_engine_refined_data(env: StageEnv, keys=None, overrides=None) -> StageOutcome:
    return _engine_round("engine_refined_data", env, overrides)


def engine_round_config(params_path: str | Path | None, stage: str, overrides: dict | None = None) -> EngineConfig:
    """The ``EngineConfig`` of engine round ``stage``: its first params section (``engine:``, what
    both rounds share), each later one of the stage table merged over it (second round:
    ``engine_refined:``), then ``overrides``. The one merge rule (bench/engine_rules.py uses it too)."""
    first, *over = stage_spec(stage).params
    params = load_params(params_path)
    merged: dict[str, Any] = {}
    for section in over:
        merged.update(params.get(section) or {})
    return stage_config(EngineConfig, first, params_path, **{**merged, **(overrides or {})})


def engine_config(stage: str, env: StageEnv, overrides: dict | None = None) -> EngineConfig:
    """:func:`engine_round_config` of the environment's params file."""
    return engine_round_config(env.params_path, stage, overrides)


def _engine_round(stage: str, env: StageEnv, overrides: dict | None) -> StageOutcome:
    """One engine pass over the pretrain split's parsed labels with the model of ``_ENGINE_ROUNDS[stage]``."""
    cfg = engine_config(stage, env, overrides)
    model_stage, round_dir = _ENGINE_ROUNDS[stage].model_stage, _ENGINE_ROUNDS[stage].labels_dir
    report_dir = plots_dir(env.data_root, stage)
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    out = formats.engine_labels_path(env.data_root, "pretrain", round_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tracking = {"tracking_uri": env.tracking_uri(), "experiment": env.mlflow.experiment,
                "parent_run_id": pipeline_run_id(env)}  # the engine model's fine-tune, when adapt_epochs > 0
    result = run_engine(formats.model_dir(env.data_root, model_stage), env.data_root, "pretrain",
                        formats.labels_path(env.data_root, "pretrain"), formats.label_system_dir(env.data_root),
                        out, cfg, report_dir, tracking)
    metrics: dict[str, Any] = {}
    data = _jsonable(result)
    _flat("", {k: v for k, v in data.items() if k not in ("artifacts", "out_path")}, metrics)
    if result.metrics:  # label quality per engine step against the corpus truth

        metrics_bars(result.metrics, ["precision", "recall", "f1"], report_dir / "steps_vs_truth.png",
                     "engine labels vs truth, per step")
    plots = [str(p) for p in sorted(report_dir.glob("*.png"))]

    run_id = None  # the adapted engine model's MLflow run, when the engine fine-tuned one
    adapted = result.generation.get("adapted_model")
    if adapted and (Path(adapted) / RESULT_FILE).exists():
        run_id = json.loads((Path(adapted) / RESULT_FILE).read_text(encoding="utf-8")).get("mlflow_run_id")
    return StageOutcome(stage, metrics, {"result": data}, plots, run_id)


# --------------------------------------------------------------------------- evaluation and registry


_TABLE_METRICS = ("mAP", "micro_precision", "micro_recall", "micro_f1", "macro_f1")


def evaluation_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per model, mAP / P / R / F1 (+ open-set mAP when measured)."""
    cols = list(_TABLE_METRICS) + (["open_set_mAP"] if any("open_set_mAP" in r for r in rows.values()) else [])
    lines = ["| model | images | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, r in rows.items():
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), (int, float)) else "-" for c in cols]
        lines.append(f"| {name} | {r.get('images', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_evaluation_report(env: StageEnv, keys=None, overrides=None) -> StageOutcome:
    """Evaluate the pipeline's models on the test split against the corpus truth tags."""
    cfg = _cfg(EvaluationConfig, "evaluation", env, overrides)
    out_dir = env.data_root / "evaluation"
    shutil.rmtree(out_dir, ignore_errors=True)
    shards = formats.list_shards(env.data_root, cfg.split)
    if not shards:
        raise FileNotFoundError(f"no {cfg.split} shards under {env.data_root}/raw")
    results, rows = {}, {}
    for name in MODEL_STAGES:
        res = evaluate_checkpoint(formats.model_dir(env.data_root, name), shards, cfg, out_dir / f"{name}.json")
        results[name] = res
        row = {k: v for k, v in res["all"].items() if k != "per_class_ap"}
        row["images"] = row.pop("num_images")
        if "open_set" in res:
            row["open_set_mAP"] = res["open_set"]["mAP"]
        rows[name] = row
    table = evaluation_table(rows)
    (out_dir / "table.md").write_text(table + "\n", encoding="utf-8")
    pdir = plots_dir(env.data_root, "evaluation_report")
    shutil.rmtree(pdir, ignore_errors=True)
    plots = [str(metrics_bars(rows, list(_TABLE_METRICS), pdir / "models.png", f"{cfg.split} split: models")),
             str(top_ap_bars(results["finetuned_model"]["all"]["per_class_ap"], pdir / "finetuned_ap.png",
                             "fine-tuned model: per-tag AP (best and worst)"))]
    metrics = {k: v for k, v in rows["finetuned_model"].items() if isinstance(v, (int, float))}
    for name in MODEL_STAGES[:-1]:
        metrics[f"{name}/mAP"] = rows[name]["mAP"]
    log.info("evaluation (%s split):\n%s", cfg.split, table)
    return StageOutcome("evaluation_report", metrics, {"table_md": table, "models": rows,
                                                        "counts": {n: r["counts"] for n, r in results.items()}},
                        plots)


def run_registered_model(env: StageEnv, keys=None, overrides=None) -> StageOutcome:
    cfg = registry_config(env.params_path)
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    model = json.loads((formats.model_dir(env.data_root, "finetuned_model") / "mlflow_model.json").read_text())
    evaluation = json.loads(report_path(env.data_root, "evaluation_report").read_text())
    value = float(evaluation["metrics"][cfg.metric])

    fingerprint = registration_fingerprint(file_sha256(formats.model_dir(env.data_root, "finetuned_model")),
                                           cfg.metric, value, evaluation["metrics"])
    decision = register_and_gate(env, cfg, model["model_uri"], value, model.get("run_id"), fingerprint)
    write_json(env.data_root / "registry" / "decision.json", decision.to_dict())
    metrics = {"version": int(decision.version), "promoted": decision.promoted,
               f"challenger_{cfg.metric}": decision.challenger_value,
               f"champion_{cfg.metric}_before": decision.champion_value}
    return StageOutcome("registered_model", metrics, {"decision": decision.to_dict()},
                        mlflow_run_id=model.get("run_id"))


# --------------------------------------------------------------------------- finished stages

# Stages whose finished outputs are reused when nothing they read changed (:func:`run_stage`).
# The training stages and registered_model decide that themselves (train_result.json fingerprint,
# registry fingerprint), since MLflow holds part of their state.
SKIPPABLE = tuple(name for name in STAGE_NAMES if name not in FORCEABLE)


def _code_deps(name: str, base: Path) -> tuple[str, ...]:
    """The code a stage depends on: the stage table's code of ``name`` (dvc.yaml's code deps,
    the rule DVC reruns it by) as paths below ``base``."""
    return code_paths(stage_spec(name), base)


@functools.lru_cache(maxsize=None)
def _code_digest(name: str) -> str:
    """sha256 of the code stage ``name`` depends on (:func:`_code_deps`): changed code reruns it."""
    h = hashlib.sha256()
    base = Path(__file__).resolve().parents[1]
    for dep in _code_deps(name, base):
        top = base / dep
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(path.relative_to(base).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def _tree_digest(root: Path, rels: tuple[str, ...]) -> str:
    """sha256 of the relative paths and bytes of every file below ``root/rel`` for each ``rel``
    (training checkpoints left out: a model folder's train_result.json holds its weights' sha256)."""
    h = hashlib.sha256()
    for rel in rels:
        top = root / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        h.update(f"{rel}:{len(files)}".encode())
        for path in files:
            if "checkpoints" in path.relative_to(root).parts:
                continue
            h.update(path.relative_to(root).as_posix().encode())
            with path.open("rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def stage_fingerprints(name: str, env: StageEnv, keys: list[str] | None) -> tuple[str, str] | None:
    """``(inputs, outputs)`` digests of a :data:`SKIPPABLE` stage, else None. Inputs: its params
    sections, the shard keys, its code and every file its upstream stages wrote; outputs: every
    file it writes (``StageSpec.outs``). A report holding both, equal to the current ones, means
    the stage finished on these inputs and its outputs are untouched since."""
    if name not in SKIPPABLE:
        return None
    spec, params = stage_spec(name), load_params(env.params_path)
    if name == "raw_pairs" and (params.get("source") or {}).get("kind", "embedded") != "embedded":
        return None  # an external dataset is not part of the inputs hashed here
    if keys is not None and spec.partitioned and set(keys) >= set(shard_keys(env.params_path)):
        keys = None  # every partition (Dagster's range) is the whole stage (DVC's run)
    head = {"stage": name, "keys": sorted(keys) if keys else None, "code": _code_digest(name),
            "params": {section: params.get(section) for section in spec.params},
            "mlflow": [env.tracking_uri(), env.mlflow.experiment]}
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    for upstream in spec.upstream:
        h.update(_tree_digest(env.data_root, stage_spec(upstream).outs).encode())
    return h.hexdigest(), _tree_digest(env.data_root, spec.outs)


def _finished(name: str, env: StageEnv, fingerprints: tuple[str, str] | None) -> StageOutcome | None:
    """The stored outcome of ``name`` when its report says it finished on the current inputs and
    its outputs are the ones it wrote; else None."""
    if fingerprints is None:
        return None
    try:
        report = json.loads(report_path(env.data_root, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if [report.get("inputs"), report.get("outputs")] != list(fingerprints):
        return None
    return StageOutcome(name, report.get("metrics", {}), report.get("details", {}), report.get("plots", []),
                        report.get("mlflow_run_id"), float(report.get("seconds", 0.0)))


def _write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``reports/{stage}.json`` atomically: its presence marks the stage finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str), encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- dispatch


def run_stage(name: str, env: StageEnv, keys: list[str] | None = None, overrides: dict | None = None) -> StageOutcome:
    """Run one stage and write ``reports/{name}.json`` (what DVC reads as metrics).

    The report is removed before the stage starts and written (atomically) only once it has
    finished, so an interrupted stage (Ctrl-C, a crash) leaves no report and runs again next
    time, while a :data:`SKIPPABLE` stage whose report matches its current inputs and outputs
    (:func:`stage_fingerprints`) is not run again: a rerun continues from the last finished stage.
    """
    spec = stage_spec(name)  # KeyError naming the stages for an unknown name
    env.data_root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fingerprints = stage_fingerprints(name, env, keys) if not overrides else None
    done = _finished(name, env, fingerprints)
    if done is not None:
        log.info("stage %s is up to date (inputs and outputs unchanged since it finished): not run again", name)
        done.details["up_to_date"] = True
        return done
    report_file = report_path(env.data_root, name)
    report_file.unlink(missing_ok=True)  # no report while the stage's outputs are being (re)written
    outcome = spec.runner()(env, keys, overrides)  # the stage table's function
    outcome.seconds = time.perf_counter() - start
    report = outcome.to_dict()
    if name == "registered_model":
        report["decision"] = outcome.details["decision"]
    if fingerprints is not None:  # inputs as read before the run; outputs as written
        report["inputs"], report["outputs"] = fingerprints[0], _tree_digest(env.data_root, stage_spec(name).outs)
    _write_report(report_file, report)
    plots_dir(env.data_root, name).mkdir(parents=True, exist_ok=True)
    log.info("stage %s done in %.1fs", name, outcome.seconds)
    return outcome


__all__ = ["StageOutcome", "run_stage", "train_inputs", "engine_round_config", "shard_keys"]
