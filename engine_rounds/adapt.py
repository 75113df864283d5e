"""Adapt the engine's tagger to the clean split before it labels the noisy one.

The preliminary model learned from parsed captions, which leave out most colours and about
40% of the objects, so it ranks those tags poorly. A few epochs on complete, correct labels
(RAM's small high-quality set, our ``finetune`` split) fix much of that ranking. The engine
needs the same clean split to calibrate its thresholds, so the split is cut in two by a
stable hash of the key (:func:`ram_model.data.is_validation_key`):

* the ``1 - holdout`` part fine-tunes the preliminary model, through the project's trainer
  (:func:`ram_model.train_stage.train_stage`, plain torch engine), with the preliminary
  stage's own recipe except split, epochs, learning rate and hold-out;
* the ``holdout`` part is what the trainer holds out for its threshold calibration, and the
  only part the engine calibrates generation and keep thresholds on: images the adapted model
  never trained on.

The adapted model is written next to the engine's labels (``engine/engine_model``), with its
MLflow run, so the labels it produced can be traced to it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ram_model.data import is_validation_key
from ram_model.train_stage import CONFIG_FILE, saved_train_config, train_stage
from ram_model.trainer import TrainStageConfig
from ramflow_io.formats import labels_path

log = logging.getLogger(__name__)


def adapt_config(base: Mapping[str, Any], split: str, epochs: int, lr: float, holdout: float) -> dict[str, Any]:
    """The preliminary stage's training config, switched to a short fine-tune on ``split``.

    The clean split's labels are complete, so nothing is rejected as a missing label there,
    and nothing else is mixed in.
    """
    warmup = min(int(base.get("warmup_steps", 0) or 0), 5)
    return {**base, "splits": [split], "epochs": epochs, "max_steps": None, "lr": lr, "warmup_steps": warmup,
            "validation_fraction": holdout, "resume": False, "init_from": None, "backend": "torch",
            "missing_label_rejection": 0.0, "clean_mix": None}


def adapt_model(model_dir: Path, data_root: Path, split: str, epochs: int, lr: float, holdout: float,
                out_dir: Path, tracking: Mapping[str, Any] | None = None) -> Path:
    """Fine-tune the model in ``model_dir`` on ``split`` minus its held-out keys; returns ``out_dir``.

    ``tracking``: ``tracking_uri`` / ``experiment`` for the training config and ``parent_run_id``
    for its MLflow run (the orchestrator nests it under the pipeline run, like every stage).
    """
    tracking = dict(tracking or {})
    parent = tracking.pop("parent_run_id", None)

    config_file = Path(model_dir) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} missing: adaptation reuses the preliminary model's recipe")
    base = saved_train_config(model_dir)
    cfg = TrainStageConfig(**{**adapt_config(base, split, epochs, lr, holdout), **tracking})
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh fine-tune, never a resumed one
    log.info("adapting %s: %d epochs on %s (%.0f%% held out for calibration), lr %g",
             model_dir, epochs, split, 100 * holdout, lr)
    result = train_stage(cfg, data_root, out_dir, labels_path(data_root, split), init_from=Path(model_dir),
                         parent_run_id=parent)
    log.info("adapted on %s: test mAP %s", split, result.metrics.get("test/mAP"))
    return Path(out_dir)


def mixed_in(model_dir: Path, split: str, keys) -> set[str]:
    """The keys of ``split`` that the model in ``model_dir`` was trained on through its ``clean_mix``.

    The engine must not calibrate on them; with the pipeline's params they are the same keys the
    adaptation trains on (``clean_mix.holdout`` = ``adapt_holdout``), and this makes sure of it.
    """
    config_file = Path(model_dir) / CONFIG_FILE
    if not config_file.exists():
        return set()
    mix = TrainStageConfig.model_validate(saved_train_config(model_dir)).clean_mix
    return {k for k in keys if mix.trains_on(k)} if mix is not None and mix.split == split else set()


def trained_on(keys, holdout: float) -> set[str]:
    """The keys the adaptation trained on (not held out; the trainer's own hash)."""
    return {k for k in keys if not is_validation_key(k, holdout)}
