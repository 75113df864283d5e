"""Dagster definitions, blocking checks and a full tiny materialization.

The full run is the session's ``tiny_pipeline`` (tests/conftest.py): every asset of the TINY
profile in one in-process Dagster run. The tests read what it left: materializations and
metadata, asset checks, MLflow parent/child runs, the registered champion (served in process),
and, on a private copy of it, the promotion gate on a second registration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from orchestration.checks import ChecksConfig, run_checks
from orchestration.pipeline import STAGE_NAMES, report_path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "orchestration" / "profiles" / "tiny.yaml"
BIN = Path(sys.executable).parent
MODEL_ASSETS = ("preliminary_model", "retrained_model", "refined_model", "finetuned_model")


@pytest.fixture(autouse=True)
def _dagster_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))


def _materialize(defs: dg.Definitions, selection, instance, run_config=None) -> dg.ExecuteInProcessResult:
    """Materialize a selection of ``defs`` (its resolved assets carry its resources)."""
    return dg.materialize(list(defs.resolve_asset_graph().assets_defs), selection=selection,
                          instance=instance, raise_on_error=False, run_config=run_config)


def _tiny_params(tmp_path: Path, **sections) -> Path:
    params = yaml.safe_load(TINY.read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    params["paths"]["data_root"] = str(tmp_path / "data")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------- definitions


def test_definitions_assets_checks_resources_partitions(tmp_path):
    from orchestration.definitions import build_definitions

    defs = build_definitions(_tiny_params(tmp_path))
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == set(STAGE_NAMES)
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks == {("parsed_tags", "parse_coverage"), ("label_system", "label_system_size"),
                      ("evaluation_report", "evaluation_sane"), ("registered_model", "not_worse_than_champion")}
    for key in graph.asset_check_keys:
        assert graph.get_check_spec(key).blocking
    raw = graph.get(dg.AssetKey("raw_pairs"))
    assert raw.partitions_def.get_partition_keys() == ["pretrain-000000", "pretrain-000001",
                                                       "finetune-000000", "test-000000"]
    assert graph.get(dg.AssetKey("parsed_tags")).partitions_def == raw.partitions_def
    assert {"storage", "mlflow", "launcher"} <= set(defs.resources)
    assert defs.resolve_job_def("ramflow_pipeline") is not None


@pytest.mark.slow  # a `dagster` CLI subprocess (imports dagster and every asset module again)
def test_dagster_cli_validates_definitions(tmp_path):
    env = dict(os.environ, RAMFLOW_PARAMS=str(_tiny_params(tmp_path)),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "dagster"), "definitions", "validate", "-m", "orchestration.definitions"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- checks on planted data


def _plant_parsed(root: Path, tags_per_row: list[list[str]], split: str = "pretrain") -> None:
    n = len(tags_per_row)
    table = pa.table({"key": [f"{split}_{i:08d}" for i in range(n)], "caption": ["a caption"] * n,
                      "tags": tags_per_row, "categories": [["object"] * len(t) for t in tags_per_row],
                      "status": ["ok"] * n})
    (root / "parsed").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "parsed" / f"{split}.parquet")


def test_check_functions_fail_on_planted_bad_data(tmp_path):
    root = tmp_path / "data"
    _plant_parsed(root, [["dog"]] + [[] for _ in range(9)])
    params = _tiny_params(tmp_path)
    (cov,) = run_checks("parsed_tags", root, params)
    assert not cov.passed and cov.metadata["coverage"] == pytest.approx(0.1)
    _plant_parsed(root, [["dog"], ["cat", "tree"]])
    assert run_checks("parsed_tags", root, params)[0].passed

    (root / "label_system").mkdir(parents=True)
    (root / "label_system" / "label_system.json").write_text(json.dumps({"labels": [{"id": 0, "name": "dog"}]}))
    (size,) = run_checks("label_system", root, params)
    assert not size.passed and size.metadata["tags"] == 1

    report_path(root, "evaluation_report").parent.mkdir(parents=True, exist_ok=True)
    report_path(root, "evaluation_report").write_text(json.dumps({"metrics": {"mAP": float("nan"), "images": 12}}))
    assert not run_checks("evaluation_report", root, params)[0].passed
    report_path(root, "registered_model").write_text(json.dumps({"decision": {
        "promoted": False, "version": "2", "reason": "0.1 < champion 0.3 - 0"}}))
    gate = run_checks("registered_model", root, params)[0]
    assert not gate.passed and "champion" in gate.description
    assert ChecksConfig().min_parse_coverage == 0.9


def test_gate_rule():
    from orchestration.model_registry import gate

    assert gate(0.3, None, 0.0)[0]
    assert gate(0.3, 0.3, 0.0)[0]
    assert gate(0.29, 0.3, 0.02)[0]
    assert not gate(0.27, 0.3, 0.02)[0]
    assert not gate(float("nan"), None, 0.0)[0]


def test_blocking_check_stops_the_line_in_dagster(tmp_path):
    """Planted parsed tags + an impossible label-system bound: the check fails, the model
    asset downstream is never executed, and a check-only run on bad parse data fails too."""
    from orchestration.definitions import build_definitions

    params = _tiny_params(tmp_path, checks={"min_label_system_size": 100000})
    root = tmp_path / "data"
    _plant_parsed(root, [["dog", "tree"], ["cat"], ["dog", "car"]] * 4)
    defs = build_definitions(params)
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(defs, ["label_system", "preliminary_model"], instance)
    assert not result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert done == {"label_system"}
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "label_system_size" and not evaluation.passed
    assert not (root / "models" / "preliminary_model").exists()

    _plant_parsed(root, [[]] * 9 + [["dog"]])
    checks_only = _materialize(defs, dg.AssetSelection.checks_for_assets("parsed_tags"), instance)
    (coverage,) = checks_only.get_asset_check_evaluations()
    assert coverage.check_name == "parse_coverage" and not coverage.passed


# --------------------------------------------------------------------------- full tiny run


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline):
    """``(result, parent run id, env, instance, params)`` of the session's tiny pipeline run."""
    p = tiny_pipeline
    return p.result, p.parent, p.env, p.instance, p.params


def test_tiny_pipeline_materializes_every_asset(tiny_run):
    result, *_ = tiny_run
    assert result.success
    events = result.get_asset_materialization_events()
    by_asset: dict[str, list] = {}
    for e in events:
        by_asset.setdefault(e.asset_key.to_user_string(), []).append(e)
    assert set(by_asset) == set(STAGE_NAMES)
    for partitioned in ("raw_pairs", "parsed_tags"):
        assert sorted(e.partition for e in by_asset[partitioned]) == sorted(
            ["pretrain-000000", "pretrain-000001", "finetune-000000", "test-000000"])
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 4 and all(e.passed for e in evaluations)

    meta = {k: v[-1].materialization.metadata for k, v in by_asset.items()}
    assert meta["raw_pairs"]["written"].value == 32 + 12 + 12
    assert meta["label_system"]["tags"].value >= 10
    for name in MODEL_ASSETS:
        assert meta[name]["mlflow_run_id"].value
        assert meta[name]["steps"].value >= 1
        assert "data:image/png;base64," in meta[name]["plots"].value
    for name in ("engine_cleaned_data", "engine_refined_data"):
        assert "data:image/png;base64," in meta[name]["plots"].value
    assert 0.0 <= meta["evaluation_report"]["mAP"].value <= 1.0
    assert "| finetuned_model |" in meta["evaluation_report"]["evaluation_table"].value
    assert meta["registered_model"]["promoted"].value is True


def test_make_run_prints_the_label_quality_of_each_engine_round(tiny_run):
    from orchestration.stage_cli import engine_labels_line

    _, _, env, *_ = tiny_run
    for stage in ("engine_cleaned_data", "engine_refined_data"):
        metrics = json.loads(report_path(env.data_root, stage).read_text())["metrics"]
        line = engine_labels_line(report_path(env.data_root, stage))
        assert line.startswith("labels vs truth: parsed P ")
        assert line.endswith(f"cleaned P {metrics['metrics/cleaned/precision']:.3f} "
                             f"R {metrics['metrics/cleaned/recall']:.3f}")
    assert engine_labels_line(env.data_root / "reports" / "missing.json") is None


def test_training_runs_nest_under_one_pipeline_run(tiny_run):
    import mlflow

    result, parent, env, *_ = tiny_run
    client = mlflow.MlflowClient(env.tracking_uri())
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    stages = sorted(r.data.tags.get("ramflow.stage") for r in children)
    # the four models, and the model each engine round adapts first (shipped engine: adapt_epochs > 0)
    assert stages == sorted(MODEL_ASSETS + ("engine_model",) * 2)
    assert client.get_run(parent).info.status == "FINISHED"


def test_champion_is_registered_and_serves(tiny_run):
    import mlflow
    import pandas as pd

    from ramflow_io.formats import label_system_dir
    from data_engine.label_system import LabelSystem
    from ram_model.serving import example_images
    from ram_model.tracking import mlflow_store

    _, _, env, *_ = tiny_run
    client = mlflow.MlflowClient(env.tracking_uri(), env.tracking_uri())
    champion = client.get_model_version_by_alias("ram-tagger", "champion")
    challenger = client.get_model_version_by_alias("ram-tagger", "challenger")
    assert str(champion.version) == str(challenger.version) == "1"
    with mlflow_store(env.tracking_uri()):  # this run's store for the block, the session's after it
        model = mlflow.pyfunc.load_model("models:/ram-tagger@champion")
    out = model.predict(pd.DataFrame({"image": example_images(env.data_root, 3)}), params={"threshold": 0.0})
    names = set(LabelSystem.load(label_system_dir(env.data_root)).names)
    assert len(out) == 3 and all(set(t) == names for t in out["tags"])


def test_rematerializing_unchanged_stages_reuses_their_runs_and_version(tiny_run):
    """Same data and model: no new training run, no new registry version, champion unchanged."""
    import mlflow

    from orchestration.definitions import build_definitions
    from orchestration.resources import RamflowStorage

    first, _, env, instance, params = tiny_run
    runs = {e.asset_key.to_user_string(): e.materialization.metadata["mlflow_run_id"].value
            for e in first.get_asset_materialization_events() if e.asset_key.to_user_string() in MODEL_ASSETS}
    client = mlflow.MlflowClient(env.tracking_uri(), env.tracking_uri())
    defs = build_definitions(params, resources={
        "storage": RamflowStorage(params_path=str(params), data_root=str(env.data_root))})
    again = _materialize(defs, ["preliminary_model", "finetuned_model", "registered_model"], instance)
    assert again.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in again.get_asset_materialization_events()}
    assert meta["preliminary_model"]["mlflow_run_id"].value == runs["preliminary_model"]
    assert meta["finetuned_model"]["mlflow_run_id"].value == runs["finetuned_model"]
    assert meta["registered_model"]["version"].value == 1
    assert [str(v.version) for v in client.search_model_versions("name='ram-tagger'")] == ["1"]
    assert str(client.get_model_version_by_alias("ram-tagger", "champion").version) == "1"


def test_worse_challenger_is_not_promoted(tiny_pipeline, tmp_path):
    """Raise the champion's recorded mAP above anything reachable; re-registering the same
    model (forced: it is already registered) makes it challenger only, and the blocking check
    fails the run. On a private copy of the session's run (it changes the registry)."""
    import mlflow

    from _pipeline import copy_pipeline, stage_env
    from orchestration.definitions import build_definitions
    from orchestration.resources import RamflowStorage

    repo = copy_pipeline(tiny_pipeline, tmp_path)
    env, params, instance = stage_env(repo), repo / "params.yaml", dg.DagsterInstance.ephemeral()
    client = mlflow.MlflowClient(env.tracking_uri(), env.tracking_uri())
    client.set_model_version_tag("ram-tagger", "1", "mAP", "2.0")
    defs = build_definitions(params, resources={
        "storage": RamflowStorage(params_path=str(params), data_root=str(env.data_root))})
    result = _materialize(defs, ["registered_model"], instance,
                          {"ops": {"registered_model": {"config": {"overrides_yaml": "force: true"}}}})
    assert not result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "not_worse_than_champion" and not check.passed
    assert str(client.get_model_version_by_alias("ram-tagger", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("ram-tagger", "challenger").version) == "2"
    decision = json.loads(report_path(env.data_root, "registered_model").read_text())["decision"]
    assert decision["promoted"] is False and decision["champion_value"] == 2.0
