"""The training loop shared by every stage and both training backends.

:class:`Trainer` drives an :class:`~ram_model.backends.Backend` with micro-batches from a
:class:`~ram_model.data.TrainLoader`: one optimizer step = ``batch_size`` samples =
``micro_batch_size x grad_accum x world_size``. It checkpoints every ``checkpoint_every``
steps (backend state + loop position + every RNG) and resumes from the latest checkpoint so a
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
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm import tqdm

from ram_model.backends import (CHECKPOINT_READ_ERRORS, BackendSettings, DistInfo, build_backend,
                                dist_info_from_env, load_tensors)
from ram_model.data import TrainLoader, is_validation_key
from ram_model.query_sampling import select_queries
from ram_model.tracking import RunTracker

log = logging.getLogger(__name__)

LATEST = "latest.json"
TRAINER_STATE = "trainer_state.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"        # a checkpoint being written (renamed to step_* once complete)
CORRUPT_PREFIX = "corrupt-"  # an unreadable checkpoint, set aside on resume
MIN_KEPT = 2                # checkpoints kept at least, so a corrupt latest has an intact predecessor
# Settings that change how a run is logged, checkpointed or scored, not what it trains: a killed
# run may resume with other values. ``init_from`` is covered by hashing the weights themselves.
BOOKKEEPING_FIELDS = frozenset({
    "checkpoint_every", "keep_checkpoints", "log_every", "resume", "num_workers", "init_from",
    "calibration_min_positives", "eval_split", "eval_batch_size", "eval_max_samples", "experiment",
    "tracking_uri", "force",
})


class CleanMixConfig(BaseModel):
    """A small split with complete labels, mixed into a noisy-caption stage's training data.

    Captions leave tags out (here most colours), and a tagger trained on them alone learns to
    score those tags low; a few hundred completely labelled images, repeated and shuffled in,
    teach the missing tags from the start of training. Keys ``is_validation_key(key,
    holdout)`` are never read: the engine calibrates its thresholds on them, so they must be
    the images no model of the pipeline trained on (``holdout`` = ``engine.adapt_holdout``).
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    split: str = "finetune"                       # raw/{split}/ shards and labels/{split}.parquet
    repeat: int = Field(8, ge=1)                  # listings of the split per epoch
    holdout: float = Field(0.5, ge=0.0, lt=1.0)   # fraction of its keys reserved (never trained on)

    def trains_on(self, key: str) -> bool:
        """True for a key of ``split`` that training reads (the one rule the engine also applies)."""
        return not is_validation_key(key, self.holdout)


class TrainStageConfig(BaseModel):
    """One training stage (``preliminary_model:`` / ``retrained_model:`` / ``refined_model:`` /
    ``finetuned_model:``).

    The defaults are params.yaml's ``preliminary_model:`` recipe (tests/test_params_source.py
    fails when they drift apart); what a stage sets differently is listed and explained there.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    model: str = "ram_effnet_lite0"               # registry name, or "pkg.module:factory"
    model_overrides: dict[str, Any] = {}          # passed to create_model(name, **overrides)
    loss_weights: dict[str, float] = {}           # passthrough: create_model(..., loss_weights=...)
    caption: bool = False                         # caption branch on/off (no caption tokens when off)
    caption_max_len: int | None = None            # None: the model config's max_caption_len (else 40)
    backend: Literal["torch", "deepspeed"] = "torch"  # training backend
    zero_stage: int = Field(2, ge=0, le=2)
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 only takes effect on CUDA
    splits: list[str] = ["pretrain"]              # raw/{split}/ shards to train on
    clean_mix: CleanMixConfig | None = None       # a completely labelled split mixed in (None: off)
    epochs: int = Field(2, ge=1)                  # the later stages continue from the model before them
    max_steps: int | None = None                  # cap on optimizer steps (None: epochs decide)
    batch_size: int = Field(32, ge=1)             # global samples per optimizer step
    micro_batch_size: int = Field(32, ge=1)       # samples per process per forward
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 0.0                        # global-norm clip (0 = off; 1.0 cut ram_effnet_lite0's
                                                  # 2-epoch test mAP from 0.64 to 0.35 on the embedded corpus)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)        # at least MIN_KEPT are kept either way
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = 256
    seed: int = 0
    random_crop: bool = False                     # the embedded corpus' objects fill 25-45% of the side
    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    log_every: int = 10
    resume: bool = True                           # continue from out_dir/checkpoints/latest
    force: bool = False                           # retrain (new MLflow run) even when the finished
                                                  # model's inputs and settings are unchanged
    init_from: str | None = None                  # model dir / file used when the caller passes none
                                                  # (a relative path is below the data root)
    validation_fraction: float = 0.05             # held-out keys for threshold calibration
    calibration_min_positives: int = Field(5, ge=1)  # fewer validation positives: keep the class's threshold
    # noisy captions miss tags: leave this fraction of each batch's negative labels with the largest
    # tag loss out (LL-R, see ram_model.losses.large_loss_mask), from `reject_start` of training on
    missing_label_rejection: float = Field(0.0, ge=0.0, lt=1.0)
    reject_start: float = Field(0.33, ge=0.0, le=1.0)
    # which tag queries a step trains (ram_model.query_sampling): "observed" leaves out the tags no
    # training label names; sampled_negatives=K runs each image's positives plus K weighted negatives
    train_tags: Literal["all", "observed"] = "all"
    sampled_negatives: int | None = Field(None, ge=1)
    eval_split: str = "test"
    eval_batch_size: int = 64
    eval_max_samples: int | None = None
    experiment: str = "ramflow"
    tracking_uri: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: Any) -> Any:
        """A training section that still says ``engine:`` (the key's name before ``backend:``) gets
        an error naming the fix, not the bare "extra inputs are not permitted"."""
        if isinstance(values, dict) and "engine" in values:
            raise ValueError(f"'engine: {values['engine']}' is now called 'backend: {values['engine']}' "
                             "(the training backend, torch | deepspeed): rename the key in this section")
        return values


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
    """Every RNG's state as tensors and ints (saved with ``torch.save``, read back with
    ``weights_only=True``: no pickled numpy or Python objects)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),  # [625]
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),  # [624]
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
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


def _step_of(ckpt: Path) -> int:
    try:
        return int(ckpt.name.removeprefix(STEP_PREFIX))
    except ValueError:
        return -1


def checkpoint_candidates(out_dir: Path) -> list[Path]:
    """Checkpoint folders of ``out_dir``, newest first: the one ``latest.json`` names, then every
    other ``step_*`` folder by step (a pointer that is missing or unreadable is skipped)."""
    root = Path(out_dir) / "checkpoints"
    found = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and _step_of(p) >= 0),
                   key=_step_of, reverse=True)
    try:
        named = root / json.loads((root / LATEST).read_text(encoding="utf-8"))["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return found
    return [named, *(p for p in found if p != named)] if named.is_dir() else found


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The loop position saved in ``ckpt`` (ValueError when the file is truncated or malformed)."""
    try:
        state = json.loads((Path(ckpt) / TRAINER_STATE).read_text(encoding="utf-8"))
        TrainState(**state)  # every field present and known
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{Path(ckpt) / TRAINER_STATE} is unreadable: {e}") from e
    if not isinstance(state.get("step"), int) or not isinstance(state.get("history"), list):
        raise ValueError(f"{Path(ckpt) / TRAINER_STATE} is malformed")
    return state


class SavedCheckpoint(NamedTuple):
    path: Path                   # the step_* folder
    state: dict[str, Any]        # its trainer state (step, epoch, history, fingerprint, ...)


def latest_checkpoint(out_dir: Path) -> SavedCheckpoint | None:
    """The newest checkpoint (folder and trainer state) whose trainer state reads,
    or None (also when the main process is deleting stale checkpoints while another rank looks).
    :meth:`Trainer.resume` then also reads the backend and RNG state back before it trusts one."""
    for ckpt in checkpoint_candidates(out_dir):
        try:
            return SavedCheckpoint(ckpt, read_trainer_state(ckpt))
        except (OSError, ValueError) as e:
            log.warning("skipping checkpoint %s: %s", ckpt, e)
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
    """Train ``model`` with ``loader`` through the training backend named in ``cfg``."""

    def __init__(self, model: nn.Module, loader: TrainLoader, cfg: TrainStageConfig, out_dir: Path,
                 tracker: RunTracker | None = None, dist: DistInfo | None = None,
                 trainable_tags: torch.Tensor | None = None) -> None:
        self.cfg, self.loader, self.out_dir = cfg, loader, Path(out_dir)
        # [C] bool: the tags a step may train (train_tags: observed); None = every tag
        self.trainable_tags = trainable_tags
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
        self.settings = BackendSettings(
            lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
            total_steps=self.total_steps, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
            micro_batch_size=cfg.micro_batch_size, grad_accum_steps=self.accum,
            zero_stage=cfg.zero_stage, precision=cfg.precision,
        )
        self.backend = build_backend(cfg.backend, model, self.settings, self.dist)
        self.state = TrainState(mlflow_run_id=tracker.run_id if tracker else "")
        model_cfg = getattr(model, "config", None)
        self.caption_max_len = cfg.caption_max_len or int(getattr(model_cfg, "max_caption_len", 40))

    # ------------------------------------------------------------------ batches
    def _prepare(self, batch: dict[str, Any], micro: int = 0) -> dict[str, Any]:
        """Loader batch -> model batch (adds caption tokens, the rejection rate and the trained tag
        queries; drops keys/captions). ``micro``: the batch's index in its accumulation group."""
        out = {k: batch[k] for k in ("image", "tag_targets", "parse_targets")}
        if self.cfg.missing_label_rejection > 0 and self.state.step >= self.cfg.reject_start * self.total_steps:
            out["reject_negatives"] = self.cfg.missing_label_rejection
            if "complete_labels" in batch:
                out["complete_labels"] = batch["complete_labels"]  # [B] bool: these rows keep every negative
        if self.trainable_tags is not None or self.cfg.sampled_negatives is not None:
            # seeded by the batch's place in the run: a resumed run draws the same negatives
            place = (self.state.step * self.accum + micro) * self.dist.world_size + self.dist.rank
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + place)
            q = select_queries(out["tag_targets"], self.trainable_tags, self.cfg.sampled_negatives, gen)
            out["tag_ids"], out["tag_targets"] = q.tag_ids, q.targets  # [K] or [B, K]; [B, K]
            if q.weights is not None:
                out["tag_weights"] = q.weights  # [B, K]
        tokenizer = getattr(self.backend.module, "tokenizer", None)
        if self.cfg.caption and tokenizer is not None:
            ids, mask = tokenizer.encode(batch["captions"], self.caption_max_len)
            out["caption_ids"], out["caption_mask"] = ids, mask  # [B,L] each
        return out

    def _steps_in_epoch(self, epoch: int) -> int:
        return self.loader.steps_per_epoch(epoch) // self.accum

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically: every file goes to ``.tmp-step_N`` first and
        the folder is renamed once complete, then ``latest.json`` moves; an interrupted save
        leaves the previous checkpoints as they were. Keeps ``max(keep_checkpoints, 2)``."""
        root = self.out_dir / "checkpoints"
        name = f"{STEP_PREFIX}{self.state.step:08d}"
        ckpt, tmp = root / name, root / f"{TMP_PREFIX}{name}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was interrupted
            tmp.mkdir(parents=True)
        self.backend.barrier()
        self.backend.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        self.backend.barrier()
        if self.dist.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps(self.state.__dict__), encoding="utf-8")
            if ckpt.exists():  # the same step written again (e.g. after a fallback): replace it
                old = root / f"{TMP_PREFIX}old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                ckpt.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(ckpt)
            pointer = root / (LATEST + ".tmp")
            pointer.write_text(json.dumps({"dir": ckpt.name, "step": self.state.step}), encoding="utf-8")
            pointer.replace(root / LATEST)  # the pointer moves only once the checkpoint is complete
            keep = max(self.cfg.keep_checkpoints, MIN_KEPT)
            old = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and p != ckpt), key=_step_of)
            for p in old[: max(0, len(old) - (keep - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        self.backend.barrier()
        log.info("checkpoint step %d -> %s", self.state.step, ckpt)
        return ckpt

    def _read_checkpoint(self, ckpt: Path, fingerprint: str | None) -> dict[str, Any]:
        """Trainer state and RNG state of ``ckpt``, after reading its backend state back in full;
        raises when any of them is truncated, refused or of another run."""
        state = read_trainer_state(ckpt)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise ValueError(f"written by another run (fingerprint {state.get('fingerprint')!r})")
        self.backend.check(ckpt)
        rng = load_tensors(ckpt / f"rng_rank{self.dist.rank}.pt")
        if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
            raise ValueError(f"{ckpt / f'rng_rank{self.dist.rank}.pt'} is not an RNG state")
        return {"trainer": state, "rng": rng}

    def resume(self, fingerprint: str | None = None) -> bool:
        """Load the newest intact checkpoint in ``out_dir`` (if any); True when resumed.

        Each candidate (newest first) is read back in full before anything is applied; one that
        is truncated, refused (not weights-only) or, with ``fingerprint``, of another run is
        skipped with a warning naming it, and the main process renames it ``corrupt-step_N`` so
        the retention never keeps it over an intact one. Every rank takes the same decision.
        """
        for ckpt in checkpoint_candidates(self.out_dir):
            try:
                loaded = self._read_checkpoint(ckpt, fingerprint)
                error = None
            except CHECKPOINT_READ_ERRORS as e:
                loaded, error = None, e
            if not self.backend.all_true(loaded is not None):
                log.warning("checkpoint %s is unusable (%s): falling back to the previous checkpoint", ckpt,
                            error or "unreadable on another rank")
                self.backend.barrier()
                if self.dist.is_main:
                    aside = ckpt.with_name(CORRUPT_PREFIX + ckpt.name)
                    shutil.rmtree(aside, ignore_errors=True)
                    ckpt.rename(aside)
                self.backend.barrier()
                continue
            self.backend.load(ckpt)
            self.state = TrainState(**loaded["trainer"])
            set_rng_state(loaded["rng"])
            log.info("resumed from %s (step %d, epoch %d, micro-batch %d)", ckpt, self.state.step,
                     self.state.epoch, self.state.micro_in_epoch)
            return True
        return False

    # ------------------------------------------------------------------ loop
    def fit(self, until_step: int | None = None) -> TrainSummary:
        """Train to ``total_steps`` (or stop after ``until_step``: a planned interruption)."""
        stop_at = self.total_steps if until_step is None else min(until_step, self.total_steps)
        st = self.state

        bar = tqdm(total=self.total_steps, initial=st.step, desc=f"train[{self.cfg.backend}]",
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
                group.append(self._prepare(batch, len(group)))
                if len(group) < self.accum:
                    continue
                stats = self.backend.train_step(group)
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
