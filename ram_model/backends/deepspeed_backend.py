"""DeepSpeed backend (ZeRO 0-2). The only module in ramflow that imports ``deepspeed``.

On CPU: ``DS_ACCELERATOR=cpu``, gloo, fp32 and DeepSpeed's torch AdamW
(``{"type": "AdamW", "params": {"torch_adam": true}}``: the fused CPU Adam op would need a
compiler run per machine). On CUDA: NCCL and optional bf16. The JSON config is built from
:class:`~ram_model.backends.BackendSettings` by :func:`deepspeed_config`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_model.backends.base import (Backend, BackendSettings, DistInfo, default_device, ensure_process_group,
                                ensure_torch_extensions_dir, load_tensors, make_scheduler, move_to, param_groups,
                                scalar_outputs)

log = logging.getLogger(__name__)
CKPT_TAG = "backend"


def checkpoint_classes() -> list[type]:
    """The only non-primitive classes DeepSpeed's ZeRO-1/2 optimizer files hold (measured on
    0.19: a dataclass of two ints, an enum and the loss scaler's attribute holder). They are
    allowed by name for weights-only loads; anything else in a file is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # lazy: deepspeed, only when its checkpoints are read
    from deepspeed.runtime.zero.config import ZeroStageEnum  # lazy: deepspeed, only when its checkpoints are read
    from deepspeed.utils.tensor_fragment import fragment_address  # lazy: deepspeed, only when its checkpoints are read

    return [fragment_address, ZeroStageEnum, LossScaler]


def _weights_only_loader(allowed: list[type]):
    """A replacement for DeepSpeed's checkpoint-engine ``load`` (which unpickles anything)."""

    def load(path: str, map_location: Any = None) -> Any:
        return load_tensors(path, map_location=map_location, allowed=allowed)

    return load


def deepspeed_config(s: BackendSettings, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for these settings (global batch = micro x accum x world)."""
    if s.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3 partitions weights), got {s.zero_stage}")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum_steps,
        "train_batch_size": s.micro_batch_size * s.grad_accum_steps * world_size,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": s.lr, "betas": list(s.betas), "eps": s.eps, "weight_decay": s.weight_decay,
                "torch_adam": True,
            },
        },
        "gradient_clipping": s.grad_clip,
        "zero_optimization": {"stage": s.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if on_gpu and s.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


class DeepSpeedBackend(Backend):
    kind = "deepspeed"

    def __init__(self, model: nn.Module, settings: BackendSettings, dist: DistInfo) -> None:
        on_gpu = torch.cuda.is_available()
        # Must be set before deepspeed is imported: it picks its accelerator at import time.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        ensure_torch_extensions_dir()
        import deepspeed  # lazy: deepspeed, only this backend; DS_ACCELERATOR must be set first

        self.settings, self.dist = settings, dist
        self.device = default_device(dist)
        backend = "nccl" if on_gpu else "gloo"
        ensure_process_group(dist, backend)  # our own init: no MPI discovery, works at world size 1
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if on_gpu:
            torch.cuda.set_device(self.device)
        # DeepSpeed broadcasts each parameter viewed as bytes and ZeRO flattens them: both need
        # the default layout, so channels_last weights go back to it (inputs stay channels_last).
        # A 1x1 conv weight [O, I, 1, 1] in channels_last counts as contiguous but has
        # stride(-1) == I, which the byte view refuses: hence the explicit stride test and clone.
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.ndim and (not tensor.is_contiguous() or tensor.stride(-1) != 1):
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
        self._model = model
        self.config = deepspeed_config(settings, dist.world_size, on_gpu)
        self._ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, settings.weight_decay),
            config=self.config,
            lr_scheduler=lambda opt: make_scheduler(opt, settings),
        )
        self.device = self._ds_engine.device if isinstance(self._ds_engine.device, torch.device) else torch.device(self._ds_engine.device)
        self._allowed = checkpoint_classes()
        # every file DeepSpeed reads back goes through its checkpoint engine's load
        self._ds_engine.checkpoint_engine.load = _weights_only_loader(self._allowed)

    @property
    def module(self) -> nn.Module:
        return self._ds_engine.module

    def current_lr(self) -> float:
        return float(self._ds_engine.get_lr()[0])

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        if len(micro_batches) != self.settings.grad_accum_steps:
            raise ValueError(f"expected {self.settings.grad_accum_steps} micro-batches, got {len(micro_batches)}")
        self._ds_engine.train()
        lr = self.current_lr()
        sums: dict[str, float] = {}
        n = len(micro_batches)
        for batch in micro_batches:
            out = self._ds_engine(move_to(batch, self.device))
            self._ds_engine.backward(out["loss"])  # DeepSpeed divides by grad_accum_steps itself
            self._ds_engine.step()  # applies the optimizer only at the accumulation boundary
            for k, v in scalar_outputs(out).items():
                sums[k] = sums.get(k, 0.0) + v / n
        norm = self._ds_engine.get_global_grad_norm()
        stats = self.reduce_mean(sums)
        stats["lr"] = lr
        if norm is not None:  # DeepSpeed reports it only when it computed one (clipping on)
            stats["grad_norm"] = float(norm)
        return stats

    def save(self, ckpt_dir: Path) -> None:
        # ZeRO-1/2 shard optimizer state: every rank writes its own partition.
        self._ds_engine.save_checkpoint(str(ckpt_dir), tag=CKPT_TAG, save_latest=False)

    def check(self, ckpt_dir: Path) -> None:
        files = sorted((Path(ckpt_dir) / CKPT_TAG).glob("*.pt"))
        if not any(f.name.endswith("model_states.pt") for f in files):
            raise FileNotFoundError(f"no DeepSpeed model state in {Path(ckpt_dir) / CKPT_TAG}")
        for f in files:
            load_tensors(f, allowed=self._allowed)

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self._ds_engine.load_checkpoint(
            str(ckpt_dir), tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{CKPT_TAG}' in {ckpt_dir}")
