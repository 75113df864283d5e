"""What both training backends share: the :class:`Backend` interface, its settings, the process's
rank / world size, the LR schedule, parameter groups and the weights-only tensor loader.

The backends themselves (:mod:`~ram_model.backends.torch_backend`,
:mod:`~ram_model.backends.deepspeed_backend`) build on this module; :mod:`ram_model.backends`
re-exports it and chooses between them.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import nn

BackendKind = Literal["torch", "deepspeed"]
TORCH_EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


class UnsafeCheckpointError(ValueError):
    """A file that ``torch.load(..., weights_only=True)`` refuses: it pickles objects (code) that
    are not tensors or primitive containers, so it is never unpickled."""


# What a truncated or otherwise unreadable checkpoint file raises while it is loaded.
CHECKPOINT_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
                          pickle.UnpicklingError, zipfile.BadZipFile)


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu", allowed: list | None = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and primitive containers only.

    ``allowed`` names further classes that may be rebuilt (e.g. an enum of a library's own
    checkpoints); they are added for this call only. A file holding anything else raises
    :class:`UnsafeCheckpointError` (no code of it runs).
    """
    try:
        if allowed:
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reasons = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        if not reasons:
            raise  # a garbled file, not a refused one
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it pickles objects other than tensors and primitive containers, "
            f"which could run code ({reasons[0].split('. Please')[0].strip()}). ramflow reads checkpoints with "
            f"torch.load(weights_only=True) only; re-export the model with ramflow") from None


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (read from torchrun / deepspeed launcher env)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by torchrun or the deepspeed launcher."""
    env = os.environ
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


@dataclass(frozen=True)
class BackendSettings:
    """Optimisation settings shared by both backends (built from ``TrainStageConfig``)."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0           # 0 disables clipping
    micro_batch_size: int = 8        # samples per process per forward
    grad_accum_steps: int = 1
    zero_stage: int = 0              # deepspeed only (0, 1 or 2)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 only on CUDA


class WarmupCosine:
    """LR factor for optimizer step ``s``: linear warmup to 1, then cosine to ``min_ratio``.

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` can save it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, s: BackendSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(s.warmup_steps, s.total_steps, s.min_lr_ratio))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights (>=2-d) and undecayed biases / norms / embeddings' scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith(".bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def default_torch_extensions_dir() -> Path:
    """Stable cache for DeepSpeed's JIT-compiled ops, so only the first run pays the compile."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ramflow" / "torch_extensions"


def ensure_torch_extensions_dir() -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` to the stable cache unless the caller already chose one."""
    path = Path(os.environ.setdefault(TORCH_EXTENSIONS_ENV, str(default_torch_extensions_dir())))
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_process_group(dist: DistInfo, backend: str) -> None:
    """Initialise ``torch.distributed`` once; a single process gets a private local rendezvous."""
    if tdist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if dist.world_size > 1:
            raise RuntimeError("WORLD_SIZE>1 but MASTER_PORT is unset: launch with torchrun or deepspeed")
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", str(dist.rank))
    os.environ.setdefault("WORLD_SIZE", str(dist.world_size))
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
    tdist.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)


def default_device(dist: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Backend(ABC):
    """One optimizer step = ``grad_accum_steps`` micro-batches on every rank."""

    kind: BackendKind
    dist: DistInfo
    device: torch.device
    settings: BackendSettings

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The unwrapped model (same object the caller passed in)."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """Forward+backward every micro-batch, clip, step optimizer and scheduler.

        Returns the mean over micro-batches and ranks of every scalar the model returned
        (``loss``, ``loss_tag``, ...) plus ``lr`` (used for this step) and ``grad_norm``.
        """

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Save model, optimizer and scheduler state below ``ckpt_dir`` (every rank calls)."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what :meth:`save` wrote (every rank calls)."""

    def check(self, ckpt_dir: Path) -> None:
        """Read back everything :meth:`load` would read from ``ckpt_dir`` without applying it
        (raises one of :data:`CHECKPOINT_READ_ERRORS` when a file is truncated or refused)."""
        files = sorted(p for p in Path(ckpt_dir).rglob("*.pt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no backend state in {ckpt_dir}")
        for f in files:
            load_tensors(f)

    @abstractmethod
    def current_lr(self) -> float: ...

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (so every rank takes the same decision)."""
        if self.dist.world_size == 1 or not tdist.is_initialized():
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if tdist.is_initialized() and self.dist.world_size > 1:
            tdist.barrier()

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars across ranks (identity at world size 1)."""
        if self.dist.world_size == 1 or not tdist.is_initialized():
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        t /= self.dist.world_size
        return dict(zip(keys, t.tolist()))

    def _comm_device(self) -> torch.device:
        return self.device

    def autocast(self):
        """bf16 autocast on CUDA when asked for; a no-op context otherwise."""
        enabled = self.settings.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)


def scalar_outputs(out: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detached floats of every 0-d tensor the model returned."""
    return {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
