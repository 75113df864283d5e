"""The training stage orchestration calls: preliminary, retrained and fine-tuned models.

:func:`train_stage` runs in the current process (or in each torchrun worker);
:func:`launch_train_stage` starts ``nproc`` workers with
``python -m torch.distributed.run --nproc_per_node N -m ram_model.train_stage`` and returns the
rank-0 result. After training, rank 0 exports the model, calibrates per-class thresholds on
the held-out validation slice and evaluates the test split with :mod:`ram_model.evaluate`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ram_model import checkpoint as ckpt_io, evaluate
from ram_model.backends import UnsafeCheckpointError, dist_info_from_env, ensure_torch_extensions_dir, free_port
from ram_model.checkpoint import file_sha256, read_checkpoint
from ram_model.data import (AugmentConfig, ShardInfo, TrainLoader, index_shards, is_validation_key,
                            iter_eval_batches, load_label_table, multi_hot)
from ram_model.query_sampling import observed_tags
from ram_model.registry import create_model, get_config
from ram_model.tokenizer import WordTokenizer, tokenizer_from_state
from ram_model.tracking import RunTracker, plot_loss_curves, run_is_finished
from ram_model.trainer import Trainer, TrainStageConfig, latest_checkpoint, run_fingerprint, seed_everything
from ramflow_io.formats import label_names, label_system_dir, labels_path, list_shards
from ramflow_io.shards import iter_samples

log = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
CONFIG_FILE = "train_config.json"  # the stage config as run (what a later fine-tune reuses)
LOSS_PLOT = "loss_curve.png"

__all__ = ["TrainResult", "TrainStageConfig", "launch_train_stage", "train_stage"]


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str = ""
    reused: bool = False   # the stage was up to date: its stored result, nothing trained or logged

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "metrics": self.metrics, "mlflow_run_id": self.mlflow_run_id,
                "reused": self.reused}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        return cls(Path(data["checkpoint"]), data.get("metrics", {}), data.get("mlflow_run_id", ""),
                   bool(data.get("reused", False)))


# --------------------------------------------------------------------------- model

def _factory(name: str):
    """``"pkg.module:callable"`` (custom / test models) or the registry's ``create_model``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        return lambda tag_names, **kw: fn(tag_names=tag_names, **kw)

    return lambda tag_names, **kw: create_model(name, tag_names=tag_names, **kw)


def model_overrides(cfg: TrainStageConfig) -> dict[str, Any]:
    """``create_model`` keyword overrides: caption on/off and ``{tag: w}`` -> ``tag_loss_weight=w``."""
    out: dict[str, Any] = {}
    if ":" not in cfg.model:
        out["caption"] = cfg.caption
        out.update({f"{k}_loss_weight": v for k, v in cfg.loss_weights.items()})
    out.update(cfg.model_overrides)
    return out


def caption_tokenizer(cfg: TrainStageConfig, data_root: Path, init_from: Path | None):
    """The caption vocabulary of a ``"word"``-tokenizer model, or None for a fixed vocabulary.

    A fitted vocabulary must follow the weights: with ``init_from`` it is the one saved in that
    checkpoint (finetuning keeps the retrained model's word ids); from scratch it is fitted on
    the captions of the training splits (deterministic: frequency, then first occurrence).
    """
    if ":" in cfg.model:
        return None

    config = get_config(cfg.model, **{k: v for k, v in cfg.model_overrides.items()})
    if config.tokenizer != "word":
        return None
    if init_from is not None:
        try:
            state = read_checkpoint(init_from).get("tokenizer")
        except UnsafeCheckpointError:
            raise
        except (FileNotFoundError, ValueError):
            state = None
        if state:
            return tokenizer_from_state(state)

    splits = cfg.splits + ([cfg.clean_mix.split] if cfg.clean_mix else [])
    shards = [p for split in splits for p in list_shards(data_root, split)]
    captions = [s.caption for s in iter_samples(shards, decode=False) if s.caption]
    tok = WordTokenizer(config.word_vocab_size).fit(captions)
    log.info("caption vocabulary fitted on %d captions: %d words (capacity %d)",
             len(captions), len(tok.words), config.word_vocab_size)
    return tok


def build_model(cfg: TrainStageConfig, tag_names: list[str], init_from: Path | None,
                data_root: Path | None = None) -> torch.nn.Module:
    """Seeded model with tag queries for ``tag_names``; weights from ``init_from`` when given."""
    seed_everything(cfg.seed)
    overrides = model_overrides(cfg)
    tokenizer = caption_tokenizer(cfg, data_root, init_from) if data_root is not None else None
    if tokenizer is not None:
        overrides["caption_tokenizer"] = tokenizer
    model = _factory(cfg.model)(tag_names, **overrides)
    if init_from is not None:
        load_weights(model, init_from)
    return model


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Initialise from a trained model folder / file (tag queries stay those of ``model``).

    The weights come through the one model-file reader (:func:`ram_model.checkpoint.load_state_dict`),
    which reads tensors and primitives only (``weights_only=True``): a file that pickles anything
    else is refused before it runs."""
    path = Path(path)
    state = ckpt_io.load_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    kept = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info("initialised from %s: %d tensors loaded, %d kept from init%s", path, len(usable), len(kept),
             f" (e.g. {kept[:3]})" if kept else "")


def export_model(model: torch.nn.Module, cfg: TrainStageConfig, out_dir: Path, thresholds: list[float] | None) -> Path:
    """Write the trained model where serving / evaluation / the next stage read it.

    One format for every model (:mod:`ram_model.checkpoint`); a custom ``module:factory`` model
    (tests, experiments) records its factory and keyword arguments instead of a registry config.
    """
    if ":" in cfg.model:
        return ckpt_io.save_model(model, out_dir, thresholds=thresholds, factory=cfg.model,
                                  factory_kwargs=model_overrides(cfg))
    return ckpt_io.save_model(model, out_dir, thresholds=thresholds)


# --------------------------------------------------------------------------- evaluation

def _current_thresholds(model: torch.nn.Module, num_classes: int) -> np.ndarray:
    """The thresholds a class keeps when the validation slice cannot calibrate it: the model's own
    (inherited from the initial checkpoint in a fine-tune), else the config's default."""
    current = getattr(model, "thresholds", None)
    if isinstance(current, torch.Tensor) and current.numel() == num_classes:
        return current.detach().float().cpu().numpy()
    return np.full(num_classes, float(getattr(getattr(model, "config", None), "default_threshold", 0.5)))


def calibrate_and_evaluate(model: torch.nn.Module, cfg: TrainStageConfig, data_root: Path,
                           loader: TrainLoader) -> tuple[list[float] | None, dict[str, float]]:
    """Per-class thresholds on the held-out validation slice, then test-split metrics (rank 0).

    The validation targets are the stage's own training labels of the held-out keys (training
    never reads ``truth``); the test split is scored against ``truth`` by :mod:`ram_model.evaluate`.
    Models without ``tag_logits`` (custom test models) are not evaluated.
    """
    if not hasattr(model, "tag_logits"):
        log.warning("model %s has no tag_logits: skipping calibration and evaluation", cfg.model)
        return None, {}

    device = next(model.parameters()).device
    val_keys = loader.validation_keys()
    thresholds, metrics = None, {}
    if val_keys:
        scores, keys = [], []
        with torch.no_grad():
            for batch in iter_eval_batches(loader.unique_shards(), val_keys, loader.aug, cfg.eval_batch_size):
                scores.append(torch.sigmoid(model.tag_logits(batch["image"].to(device))).float().cpu().numpy())
                keys.extend(batch["keys"])
        s = np.concatenate(scores)
        t = multi_hot([loader.labels.tags[k] for k in keys], loader.labels.num_classes).numpy()
        thr = evaluate.calibrate_thresholds(s, t, default=_current_thresholds(model, t.shape[1]),
                                            min_positives=cfg.calibration_min_positives)
        thresholds = [float(x) for x in thr]
        val = evaluate.evaluate_scores(s, t, thr)
        metrics.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
    if list_shards(data_root, cfg.eval_split):
        # "trained": tags with a positive in this stage's training labels; "untrained": the rest,
        # which the model can only score through their text embedding (open set).
        seen = {int(i) for s in loader.unique_shards() for k in s.keys if loader.trainable(k)
                for i in loader.labels.tags[k]}
        subsets = {"trained": sorted(seen),
                   "untrained": sorted(set(range(loader.labels.num_classes)) - seen)}
        test = evaluate.evaluate_split(model, data_root, cfg.eval_split, thresholds=thresholds,
                                       batch_size=cfg.eval_batch_size, max_samples=cfg.eval_max_samples,
                                       device=str(device), subsets=subsets)
        metrics.update({f"{cfg.eval_split}/{k}": v for k, v in test.items() if isinstance(v, (int, float))})
    return thresholds, metrics


# --------------------------------------------------------------------------- stage

def _clean_mix_inputs(cfg: TrainStageConfig, data_root: Path) -> tuple[list[ShardInfo], Path]:
    """Shards and labels file of ``cfg.clean_mix.split`` (checked: present, not a noisy split too)."""
    split = cfg.clean_mix.split
    if split in cfg.splits:
        raise ValueError(f"clean_mix.split {split!r} is also in splits {cfg.splits}: its labels would count twice")
    paths = list_shards(data_root, split)
    labels = labels_path(data_root, split)
    if not paths or not labels.exists():
        raise FileNotFoundError(f"clean_mix needs the {split!r} split's shards and {labels}: ingest and label it")
    return index_shards(paths), labels


def _clean_mix_labels(cfg: TrainStageConfig, data_root: Path) -> list[Path]:
    return [labels_path(data_root, cfg.clean_mix.split)] if cfg.clean_mix is not None else []


def stage_fingerprint(cfg: TrainStageConfig, data_root: Path, label_files: Sequence[Path], init: Path | None,
                      names: Sequence[str], world_size: int, evaluate_after: bool) -> str:
    """Short sha256 of everything a finished stage's model, metrics and MLflow run follow from.

    The run's :func:`run_fingerprint` (settings, label files, initial weights, tags, world size)
    plus what scoring and logging read: the evaluation settings, the MLflow experiment and store,
    and the bytes of every shard of the training, clean-mix and evaluation splits. Equal
    fingerprints: the stage's stored result is reused instead of training and logging again.
    """
    run_fp = run_fingerprint(cfg, [*label_files, *([init] if init else [])], tags=list(names),
                             world_size=world_size)
    splits = [*cfg.splits, *([cfg.clean_mix.split] if cfg.clean_mix else []),
              *([cfg.eval_split] if evaluate_after else [])]
    shards = sorted({p for split in dict.fromkeys(splits) for p in list_shards(data_root, split)})
    digests = []
    for shard in shards:
        with shard.open("rb") as fh:
            digests.append((f"{shard.parent.name}/{shard.name}", hashlib.file_digest(fh, "sha256").hexdigest()))
    spec = {"run": run_fp, "evaluate_after": evaluate_after, "shards": digests,
            "eval": {k: getattr(cfg, k) for k in ("calibration_min_positives", "eval_split", "eval_batch_size",
                                                  "eval_max_samples", "experiment", "tracking_uri")}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_result(out_dir: Path, fingerprint: str, data_root: Path, cfg: TrainStageConfig) -> TrainResult | None:
    """The stored result of ``out_dir`` when it was produced from the same inputs (``fingerprint``),
    its model file is the one it describes (sha256) and its MLflow run is finished; else None."""
    try:
        data = json.loads((Path(out_dir) / RESULT_FILE).read_text(encoding="utf-8"))
        stored_fp, stored_sha = data.get("fingerprint"), data.get("checkpoint_sha256")
        model_file = Path(out_dir) / Path(data["checkpoint"]).name
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if stored_fp != fingerprint or not stored_sha or not model_file.is_file() or file_sha256(model_file) != stored_sha:
        return None
    run_id = data.get("mlflow_run_id") or ""
    if run_id and not run_is_finished(data_root, run_id, cfg.tracking_uri):
        log.info("%s: MLflow run %s is not in the tracking store (or unfinished): training again", out_dir, run_id)
        return None
    result = TrainResult.from_json(data)
    result.checkpoint, result.reused = model_file, True
    return result


def _reuse(cfg: TrainStageConfig, out_dir: Path, fingerprint: str, data_root: Path) -> TrainResult | None:
    done = None if cfg.force else finished_result(out_dir, fingerprint, data_root, cfg)
    if done is not None:
        log.info("%s is up to date (inputs %s unchanged): reusing MLflow run %s; set force to retrain",
                 out_dir, fingerprint, done.mlflow_run_id)
    return done


def _stage_inputs(cfg: TrainStageConfig, data_root: Path, labels: Path | Sequence[Path],
                  init_from: Path | None) -> tuple[list[str], list[Path], Path | None]:
    """Tag names, label files (the stage's, then the clean-mix split's) and the initial model."""
    names = label_names(label_system_dir(data_root))
    label_files = [Path(labels)] if isinstance(labels, (str, Path)) else [Path(p) for p in labels]
    init = init_from if init_from is not None else config_init(cfg, data_root)
    return names, [*label_files, *_clean_mix_labels(cfg, data_root)], init


def config_init(cfg: TrainStageConfig, data_root: Path) -> Path | None:
    """The model ``cfg.init_from`` names: an absolute path as is, a relative one below ``data_root``
    (``models/preliminary_model``), so a params file warm-starts a stage from an upstream stage's
    model whatever its data root. A missing model is an error, never a silent start from scratch."""
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    path = path if path.is_absolute() else Path(data_root) / path
    if not path.exists():
        raise FileNotFoundError(f"init_from {cfg.init_from!r}: {path} does not exist (run the stage that writes it)")
    return path


def trained_tags(cfg: TrainStageConfig, loader: TrainLoader) -> torch.Tensor | None:
    """``[C]`` bool of the tags a step trains under ``train_tags: observed``: those that a label
    of a training image names (validation and reserved keys do not count); None for ``all``."""
    if cfg.train_tags == "all":
        return None
    table = loader.labels
    lists = [ids for key, ids in table.tags.items()
             if key not in loader.reserved_keys and not is_validation_key(key, loader.validation_fraction)]
    seen = observed_tags(lists, table.num_classes)
    log.info("train_tags: observed: %d of %d tags have a training label", int(seen.sum()), table.num_classes)
    return seen


def train_stage(cfg: TrainStageConfig, data_root: Path, out_dir: Path, labels: Path | Sequence[Path],
                init_from: Path | None = None, parent_run_id: str | None = None,
                evaluate_after: bool = True) -> TrainResult:
    """Train one stage into ``out_dir`` (resuming from its latest intact checkpoint when ``cfg.resume``).

    A stage that already finished on the same inputs and settings (:func:`stage_fingerprint`)
    returns its stored result (``reused``: no training, no new MLflow run); ``cfg.force`` trains
    again from step 0 in a new run.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    dist = dist_info_from_env()
    out_dir.mkdir(parents=True, exist_ok=True)
    names, label_files, init = _stage_inputs(cfg, data_root, labels, init_from)
    reserved: frozenset[str] = frozenset()
    complete: frozenset[str] = frozenset()
    clean_shards: list[ShardInfo] = []
    if cfg.clean_mix is not None:
        clean_shards, _ = _clean_mix_inputs(cfg, data_root)
        complete = frozenset(k for s in clean_shards for k in s.keys)
        reserved = frozenset(k for k in complete if not cfg.clean_mix.trains_on(k))
    done_fp = stage_fingerprint(cfg, data_root, label_files, init, names, dist.world_size, evaluate_after)
    done = _reuse(cfg, out_dir, done_fp, data_root)
    if done is not None:
        return done
    model = build_model(cfg, names, init, data_root)
    data_cfg = model.data_config
    aug = AugmentConfig(image_size=int(data_cfg["image_size"]), mean=tuple(data_cfg["mean"]),
                        std=tuple(data_cfg["std"]), random_crop=cfg.random_crop,
                        crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
    shard_paths = [p for split in cfg.splits for p in list_shards(data_root, split)]
    if not shard_paths:
        raise FileNotFoundError(f"no shards for splits {cfg.splits} under {data_root}/raw: run `ramflow ingest`")
    shards = index_shards(shard_paths) + clean_shards * (cfg.clean_mix.repeat if cfg.clean_mix else 0)
    loader = TrainLoader(
        shards, load_label_table(label_files, len(names)), cfg.micro_batch_size, aug,
        seed=cfg.seed, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, rank=dist.rank,
        world_size=dist.world_size, validation_fraction=cfg.validation_fraction,
        reserved_keys=reserved, complete_keys=complete,
    )
    fingerprint = run_fingerprint(cfg, [*label_files, *([init] if init else [])], tags=names,
                                  world_size=dist.world_size)
    resumed = latest_checkpoint(out_dir) if cfg.resume and not cfg.force else None
    if (resumed is not None and resumed.state.get("fingerprint") != fingerprint) or cfg.force:
        # every rank decides alike; only the main process deletes
        log.warning("%s: %s: training from the start", out_dir / "checkpoints",
                    "force is set" if cfg.force else
                    "checkpoints of another run (settings, labels or initial weights differ)")
        if dist.is_main:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        resumed = None
    tracker = RunTracker(data_root, out_dir.name, uri=cfg.tracking_uri, experiment=cfg.experiment,
                         parent_run_id=parent_run_id, rank=dist.rank,
                         run_id=resumed.state.get("mlflow_run_id") or None if resumed else None,
                         tags={"ramflow.stage": out_dir.name, "ramflow.backend": cfg.backend})
    trainable = trained_tags(cfg, loader)
    trainer = Trainer(model, loader, cfg, out_dir, tracker=tracker, dist=dist, trainable_tags=trainable)
    if resumed:
        trainer.resume(fingerprint)
        trainer.state.mlflow_run_id = tracker.run_id or trainer.state.mlflow_run_id
    trainer.state.fingerprint = fingerprint
    tracker.log_params({"stage": cfg.model_dump(mode="json"), "world_size": dist.world_size,
                        "grad_accum_steps": trainer.accum, "total_steps": trainer.total_steps,
                        "label_source": loader.labels.source_column, "num_classes": len(names),
                        "trained_classes": len(names) if trainable is None else int(trainable.sum()),
                        "init_from": str(init) if init else "scratch",
                        "data": dict(loader.counts)})
    try:
        summary = trainer.fit()
    except BaseException:
        tracker.finish("FAILED")
        raise
    metrics: dict[str, Any] = {
        "steps": summary.steps, "samples": summary.samples, "train_seconds": round(summary.seconds, 3),
        "samples_per_s": summary.samples_per_s, "final_loss": summary.final_loss,
        "world_size": dist.world_size, "backend": cfg.backend, **{f"data/{k}": v for k, v in loader.counts.items()},
    }
    checkpoint = out_dir
    if dist.is_main:
        module = trainer.backend.module.eval()
        thresholds = None
        if evaluate_after:
            thresholds, eval_metrics = calibrate_and_evaluate(module, cfg, data_root, loader)
            metrics.update(eval_metrics)
        checkpoint = export_model(module, cfg, out_dir, thresholds)
        _log_artifacts(tracker, out_dir, summary.history, cfg, names, thresholds, metrics, data_root)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=summary.steps)
        tracker.set_tags({"ramflow.inputs": done_fp})
        tracker.finish()
        result = TrainResult(checkpoint, metrics, tracker.run_id)
        _write_result(out_dir, result, done_fp)
    trainer.backend.barrier()
    if not dist.is_main:
        return TrainResult(checkpoint, metrics, "")
    return result


def saved_train_config(model_dir: Path) -> dict[str, Any]:
    """The stage config a model folder was trained with (``train_config.json``), as a dict.

    Models saved before the training key ``engine`` became ``backend`` still say ``engine``;
    it is read as ``backend`` so such a model can be fine-tuned or inspected as before.
    """
    config = json.loads((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    if "engine" in config and "backend" not in config:
        config["backend"] = config.pop("engine")
    return config


def _write_result(out_dir: Path, result: TrainResult, fingerprint: str) -> None:
    """``train_result.json`` with the input fingerprint and the model file's sha256 (atomic)."""
    data = {**result.to_json(), "fingerprint": fingerprint, "checkpoint_sha256": file_sha256(result.checkpoint)}
    tmp = out_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    tmp.replace(out_dir / RESULT_FILE)


def _log_artifacts(tracker: RunTracker, out_dir: Path, history, cfg: TrainStageConfig, names: list[str],
                   thresholds: list[float] | None, metrics: dict[str, Any], data_root: Path) -> None:
    plot = plot_loss_curves(history, out_dir / LOSS_PLOT) if history else None
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1), encoding="utf-8")
    (out_dir / "history.json").write_text(json.dumps(history), encoding="utf-8")
    if plot is not None:
        tracker.log_artifact(plot, "plots")
    tracker.log_artifact(out_dir / CONFIG_FILE, "config")
    tracker.log_artifact(out_dir / "history.json", "history")
    lsd = label_system_dir(data_root)
    for f in sorted(lsd.glob("*")) if lsd.exists() else []:
        tracker.log_artifact(f, "label_system")
    if thresholds is not None:
        tracker.log_dict(dict(zip(names, thresholds)), "thresholds.json", "thresholds")


# --------------------------------------------------------------------------- launcher

def launch_train_stage(cfg: TrainStageConfig, data_root: Path, out_dir: Path, labels: Path | Sequence[Path],
                       init_from: Path | None = None, parent_run_id: str | None = None, nproc: int = 2,
                       timeout_s: float = 3600, evaluate_after: bool = True,
                       extra_env: dict[str, str] | None = None) -> TrainResult:
    """Run :func:`train_stage` in ``nproc`` torchrun workers; return rank 0's result."""
    out_dir = Path(out_dir)
    names, label_files, init = _stage_inputs(cfg, Path(data_root), labels, init_from)
    done = _reuse(cfg, out_dir, stage_fingerprint(cfg, Path(data_root), label_files, init, names, nproc, evaluate_after),
                  Path(data_root))
    if done is not None:
        return done  # no workers started
    launch = out_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    request = {
        "cfg": cfg.model_dump(mode="json"), "data_root": str(Path(data_root).resolve()),
        "out_dir": str(out_dir.resolve()),
        "labels": [str(Path(p).resolve()) for p in ([labels] if isinstance(labels, (str, Path)) else labels)],
        "init_from": str(Path(init_from).resolve()) if init_from else None,
        "parent_run_id": parent_run_id, "evaluate_after": evaluate_after,
    }
    req, res = launch / "request.json", launch / "result.json"
    req.write_text(json.dumps(request, indent=1), encoding="utf-8")
    res.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ensure_torch_extensions_dir()))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd())] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "ram_model.train_stage", "--request", str(req), "--result", str(res)]
    log.info("launching %d workers: %s", nproc, " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=timeout_s)
    if proc.returncode != 0 or not res.exists():
        raise RuntimeError(f"training workers failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    result = TrainResult.from_json(json.loads(res.read_text(encoding="utf-8")))
    result.metrics["launch_seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one torchrun worker of a training stage")
    parser.add_argument("--request", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', 0)} %(levelname)s %(name)s: %(message)s")
    req = json.loads(args.request.read_text(encoding="utf-8"))
    result = train_stage(
        TrainStageConfig.model_validate(req["cfg"]), Path(req["data_root"]), Path(req["out_dir"]),
        [Path(p) for p in req["labels"]], Path(req["init_from"]) if req["init_from"] else None,
        req["parent_run_id"], evaluate_after=req.get("evaluate_after", True),
    )
    if dist_info_from_env().is_main:
        tmp = args.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json(), default=str), encoding="utf-8")
        tmp.replace(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
