"""Training backends: the part of training that differs between plain torch and DeepSpeed.

An :class:`Backend` owns device placement, the backward pass, gradient accumulation, gradient
clipping, the optimizer step, the warmup+cosine LR schedule, checkpoint state and the
rank / world-size of this process. :class:`ram_model.trainer.Trainer` only talks to this
interface, so both backends run the very same training loop.

Only :mod:`ram_model.backends.deepspeed_backend` imports ``deepspeed``, and only when a
:class:`DeepSpeedBackend` is built, so the torch backend works where DeepSpeed is absent.
"""

from __future__ import annotations

import torch
from torch import nn

from ram_model.backends.base import (  # noqa: F401  (re-exported: the package's interface)
    Backend, BackendKind, BackendSettings, CHECKPOINT_READ_ERRORS, DistInfo, TORCH_EXTENSIONS_ENV,
    UnsafeCheckpointError, WarmupCosine, default_device, default_torch_extensions_dir, dist_info_from_env,
    ensure_process_group, ensure_torch_extensions_dir, free_port, load_tensors, make_scheduler, move_to,
    param_groups, scalar_outputs,
)
from ram_model.backends.deepspeed_backend import DeepSpeedBackend
from ram_model.backends.torch_backend import TorchBackend


def build_backend(kind: BackendKind, model: nn.Module, settings: BackendSettings, dist: DistInfo | None = None) -> Backend:
    """Wrap ``model`` in the chosen backend (``deepspeed`` itself is imported only when that backend is built)."""
    dist = dist or dist_info_from_env()
    if not torch.cuda.is_available():
        # Adam's second moments decay into denormal floats, which x86 CPUs process ~100x
        # slower; flushing them to zero changes no result that matters and keeps steps fast.
        torch.set_flush_denormal(True)
    if kind == "torch":
        return TorchBackend(model, settings, dist)
    if kind == "deepspeed":
        return DeepSpeedBackend(model, settings, dist)
    raise ValueError(f"unknown training backend {kind!r}: expected 'torch' or 'deepspeed'")
