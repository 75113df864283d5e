"""The pipeline's shape: one table of stages, read by everything that runs them.

Each :class:`StageSpec` names the stage, the function that runs it, the stages whose outputs it
reads, the params sections it reads (in merge order), the folders it writes and the code it
runs. The Dagster assets (:mod:`.assets`: deps, descriptions, partitions), ``ramflow stage NAME``
(:mod:`.stage_cli`, :func:`.stages.run_stage`) and ``dvc.yaml`` (generated from this table by
``ramflow dvc-yaml --write``, :mod:`.dvc_yaml`; tests/test_stage_table.py fails when the
committed file differs) all derive from it, so the three run the same graph. Paths are relative
to the data root (``paths.data_root``); every stage also writes ``reports/{name}.json`` (its
metrics, the metadata Dagster shows) and may write pictures under ``plots/{name}/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

StageKind = Literal["data", "model", "engine", "evaluation", "registry"]

# code every stage runs: the stage layer and the shared I/O package
COMMON_CODE: tuple[str, ...] = ("orchestration.stages", "ramflow_io")


@dataclass(frozen=True)
class StageSpec:
    name: str
    function: str                 # dotted name of the stage function (``module.run_<name>``)
    upstream: tuple[str, ...]     # stages whose outputs this stage reads
    params: tuple[str, ...]       # params.yaml sections it reads; later ones are merged over the first
    outs: tuple[str, ...]         # folders it writes (relative to the data root)
    code: tuple[str, ...]         # packages / modules it runs besides COMMON_CODE (dotted names)
    kind: StageKind = "data"
    partitioned: bool = False     # one Dagster partition per raw shard
    plots: bool = False           # writes pictures under plots/{name}/ (DVC plots)
    description: str = ""

    def runner(self) -> Callable:
        """The stage function ``(env, keys=None, overrides=None) -> StageOutcome``."""
        module, _, attr = self.function.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    @property
    def all_code(self) -> tuple[str, ...]:
        return COMMON_CODE + self.code


STAGES: tuple[StageSpec, ...] = (
    StageSpec("raw_pairs", "orchestration.stages.run_raw_pairs", upstream=(),
              params=("source", "corpus", "ingest"), outs=("raw",),
              code=("data_engine.corpus", "data_engine.ingest", "data_engine.coco_source"), partitioned=True,
              description="image-text pairs as webdataset shards + manifest (embedded corpus or COCO photos: "
                          "source:)"),
    StageSpec("parsed_tags", "orchestration.stages.run_parsed_tags", upstream=("raw_pairs",),
              params=("parse",), outs=("parsed",), code=("data_engine.parsing",), partitioned=True,
              description="captions parsed into tag strings, per shard then merged per split"),
    StageSpec("label_system", "orchestration.stages.run_label_system", upstream=("parsed_tags",),
              params=("label_system",), outs=("label_system", "labels"), code=("data_engine.label_system",),
              description="unified label system (ids, synonyms) and the parse label ids of every split"),
    StageSpec("preliminary_model", "orchestration.stages.run_preliminary_model",
              upstream=("raw_pairs", "label_system"), params=("preliminary_model",),
              outs=("models/preliminary_model",), code=("ram_model",), kind="model", plots=True,
              description="tagging + captioning model trained on parsed tags"),
    StageSpec("engine_cleaned_data", "orchestration.stages.run_engine_cleaned_data",
              upstream=("raw_pairs", "label_system", "preliminary_model"), params=("engine",), outs=("engine",),
              code=("engine_rounds", "ram_model"), kind="engine", plots=True,
              description="data engine: generated missing tags, cleaned wrong ones"),
    # retrained_model and refined_model start from the model before them (init_from in params.yaml)
    StageSpec("retrained_model", "orchestration.stages.run_retrained_model",
              upstream=("raw_pairs", "label_system", "preliminary_model", "engine_cleaned_data"),
              params=("retrained_model",), outs=("models/retrained_model",), code=("ram_model",), kind="model",
              plots=True, description="the preliminary model trained on engine-cleaned labels"),
    # the second round reads engine: with engine_refined: over it (params order = merge order)
    StageSpec("engine_refined_data", "orchestration.stages.run_engine_refined_data",
              upstream=("raw_pairs", "label_system", "retrained_model"), params=("engine", "engine_refined"),
              outs=("engine_refined",), code=("engine_rounds", "ram_model"), kind="engine", plots=True,
              description="second engine round: the retrained model relabels the captions"),
    StageSpec("refined_model", "orchestration.stages.run_refined_model",
              upstream=("raw_pairs", "label_system", "retrained_model", "engine_refined_data"),
              params=("refined_model",), outs=("models/refined_model",), code=("ram_model",), kind="model",
              plots=True, description="the retrained model trained on the second round's labels"),
    StageSpec("finetuned_model", "orchestration.stages.run_finetuned_model",
              upstream=("raw_pairs", "label_system", "refined_model"), params=("finetuned_model",),
              outs=("models/finetuned_model",), code=("ram_model",), kind="model", plots=True,
              description="short fine-tune on the clean finetune split"),
    StageSpec("evaluation_report", "orchestration.stages.run_evaluation_report",
              upstream=("raw_pairs", "label_system", "preliminary_model", "retrained_model", "refined_model",
                        "finetuned_model"),
              params=("evaluation",), outs=("evaluation",), code=("ram_model",), kind="evaluation", plots=True,
              description="mAP / P / R / F1 of the four models on the test split"),
    StageSpec("registered_model", "orchestration.stages.run_registered_model",
              upstream=("finetuned_model", "evaluation_report"), params=("registry",), outs=("registry",),
              code=("orchestration.model_registry",), kind="registry",
              description="registered as challenger; promoted to champion by the gate"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
MODEL_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.kind == "model")   # the four trained models
ENGINE_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.kind == "engine")  # the data engine's rounds
# stages that decide themselves whether their inputs changed (MLflow holds part of their state:
# train_result.json and registry fingerprints) and take ``force`` to redo the work; run_stage
# skips every other stage by its input/output fingerprints
FORCEABLE: tuple[str, ...] = tuple(s.name for s in STAGES if s.kind in ("model", "registry"))


def stage_spec(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def module_path(module: str, base: str | Path) -> str:
    """The repo-relative path of a dotted package or module below ``base``: ``pkg/sub`` for a
    package folder, ``pkg/mod.py`` for a module. A name the table holds but the tree lacks (moved
    code) raises, so dvc.yaml and the skip fingerprints never silently lose a code dep."""
    rel = module.replace(".", "/")
    if (Path(base) / rel).is_dir():
        return rel
    if (Path(base) / f"{rel}.py").is_file():
        return f"{rel}.py"
    raise FileNotFoundError(f"module {module!r} of the stage table (orchestration/pipeline.py) is not "
                            f"below {base}: update the table's code entries")


def code_paths(spec: StageSpec, base: str | Path) -> tuple[str, ...]:
    """Repo-relative paths of the code stage ``spec`` runs (its dvc.yaml code deps)."""
    return tuple(module_path(m, base) for m in spec.all_code)


def code_packages() -> tuple[str, ...]:
    """The top-level packages holding the code of every stage (what a copy of the repository for
    ``dvc repro`` needs beside dvc.yaml), in table order."""
    return tuple(dict.fromkeys(m.split(".")[0] for spec in STAGES for m in spec.all_code))


def report_path(root: str | Path, stage: str) -> Path:
    """``reports/{stage}.json``: the stage's metrics (DVC metrics, Dagster metadata)."""
    return Path(root) / "reports" / f"{stage}.json"


def plots_dir(root: str | Path, stage: str) -> Path:
    return Path(root) / "plots" / stage


def downstream(name: str) -> set[str]:
    """Stages that (transitively) read ``name``'s outputs."""
    found: set[str] = set()
    frontier = {name}
    while frontier:
        nxt = {s.name for s in STAGES if set(s.upstream) & frontier} - found
        found |= nxt
        frontier = nxt
    return found


def stage_seconds(events: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """Wall seconds per stage from a run's step events ``(step key, event type, unix time)``.

    A stage's time runs from its ``STEP_START`` to its ``STEP_SUCCESS`` or ``STEP_FAILURE``
    (Dagster's step key is the asset name, the stage name here); steps that are not stages
    (asset checks) are left out. Stages in pipeline order; a stage that started but never
    ended is not listed.
    """
    start: dict[str, float] = {}
    took: dict[str, float] = {}
    for key, kind, stamp in events:
        if key not in STAGE_NAMES:
            continue
        if kind == "STEP_START":
            start[key] = stamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and key in start:
            took[key] = stamp - start[key]
    return {name: took[name] for name in STAGE_NAMES if name in took}


def format_stage_times(seconds: dict[str, float], wall: float) -> str:
    """A fixed-width table of each stage's seconds and share of ``wall``, then their sum, the rest of
    the wall time (asset-check steps, Dagster and MLflow set-up) and the wall time."""
    width = max((len(n) for n in seconds), default=5)
    lines = [f"{'stage':<{width}}  {'seconds':>8}  {'share':>6}"]
    for name, s in seconds.items():
        lines.append(f"{name:<{width}}  {s:8.1f}  {s / wall:6.1%}" if wall > 0 else f"{name:<{width}}  {s:8.1f}")
    lines.append(f"{'stages':<{width}}  {sum(seconds.values()):8.1f}")
    lines.append(f"{'other':<{width}}  {wall - sum(seconds.values()):8.1f}  (quality checks, Dagster, MLflow set-up)")
    lines.append(f"{'wall time':<{width}}  {wall:8.1f}")
    return "\n".join(lines)
