"""The training loop shared by every stage and both engines.

:class:`Trainer` drives an :class:`~ram_model.engines.Engine` with micro-batches from a
:class:`~ram_model.data.TrainLoader`: one optimizer step = ``batch_size`` samples =
``micro_batch_size x grad_accum x world_size``. It checkpoints every ``checkpoint_every``
steps (engine state + loop position + every RNG) and resumes from the latest checkpoint so a
killed run continues with the same batches and the same losses. Each checkpoint carries the
run's fingerprint (:func:`run_fingerprint`): one written by a run with other settings, labels
or initial weights is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from ram_model.data import TrainLoader, is_validation_key
from ram_model.engines import DistInfo, EngineSettings, build_engine, dist_info_from_env
from ram_model.tracking import RunTracker

log = logging.getLogger(__name__)

LATEST = "latest.json"
TRAINER_STATE = "trainer_state.json"
# Settings that change how a run is logged, checkpointed or scored, not what it trains: a killed
# run may resume with other values. ``init_from`` is covered by hashing the weights themselves.
BOOKKEEPING_FIELDS = frozenset({
    "checkpoint_every", "keep_checkpoints", "log_every", "resume", "num_workers", "init_from",
    "calibration_min_positives", "eval_split", "eval_batch_size", "eval_max_samples", "experiment",
    "tracking_uri",
})


class CleanMixConfig(BaseModel):
    """A small split with complete labels, mixed into a noisy-caption stage's training data.

    Captions leave tags out (here most colours), and a tagger trained on them alone learns to
    score those tags low; a few hundred completely labelled images, repeated and shuffled in,
    teach the missing tags from the start of training. Keys ``is_validation_key(key,
    holdout)`` are never read: the engine calibrates its thresholds on them, so they must be
    the images no model of the pipeline trained on (``holdout`` = ``engine.adapt_holdout``).
    """

    split: str = "finetune"                       # raw/{split}/ shards and labels/{split}.parquet
    repeat: int = Field(8, ge=1)                  # listings of the split per epoch
    holdout: float = Field(0.5, ge=0.0, lt=1.0)   # fraction of its keys reserved (never trained on)

    def trains_on(self, key: str) -> bool:
        """True for a key of ``split`` that training reads (the one rule the engine also applies)."""
        return not is_validation_key(key, self.holdout)


class TrainStageConfig(BaseModel):
    """One training stage (``preliminary_model:`` / ``retrained_model:`` / ``refined_model:`` /
    ``finetuned_model:``)."""

    model: str = "ram_tiny"                       # registry name, or "pkg.module:factory"
    model_overrides: dict[str, Any] = {}          # passed to create_model(name, **overrides)
    loss_weights: dict[str, float] = {}           # passthrough: create_model(..., loss_weights=...)
    caption: bool = True                          # caption branch on/off (no caption tokens when off)
    caption_max_len: int | None = None            # None: the model config's max_caption_len (else 40)
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = Field(2, ge=0, le=2)
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 only takes effect on CUDA
    splits: list[str] = ["pretrain"]              # raw/{split}/ shards to train on
    clean_mix: CleanMixConfig | None = None       # a completely labelled split mixed in (None: off)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = None                  # cap on optimizer steps (None: epochs decide)
    batch_size: int = Field(32, ge=1)             # global samples per optimizer step
    micro_batch_size: int = Field(16, ge=1)       # samples per process per forward
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 0.0                        # global-norm clip (0 = off; 1.0 cut ram_effnet_lite0's
                                                  # 2-epoch test mAP from 0.64 to 0.35 on the embedded corpus)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = 256
    seed: int = 0
    random_crop: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    log_every: int = 10
    resume: bool = True                           # continue from out_dir/checkpoints/latest
    init_from: str | None = None                  # checkpoint / model dir used when the caller passes none
    validation_fraction: float = 0.05             # held-out keys for threshold calibration
    calibration_min_positives: int = Field(5, ge=1)  # fewer validation positives: keep the class's threshold
    # noisy captions miss tags: leave this fraction of each batch's negative labels with the largest
    # tag loss out (LL-R, see ram_model.losses.large_loss_mask), from `reject_start` of training on
    missing_label_rejection: float = Field(0.0, ge=0.0, lt=1.0)
    reject_start: float = Field(0.33, ge=0.0, le=1.0)
    eval_split: str = "test"
    eval_batch_size: int = 64
    eval_max_samples: int | None = None
    experiment: str = "ramflow"
    tracking_uri: str | None = None


@dataclass
class TrainState:
    """Loop position saved in every checkpoint."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0       # micro-batches of `epoch` already consumed (per rank)
    samples: int = 0              # global samples consumed
    train_seconds: float = 0.0
    mlflow_run_id: str = ""
    fingerprint: str = ""         # run_fingerprint() of the run that wrote it ("" before fingerprints)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainSummary:
    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    final_loss: float
    history: list[dict[str, float]]
    stopped_early: bool


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def grad_accum_steps(cfg: TrainStageConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x world_size = {per_step}")
    return cfg.batch_size // per_step


def latest_checkpoint(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(checkpoint dir, its trainer state)`` of the last complete checkpoint, or None (also when
    the main process is deleting stale checkpoints while another rank looks)."""
    pointer = out_dir / "checkpoints" / LATEST
    try:
        ckpt = out_dir / "checkpoints" / json.loads(pointer.read_text())["dir"]
        return ckpt, json.loads((ckpt / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return None


def run_fingerprint(cfg: TrainStageConfig, inputs: Sequence[Path], **context: Any) -> str:
    """Short sha256 of what decides a run's trajectory, so a checkpoint resumes only its own run.

    It covers ``cfg`` without :data:`BOOKKEEPING_FIELDS`, the bytes of every file in ``inputs``
    (label tables, the initial model's folder or file; sub-folders such as its checkpoints are
    skipped) and ``context`` (e.g. the tag names and the world size). Without it a stage re-run
    after a change of ``params.yaml`` or of its input labels would continue, or simply return,
    the finished checkpoint of the previous run.
    """
    h = hashlib.sha256()
    spec = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in BOOKKEEPING_FIELDS}
    h.update(json.dumps({"cfg": spec, "context": context}, sort_keys=True, default=str).encode())
    for path in map(Path, inputs):
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


class Trainer:
    """Train ``model`` with ``loader`` through the engine named in ``cfg``."""

    def __init__(self, model: nn.Module, loader: TrainLoader, cfg: TrainStageConfig, out_dir: Path,
                 tracker: RunTracker | None = None, dist: DistInfo | None = None) -> None:
        self.cfg, self.loader, self.out_dir = cfg, loader, Path(out_dir)
        self.dist = dist or dist_info_from_env()
        self.tracker = tracker
        self.accum = grad_accum_steps(cfg, self.dist.world_size)
        if loader.micro_batch_size != cfg.micro_batch_size:
            raise ValueError("loader and config disagree on micro_batch_size")
        steps_per_epoch = loader.steps_per_epoch(0) // self.accum
        if steps_per_epoch == 0:
            raise ValueError(f"{loader.counts['train_samples']} samples give no full step of {cfg.batch_size}")
        # max_steps, when set, replaces the epoch count (the loader wraps into further epochs)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        self.settings = EngineSettings(
            lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
            total_steps=self.total_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
            micro_batch_size=cfg.micro_batch_size, grad_accum_steps=self.accum,
            zero_stage=cfg.zero_stage, precision=cfg.precision,
        )
        self.engine = build_engine(cfg.engine, model, self.settings, self.dist)
        self.state = TrainState(mlflow_run_id=tracker.run_id if tracker else "")
        model_cfg = getattr(model, "config", None)
        self.caption_max_len = cfg.caption_max_len or int(getattr(model_cfg, "max_caption_len", 40))

    # ------------------------------------------------------------------ batches
    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Loader batch -> model batch (adds caption tokens and the rejection rate; drops keys/captions)."""
        out = {k: batch[k] for k in ("image", "tag_targets", "parse_targets")}
        if self.cfg.missing_label_rejection > 0 and self.state.step >= self.cfg.reject_start * self.total_steps:
            out["reject_negatives"] = self.cfg.missing_label_rejection
            if "complete_labels" in batch:
                out["complete_labels"] = batch["complete_labels"]  # [B] bool: these rows keep every negative
        tokenizer = getattr(self.engine.module, "tokenizer", None)
        if self.cfg.caption and tokenizer is not None:
            ids, mask = tokenizer.encode(batch["captions"], self.caption_max_len)
            out["caption_ids"], out["caption_mask"] = ids, mask  # [B,L] each
        return out

    def _steps_in_epoch(self, epoch: int) -> int:
        return self.loader.steps_per_epoch(epoch) // self.accum

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        root = self.out_dir / "checkpoints"
        ckpt = root / f"step_{self.state.step:08d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        self.engine.save(ckpt)
        torch.save(rng_state(), ckpt / f"rng_rank{self.dist.rank}.pt")
        self.engine.barrier()
        if self.dist.is_main:
            (ckpt / TRAINER_STATE).write_text(json.dumps(self.state.__dict__), encoding="utf-8")
            tmp = root / (LATEST + ".tmp")
            tmp.write_text(json.dumps({"dir": ckpt.name, "step": self.state.step}), encoding="utf-8")
            tmp.replace(root / LATEST)  # the pointer moves only once the checkpoint is complete
            old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != ckpt)
            for p in old[: max(0, len(old) - (self.cfg.keep_checkpoints - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        self.engine.barrier()
        log.info("checkpoint step %d -> %s", self.state.step, ckpt)
        return ckpt

    def resume(self) -> bool:
        """Load the latest checkpoint in ``out_dir`` (if any); True when resumed."""
        found = latest_checkpoint(self.out_dir)
        if found is None:
            return False
        ckpt, state = found
        self.engine.load(ckpt)
        self.state = TrainState(**state)
        rng_file = ckpt / f"rng_rank{self.dist.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("resumed from %s (step %d, epoch %d, micro-batch %d)", ckpt, self.state.step,
                 self.state.epoch, self.state.micro_in_epoch)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, until_step: int | None = None) -> TrainSummary:
        """Train to ``total_steps`` (or stop after ``until_step``: a planned interruption)."""
        stop_at = self.total_steps if until_step is None else min(until_step, self.total_steps)
        st = self.state
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=st.step, desc=f"train[{self.cfg.engine}]",
                   disable=not self.dist.is_main, unit="step")
        t_last = time.perf_counter()
        while st.step < stop_at:
            steps_here = self._steps_in_epoch(st.epoch)
            if st.micro_in_epoch >= steps_here * self.accum:
                st.epoch, st.micro_in_epoch = st.epoch + 1, 0
                continue
            batches = self.loader.iter_epoch(st.epoch, skip=st.micro_in_epoch)
            group: list[dict[str, Any]] = []
            for batch in batches:
                group.append(self._prepare(batch))
                if len(group) < self.accum:
                    continue
                stats = self.engine.train_step(group)
                group = []
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                st.step += 1
                st.micro_in_epoch += self.accum
                st.samples += self.cfg.batch_size
                st.train_seconds += dt
                record = {"step": st.step, **stats, "samples_per_s": self.cfg.batch_size / max(dt, 1e-9)}
                st.history.append(record)
                bar.update(1)
                if self.dist.is_main:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                if self.tracker is not None:
                    self.tracker.log_metrics({f"train/{k}": v for k, v in record.items() if k != "step"},
                                             step=st.step, flush=st.step % self.cfg.log_every == 0)
                last_in_epoch = st.micro_in_epoch >= steps_here * self.accum
                if st.step % self.cfg.checkpoint_every == 0 or st.step == self.total_steps:
                    self.save_checkpoint()
                if st.step >= stop_at or last_in_epoch:
                    break
            else:
                raise RuntimeError(f"epoch {st.epoch} ended after {st.micro_in_epoch} micro-batches, "
                                   f"planned {steps_here * self.accum}: shards changed during training?")
            del batches  # shuts the epoch's DataLoader workers down
        bar.close()
        if self.tracker is not None:
            self.tracker.flush()
        rate = st.samples / st.train_seconds if st.train_seconds else 0.0
        return TrainSummary(st.step, st.samples, st.train_seconds, rate,
                            st.history[-1]["loss"] if st.history else float("nan"), st.history,
                            stopped_early=st.step < self.total_steps)
