"""The training stage: MLflow logging (tmp sqlite store) and DeepSpeed ZeRO-2 with 2 processes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from _train_helpers import labelled_root, make_split, write_label_system
from ramflow_io.formats import labels_path
from ram_model.tracking import start_pipeline_run, tracking_uri
from ram_model.train_stage import TrainStageConfig, launch_train_stage, train_stage
from ram_model.trainer import latest_checkpoint

HELPERS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return labelled_root(tmp_path_factory.mktemp("data"), [24, 24], unlabeled_every=9)


def _cfg(**kw) -> TrainStageConfig:
    base = dict(model="_train_helpers:tiny_tagger", batch_size=8, micro_batch_size=4, max_steps=5,
                checkpoint_every=5, warmup_steps=1, lr=1e-2, num_workers=1, validation_fraction=0.0, seed=0,
                caption=True)
    base.update(kw)
    return TrainStageConfig(**base)


def test_train_stage_logs_a_nested_mlflow_run(root, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_root = tmp_path / "dr"
    data_root.symlink_to(root, target_is_directory=True)
    parent = start_pipeline_run(data_root)
    out = tmp_path / "models" / "preliminary_model"
    result = train_stage(_cfg(), data_root, out, labels_path(root, "pretrain"), None, parent, evaluate_after=False)
    uri = tracking_uri(data_root)
    assert uri == f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["stage.backend"] == "torch" and run.data.params["total_steps"] == "5"
    losses = client.get_metric_history(result.mlflow_run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5]
    assert {"train/lr", "train/samples_per_s", "train/loss_tag", "train/loss_caption"} <= set(run.data.metrics)
    assert run.data.metrics["data/skipped_no_labels"] == 5  # 48 images, every 9th unlabelled
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")}
    assert "plots/loss_curve.png" in artifacts
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert result.checkpoint.exists() and result.metrics["steps"] == 5
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to((root / "mlflow" / "artifacts").resolve())


@pytest.mark.slow
def test_deepspeed_zero2_with_two_processes(root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "ds"
    result = launch_train_stage(_cfg(backend="deepspeed", zero_stage=2), root, out, labels_path(root, "pretrain"),
                                nproc=2, timeout_s=900, evaluate_after=False)
    m = result.metrics
    assert m["world_size"] == 2 and m["steps"] == 5 and m["backend"] == "deepspeed"
    assert 0 < m["final_loss"] < 10
    ckpt = out / "checkpoints" / "step_00000005" / "backend"
    # ZeRO-2 partitions the optimizer state: one file per rank
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    assert result.checkpoint.exists()


def test_ram_tiny_stage_calibrates_evaluates_and_exports(root, tmp_path, monkeypatch):
    """The registry model end to end: train, calibrate on held-out keys, test mAP, model.pt."""
    from ram_model.registry import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data_root = tmp_path / "dr"
    for sub in ("raw", "labels", "label_system"):
        (data_root / sub).mkdir(parents=True)
    (data_root / "raw" / "pretrain").symlink_to(root / "raw" / "pretrain", target_is_directory=True)
    (data_root / "labels" / "pretrain.parquet").symlink_to(root / "labels" / "pretrain.parquet")
    write_label_system(data_root)
    make_split(data_root, "test", [16], seed=5)
    cfg = _cfg(model="ram_tiny", max_steps=3, validation_fraction=0.25, eval_batch_size=16,
               model_overrides={"caption_layers": 1})
    result = train_stage(cfg, data_root, tmp_path / "out", labels_path(root, "pretrain"))
    m = result.metrics
    assert m["steps"] == 3 and m["val/num_images"] > 0 and 0.0 <= m["test/mAP"] <= 1.0
    assert m["test/num_images"] == 16
    # every test class with positives is either trained on (positive in the training labels) or not
    assert m["test/classes_trained"] + m["test/classes_untrained"] == m["test/num_classes_with_positives"]
    assert m["test/classes_trained"] > 0 and 0.0 <= m["test/mAP_trained"] <= 1.0
    model = load_model(result.checkpoint)
    assert model.tag_names[:2] == ["red", "green"] and len(model.thresholds) == 6
    assert (tmp_path / "out" / "thresholds.json").exists()


def test_engine_adaptation_fine_tunes_through_the_trainer(root, tmp_path, monkeypatch):
    """``engine_rounds.adapt``: the preliminary recipe, fine-tuned on the non-held-out half of
    a clean split; the trainer's validation slice is exactly the engine's calibration half."""
    import json

    import torch

    from engine_rounds.adapt import adapt_model, trained_on
    from ram_model.registry import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data_root = tmp_path / "dr"
    for sub in ("raw", "labels"):
        (data_root / sub).mkdir(parents=True)
    (data_root / "raw" / "pretrain").symlink_to(root / "raw" / "pretrain", target_is_directory=True)
    (data_root / "labels" / "pretrain.parquet").symlink_to(root / "labels" / "pretrain.parquet")
    write_label_system(data_root)
    clean = make_split(data_root, "finetune", [20], seed=7)
    cfg = _cfg(model="ram_tiny", max_steps=2, model_overrides={"caption_layers": 1})
    prelim = tmp_path / "prelim"
    train_stage(cfg, data_root, prelim, labels_path(root, "pretrain"), evaluate_after=False)
    (prelim / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))  # as the stage writes it

    adapted = adapt_model(prelim, data_root, "finetune", epochs=2, lr=1e-3, holdout=0.5, out_dir=tmp_path / "adapted")
    result = json.loads((adapted / "train_result.json").read_text())["metrics"]
    used = trained_on(clean, 0.5)
    assert 0 < len(used) < len(clean)
    assert result["data/held_out_validation"] == len(clean) - len(used)
    assert result["data/train_samples"] == len(used) and result["steps"] > 0 and result["steps"] % 2 == 0  # 2 epochs
    saved = json.loads((adapted / "train_config.json").read_text())
    assert saved["splits"] == ["finetune"] and saved["validation_fraction"] == 0.5 and saved["max_steps"] is None
    before, after = load_model(prelim).state_dict(), load_model(adapted).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_clean_mix_trains_on_the_clean_split_repeated_and_the_engine_leaves_those_keys_out(root, tmp_path,
                                                                                              monkeypatch):
    """``clean_mix``: the clean split's non-reserved half is read ``repeat`` times per epoch; the
    engine finds those keys in the saved config and does not calibrate on them."""
    from engine_rounds.adapt import mixed_in, trained_on

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data_root = tmp_path / "dr"
    for sub in ("raw", "labels"):
        (data_root / sub).mkdir(parents=True)
    (data_root / "raw" / "pretrain").symlink_to(root / "raw" / "pretrain", target_is_directory=True)
    write_label_system(data_root)
    clean = make_split(data_root, "finetune", [20], seed=7)
    mix = {"split": "finetune", "repeat": 3, "holdout": 0.5}
    out = tmp_path / "prelim"
    result = train_stage(_cfg(clean_mix=mix), data_root, out, labels_path(root, "pretrain"), evaluate_after=False)
    used = trained_on(clean, 0.5)
    m = result.metrics
    assert 0 < len(used) < len(clean)
    assert m["data/reserved"] == len(clean) - len(used) and m["data/complete_labels"] == len(used)
    assert m["data/repeated_samples"] == 2 * len(used)
    assert m["data/train_samples"] == 43 + 3 * len(used)  # 48 pretrain images, 5 unlabelled
    assert mixed_in(out, "finetune", clean) == used and mixed_in(out, "pretrain", clean) == set()
    with pytest.raises(ValueError, match="also in splits"):
        train_stage(_cfg(clean_mix=mix, splits=["pretrain", "finetune"]), data_root, tmp_path / "x",
                    labels_path(root, "pretrain"), evaluate_after=False)


def test_a_stage_resumes_only_its_own_run(root, tmp_path, monkeypatch):
    """Same settings and labels: the finished checkpoint is resumed. Other settings or other labels:
    the stale checkpoints are deleted and the stage trains from step 0 in a new MLflow run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_root = tmp_path / "dr"
    data_root.symlink_to(root, target_is_directory=True)
    out = tmp_path / "models" / "stage"
    labels = labels_path(root, "pretrain")

    def run(cfg, label_file=labels):
        result = train_stage(cfg, data_root, out, label_file, None, None, evaluate_after=False)
        state = latest_checkpoint(out).state
        steps = sorted(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*"))
        return result.mlflow_run_id, state["fingerprint"], steps

    first_run, first_fp, _ = run(_cfg(max_steps=4, checkpoint_every=3))
    assert len(first_fp) == 16
    # checkpointing / logging settings are bookkeeping: the finished run is resumed
    assert run(_cfg(max_steps=4, checkpoint_every=2, log_every=1))[:2] == (first_run, first_fp)
    # another learning rate is another run; a checkpoint of step 4 must not survive beside step 3
    lr_run, lr_fp, steps = run(_cfg(max_steps=4, checkpoint_every=3, lr=5e-3))
    assert lr_run != first_run and lr_fp != first_fp and steps == [3, 4]
    # the same settings on other labels (one image relabelled) are another run as well
    table = pd.read_parquet(labels)
    table.at[0, "parse_label_ids"] = [5]
    other = tmp_path / "other_labels.parquet"
    table.to_parquet(other)
    other_run, other_fp, _ = run(_cfg(max_steps=4, checkpoint_every=3, lr=5e-3), other)
    assert other_run != lr_run and other_fp not in (first_fp, lr_fp)
    history = latest_checkpoint(out).state["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
