"""The pipeline's shape: stage names, what each reads, which params it uses, what it writes.

One table, read by the Dagster definitions (asset deps) and checked against ``dvc.yaml``
(tests/test_dvc_parity.py), so both tools run the same graph. Paths are relative to the
data root (``paths.data_root``); every stage also writes ``reports/{name}.json`` (its
metrics, the metadata Dagster shows) and may write pictures under ``plots/{name}/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: tuple[str, ...]     # stages whose outputs this stage reads
    params: tuple[str, ...]       # params.yaml sections it depends on
    outs: tuple[str, ...]         # folders it writes (relative to the data root)
    partitioned: bool = False     # one Dagster partition per raw shard
    description: str = ""


STAGES: tuple[StageSpec, ...] = (
    StageSpec("raw_pairs", (), ("source", "corpus", "ingest"), ("raw",), True,
              "image-text pairs as webdataset shards + manifest (embedded corpus or COCO photos: source:)"),
    StageSpec("parsed_tags", ("raw_pairs",), ("parse",), ("parsed",), True,
              "captions parsed into tag strings, per shard then merged per split"),
    StageSpec("label_system", ("parsed_tags",), ("label_system",), ("label_system", "labels"), False,
              "unified label system (ids, synonyms) and the parse label ids of every split"),
    StageSpec("preliminary_model", ("raw_pairs", "label_system"), ("preliminary_model",),
              ("models/preliminary_model",), False, "tagging + captioning model trained on parsed tags"),
    StageSpec("engine_cleaned_data", ("raw_pairs", "label_system", "preliminary_model"), ("engine",),
              ("engine",), False, "data engine: generated missing tags, cleaned wrong ones"),
    # retrained_model and refined_model start from the model before them (init_from in params.yaml)
    StageSpec("retrained_model", ("raw_pairs", "label_system", "preliminary_model", "engine_cleaned_data"),
              ("retrained_model",), ("models/retrained_model",), False,
              "the preliminary model trained on engine-cleaned labels"),
    StageSpec("engine_refined_data", ("raw_pairs", "label_system", "retrained_model"), ("engine", "engine_refined"),
              ("engine_refined",), False, "second engine round: the retrained model relabels the captions"),
    StageSpec("refined_model", ("raw_pairs", "label_system", "retrained_model", "engine_refined_data"),
              ("refined_model",), ("models/refined_model",), False,
              "the retrained model trained on the second round's labels"),
    StageSpec("finetuned_model", ("raw_pairs", "label_system", "refined_model"), ("finetuned_model",),
              ("models/finetuned_model",), False, "short fine-tune on the clean finetune split"),
    StageSpec("evaluation_report",
              ("raw_pairs", "label_system", "preliminary_model", "retrained_model", "refined_model",
               "finetuned_model"),
              ("evaluation",), ("evaluation",), False,
              "mAP / P / R / F1 of the four models on the test split"),
    StageSpec("registered_model", ("finetuned_model", "evaluation_report"), ("registry",),
              ("registry",), False, "registered as challenger; promoted to champion by the gate"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage_spec(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


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
