"""Plain PyTorch backend: AdamW + warmup-cosine, DDP (gloo on CPU, NCCL on GPU) above one process."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_model.backends.base import (Backend, BackendSettings, DistInfo, default_device, ensure_process_group,
                                load_tensors, make_scheduler, move_to, param_groups, scalar_outputs)

log = logging.getLogger(__name__)
STATE_FILE = "torch_backend.pt"


class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, model: nn.Module, settings: BackendSettings, dist: DistInfo) -> None:
        self.settings, self.dist = settings, dist
        self.device = default_device(dist)
        self._model = model.to(self.device)
        self._wrapped: nn.Module = self._model
        if dist.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            ensure_process_group(dist, backend)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = nn.parallel.DistributedDataParallel(self._model, device_ids=ids)
        # foreach=False: the same per-parameter update DeepSpeed's torch_adam path runs.
        self.optimizer = torch.optim.AdamW(
            param_groups(self._model, settings.weight_decay),
            lr=settings.lr, betas=settings.betas, eps=settings.eps, foreach=False,
        )
        self.scheduler = make_scheduler(self.optimizer, settings)

    @property
    def module(self) -> nn.Module:
        return self._model

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        if len(micro_batches) != self.settings.grad_accum_steps:
            raise ValueError(f"expected {self.settings.grad_accum_steps} micro-batches, got {len(micro_batches)}")
        self._wrapped.train()
        lr = self.current_lr()
        sums: dict[str, float] = {}
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self._wrapped.no_sync()
            with sync:
                with self.autocast():
                    out = self._wrapped(move_to(batch, self.device))
                (out["loss"] / n).backward()
            for k, v in scalar_outputs(out).items():
                sums[k] = sums.get(k, 0.0) + v / n
        if self.settings.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self._model.parameters(), self.settings.grad_clip))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in self._model.parameters() if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.reduce_mean(sums)
        stats.update(lr=lr, grad_norm=norm)
        return stats

    def save(self, ckpt_dir: Path) -> None:
        """Model, AdamW and scheduler state: tensors and primitives only (the scheduler's
        ``WarmupCosine`` is saved as its attribute dict), so :meth:`load` reads it with
        ``weights_only=True``."""
        if not self.dist.is_main:  # DDP keeps every rank's weights and optimizer identical
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self._model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, ckpt_dir / STATE_FILE)

    def check(self, ckpt_dir: Path) -> None:
        state = load_tensors(ckpt_dir / STATE_FILE)
        missing = {"model", "optimizer", "scheduler"} - set(state)
        if missing:
            raise KeyError(f"{ckpt_dir / STATE_FILE} lacks {sorted(missing)}")

    def load(self, ckpt_dir: Path) -> None:
        state = load_tensors(ckpt_dir / STATE_FILE, map_location=self.device)
        self._model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
