"""Checkpoints under faults: hostile pickles are refused, corrupt checkpoints fall back."""

from __future__ import annotations

import logging

import pytest
import torch

from _train_helpers import labelled_root, write_code_pickle
from ramflow_io.formats import labels_path
from ram_model.checkpoint import FORMAT, LEGACY_STATE_FORMAT, load_state_dict, read_checkpoint
from ram_model.registry import load_model
from ram_model.backends import UnsafeCheckpointError
from ram_model.train_stage import RESULT_FILE, TrainStageConfig, train_stage
from ram_model.trainer import TRAINER_STATE, latest_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return labelled_root(tmp_path_factory.mktemp("data"), [16, 16])


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _cfg(**kw) -> TrainStageConfig:
    base = dict(model="_train_helpers:tiny_tagger", batch_size=8, micro_batch_size=4, max_steps=4,
                checkpoint_every=2, warmup_steps=1, lr=1e-2, num_workers=0, validation_fraction=0.0, seed=0)
    base.update(kw)
    return TrainStageConfig(**base)


@pytest.mark.parametrize("fmt", [FORMAT, LEGACY_STATE_FORMAT, None])
def test_init_from_refuses_a_pickle_that_runs_code(root, tmp_path, fmt):
    """The format and the older custom-model files alike are read weights-only."""
    marker = tmp_path / "marker"
    init = tmp_path / "init"
    path = write_code_pickle(init / "model.pt", marker, **({"format": fmt} if fmt else {"factory": "x:y"}))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["builtins.exec"]
    with pytest.raises(UnsafeCheckpointError, match="refused to load.*GLOBAL exec"):
        train_stage(_cfg(), root, tmp_path / "out", labels_path(root, "pretrain"), init_from=init,
                    evaluate_after=False)
    assert not marker.exists()


@pytest.mark.parametrize("reader", [load_model, load_state_dict, read_checkpoint])
def test_model_readers_refuse_a_pickle_that_runs_code(tmp_path, reader):
    marker = tmp_path / "marker"
    path = write_code_pickle(tmp_path / "m" / "model.pt", marker, format=FORMAT)
    with pytest.raises(UnsafeCheckpointError):
        reader(path.parent)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate_trainer_state", "truncate_backend_state", "pickle_rng_state"])
def test_a_stage_with_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(root, tmp_path, caplog, damage):
    """Train 4 steps (checkpoints 2 and 4), damage step 4 and drop the result so the stage is
    not up to date: the rerun warns, resumes step 2 in the same MLflow run and ends with the
    same weights as the uninterrupted run."""
    labels = labels_path(root, "pretrain")
    out = tmp_path / "stage"
    first = train_stage(_cfg(), root, out, labels, evaluate_after=False)
    weights = load_state_dict(first.checkpoint)
    (out / RESULT_FILE).unlink()
    step4 = out / "checkpoints" / "step_00000004"
    marker = tmp_path / "marker"
    if damage == "truncate_trainer_state":
        (step4 / TRAINER_STATE).write_text((step4 / TRAINER_STATE).read_text()[:40])
    elif damage == "truncate_backend_state":
        data = (step4 / "torch_backend.pt").read_bytes()
        (step4 / "torch_backend.pt").write_bytes(data[: len(data) // 2])
    else:
        write_code_pickle(step4 / "rng_rank0.pt", marker)
    with caplog.at_level(logging.INFO, logger="ram_model.trainer"):
        again = train_stage(_cfg(), root, out, labels, evaluate_after=False)
    assert any("step_00000004" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert any(r.getMessage().startswith("resumed from") and "step_00000002" in r.getMessage()
               for r in caplog.records)
    assert again.mlflow_run_id == first.mlflow_run_id and not again.reused
    assert latest_checkpoint(out).state["step"] == 4
    assert [h["step"] for h in latest_checkpoint(out).state["history"]] == [1, 2, 3, 4]
    assert again.metrics["final_loss"] == pytest.approx(first.metrics["final_loss"], abs=1e-6)
    for k, v in load_state_dict(again.checkpoint).items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-6)
    assert not marker.exists()


def test_every_torch_load_in_the_project_is_weights_only():
    """No call of torch.load without ``weights_only=True`` in the project's packages."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for package in ("ram_model", "data_engine", "orchestration", "bench"):
        for path in sorted((repo / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                func = getattr(node, "func", None)
                if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load"
                        and isinstance(func.value, ast.Name) and func.value.id == "torch"):
                    continue
                value = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert offenders == []
