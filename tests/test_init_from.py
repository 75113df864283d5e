"""``init_from`` in a training section: a relative model path is below the data root, so the
shipped params warm-start ``retrained_model`` / ``refined_model`` from the stage before them
whatever ``paths.data_root`` is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _train_helpers import labelled_root
from ramflow_io.formats import labels_path
from ram_model.train_stage import config_init, train_stage
from ram_model.trainer import TrainStageConfig


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ("", None),
    ("models/preliminary_model", "root/models/preliminary_model"),
    ("models/preliminary_model/model.pt", "root/models/preliminary_model/model.pt"),
])
def test_relative_init_from_is_below_the_data_root(tmp_path, value, expected):
    model_dir = tmp_path / "root" / "models" / "preliminary_model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.pt").write_bytes(b"weights")
    got = config_init(TrainStageConfig(init_from=value), tmp_path / "root")
    assert got == (None if expected is None else tmp_path / expected)


def test_absolute_init_from_is_used_as_is(tmp_path):
    model_dir = tmp_path / "elsewhere" / "model"
    model_dir.mkdir(parents=True)
    assert config_init(TrainStageConfig(init_from=str(model_dir)), tmp_path / "root") == model_dir


@pytest.mark.parametrize("value", ["models/retrained_model", "/nonexistent/ramflow/model"])
def test_a_missing_init_model_is_an_error_not_a_start_from_scratch(tmp_path, value):
    with pytest.raises(FileNotFoundError, match="init_from"):
        config_init(TrainStageConfig(init_from=value), tmp_path)


def test_shipped_params_chain_the_training_stages():
    """retrained_model starts from the preliminary model, refined_model from the retrained one."""
    from ramflow_io.params import stage_config

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    chain = {s: stage_config(TrainStageConfig, s, params).init_from for s in ("retrained_model", "refined_model")}
    assert chain == {"retrained_model": "models/preliminary_model", "refined_model": "models/retrained_model"}


def test_a_stage_with_a_relative_init_from_starts_from_that_model(tmp_path, monkeypatch):
    """A tiny first stage, then a second one with ``init_from: models/first``: its loss at step 1
    is the first stage's end loss, not a fresh model's, and the fingerprint covers those weights."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = labelled_root(tmp_path / "data", [24, 24])
    base = dict(model="_train_helpers:tiny_tagger", batch_size=8, micro_batch_size=4, checkpoint_every=50,
                warmup_steps=1, lr=1e-2, num_workers=0, validation_fraction=0.0, seed=0)
    labels = labels_path(root, "pretrain")
    first = train_stage(TrainStageConfig(**base, max_steps=20), root, root / "models" / "first", labels,
                        evaluate_after=False)
    warm = train_stage(TrainStageConfig(**base, max_steps=2, init_from="models/first"), root,
                       root / "models" / "warm", labels, evaluate_after=False)
    cold = train_stage(TrainStageConfig(**base, max_steps=2), root, root / "models" / "cold", labels,
                       evaluate_after=False)
    assert first.metrics["steps"] == 20 and warm.metrics["steps"] == cold.metrics["steps"] == 2
    history = {name: json.loads((root / "models" / name / "history.json").read_text())
               for name in ("first", "warm", "cold")}
    first_loss, warm_loss, cold_loss = (history[n][0]["loss"] for n in ("first", "warm", "cold"))
    assert warm_loss < cold_loss and abs(cold_loss - first_loss) < 1e-6  # same seed, same first batch
