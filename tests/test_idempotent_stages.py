"""Idempotent re-materialization: an unchanged training stage logs no new MLflow run, an unchanged
registration adds no registry version and moves no alias; ``force`` redoes either."""

from __future__ import annotations

import json

import pytest

from _train_helpers import labelled_root
from ramflow_io.formats import labels_path, model_dir
from ram_model.checkpoint import file_sha256
from ram_model.train_stage import TrainStageConfig, train_stage


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return labelled_root(tmp_path_factory.mktemp("data"), [16, 16])


def _cfg(**kw) -> TrainStageConfig:
    base = dict(model="_train_helpers:tiny_tagger", batch_size=8, micro_batch_size=4, max_steps=3,
                checkpoint_every=3, warmup_steps=1, lr=1e-2, num_workers=0, validation_fraction=0.0, seed=0)
    base.update(kw)
    return TrainStageConfig(**base)


def _runs(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return sorted(r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))


@pytest.mark.parametrize("resume", [True, False])
def test_a_finished_stage_is_reused_and_force_trains_again(root, tmp_path, resume):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, labels = tmp_path / "models" / "stage", labels_path(root, "pretrain")

    def run(**kw):
        return train_stage(_cfg(resume=resume, tracking_uri=uri, **kw), root, out, labels, evaluate_after=False)

    first = run()
    sha, mtime = file_sha256(first.checkpoint), first.checkpoint.stat().st_mtime_ns
    again = run(log_every=1)  # bookkeeping settings do not make another run
    assert again.reused and again.mlflow_run_id == first.mlflow_run_id and _runs(uri) == [first.mlflow_run_id]
    assert again.metrics == first.metrics and first.checkpoint.stat().st_mtime_ns == mtime
    forced = run(force=True)
    assert not forced.reused and forced.mlflow_run_id != first.mlflow_run_id
    assert _runs(uri) == sorted([first.mlflow_run_id, forced.mlflow_run_id])
    assert file_sha256(forced.checkpoint) == sha  # same seed, same data: the same weights, retrained
    changed = run(lr=5e-3)  # another setting: trained and logged again
    assert not changed.reused and len(_runs(uri)) == 3
    assert json.loads((out / "train_result.json").read_text())["mlflow_run_id"] == changed.mlflow_run_id


def test_a_changed_model_file_is_not_reused(root, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, labels = tmp_path / "stage", labels_path(root, "pretrain")
    first = train_stage(_cfg(tracking_uri=uri), root, out, labels, evaluate_after=False)
    first.checkpoint.write_bytes(first.checkpoint.read_bytes() + b"\0")  # not the model it describes
    again = train_stage(_cfg(tracking_uri=uri), root, out, labels, evaluate_after=False)
    assert not again.reused


# --------------------------------------------------------------------------- registry




@pytest.fixture
def env(tmp_path):
    from orchestration.settings import MlflowSettings, StageEnv

    params = tmp_path / "params.yaml"
    params.write_text("registry:\n  model_name: ram-tagger\n  tolerance: 0.0\n", encoding="utf-8")
    return StageEnv(tmp_path / "data", params, MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))


def _finetuned(env, weights: bytes, mAP: float) -> None:
    """What registered_model reads: the fine-tuned model file, its logged pyfunc and the evaluation."""
    import mlflow

    from orchestration.model_registry import experiment_id
    from orchestration.pipeline import report_path
    from ram_model.tracking import mlflow_store

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    folder = model_dir(env.data_root, "finetuned_model")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(weights)
    with mlflow_store(env.tracking_uri()), mlflow.start_run(experiment_id=experiment_id(env)) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
    (folder / "mlflow_model.json").write_text(json.dumps({"run_id": run.info.run_id, "model_uri": info.model_uri}))
    report = report_path(env.data_root, "evaluation_report")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"metrics": {"mAP": mAP, "micro_f1": mAP / 2}}))


def test_registered_model_is_idempotent_and_force_registers_again(env):
    from mlflow import MlflowClient

    from orchestration.stages import run_stage

    client = MlflowClient(env.tracking_uri(), env.tracking_uri())

    def state():
        versions = sorted(int(v.version) for v in client.search_model_versions("name='ram-tagger'"))
        return versions, int(client.get_model_version_by_alias("ram-tagger", "champion").version)

    def register(**overrides):
        return run_stage("registered_model", env, overrides=overrides or None).metrics

    _finetuned(env, b"model A", 0.5)
    assert register()["version"] == 1 and state() == ([1], 1)
    again = register()
    assert again["version"] == 1 and again["promoted"] is True and state() == ([1], 1)
    _finetuned(env, b"model B", 0.6)  # another model, better: v2 becomes champion
    assert register()["version"] == 2 and state() == ([1, 2], 2)
    _finetuned(env, b"model A", 0.5)  # model A's registration again: v1 as it was, champion not moved
    back = register()
    assert back["version"] == 1 and state() == ([1, 2], 2)
    forced = register(force=True)  # forced: a new version, gated again (0.5 < 0.6: challenger only)
    assert forced["version"] == 3 and forced["promoted"] is False and state() == ([1, 2, 3], 2)


def test_a_reused_finetune_keeps_its_logged_model(tmp_path):
    from orchestration.stages import StageOutcome, _logged_model

    (tmp_path / "mlflow_model.json").write_text(json.dumps({"run_id": "r1", "model_uri": "models:/m-1"}))
    assert _logged_model(tmp_path, StageOutcome("finetuned_model", details={"reused": True}, mlflow_run_id="r1")) \
        == "models:/m-1"
    assert _logged_model(tmp_path, StageOutcome("finetuned_model", details={"reused": False}, mlflow_run_id="r1")) is None
    assert _logged_model(tmp_path, StageOutcome("finetuned_model", details={"reused": True}, mlflow_run_id="r2")) is None


def test_force_is_refused_for_a_stage_without_it(env):
    import argparse

    from orchestration import stage_cli

    parser = argparse.ArgumentParser()
    stage_cli.register(parser.add_subparsers())
    args = parser.parse_args(["stage", "label_system", "--force", "--params", str(env.params_path),
                              "--data-root", str(env.data_root)])
    with pytest.raises(SystemExit, match="--force applies to .*registered_model"):
        args.func(args)
