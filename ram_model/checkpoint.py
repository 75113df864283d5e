"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

The file holds only tensors and primitive containers: ``format``, ``model_name``, ``config``
(every config field, primitive values: the model is rebuilt as trained even after the
registry's defaults change), ``overrides`` (the fields differing from the registry, for people
and for files written before ``config`` was stored), ``state_dict``, ``tag_names``,
``thresholds`` (list of floats), ``tokenizer`` (its primitive state) and ``extra`` (caller data,
e.g. training metrics; must itself be primitive/tensors).

A custom ``"pkg.module:factory"`` model (tests, experiments) is exported by :func:`save_state`
as ``format="ramflow-state-v1"`` (factory name, weights, tags, thresholds): the same file name
in a model folder, one loader for the weights of both (:func:`load_state_dict`), and nothing in
either is unpickled beyond tensors and primitives (a file that needs more is refused with
:class:`~ram_model.engines.UnsafeCheckpointError`, its code never runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ram_model.engines import UnsafeCheckpointError, load_tensors
from ram_model.registry import config_fields, config_overrides, create_unfilled_model
from ram_model.tokenizer import tokenizer_from_state

FORMAT = "ramflow-model-v1"
STATE_FORMAT = "ramflow-state-v1"  # weights of a custom ``module:factory`` model
CHECKPOINT_FILE = "model.pt"  # inside a model folder (``models/{stage}/``)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a model folder holding ``model.pt``."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def save_model(model, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config name + overrides, weights, tags, thresholds, tokenizer) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = {
        "format": FORMAT,
        "model_name": model.config.name,
        "config": config_fields(model.config),
        "overrides": config_overrides(model.config),
        "state_dict": state,
        "tag_names": list(model.tag_names),
        "thresholds": [float(t) for t in model.thresholds.tolist()],
        "tokenizer": model.tokenizer.state() if model.tokenizer is not None else None,
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def _read_blob(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The file's dict, read with ``weights_only=True`` (refused files raise before any code runs)."""
    file = resolve_checkpoint(path)
    blob = load_tensors(file, map_location="cpu")
    if not isinstance(blob, dict):
        raise ValueError(f"{file}: not a ramflow checkpoint (a {type(blob).__name__}, not a dict)")
    return file, blob


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict (``weights_only=True``: no code is unpickled)."""
    file, blob = _read_blob(path)
    if blob.get("format") != FORMAT:
        kind = "a custom model's weights (ramflow-state-v1)" if _is_state(blob) else "another format"
        raise ValueError(f"{file}: not a {FORMAT} checkpoint: {kind}")
    return blob


def _is_state(blob: dict[str, Any]) -> bool:
    # files written before the format key existed held exactly factory / state_dict / thresholds / tag_names
    return blob.get("format") == STATE_FORMAT or ("format" not in blob and "factory" in blob and "state_dict" in blob)


def save_state(model, path: str | os.PathLike, factory: str, thresholds=None) -> Path:
    """Export a custom ``factory`` model: weights, tag names and thresholds (``ramflow-state-v1``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": STATE_FORMAT, "factory": factory,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "thresholds": [float(t) for t in thresholds] if thresholds is not None else None,
        "tag_names": list(getattr(model, "tag_names", [])),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file (or of a model folder's ``model.pt``): the model's content id."""
    h = hashlib.sha256()
    with resolve_checkpoint(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model saved by :func:`save_model` (no pretrained weights are read), in eval mode."""
    blob = read_checkpoint(path)
    tokenizer = tokenizer_from_state(blob["tokenizer"]) if blob.get("tokenizer") else None
    fields = blob.get("config") or blob["overrides"]
    # every persistent tensor is loaded below (strict): no random init to overwrite
    model = create_unfilled_model(blob["model_name"], caption_tokenizer=tokenizer, **fields)
    state = blob["state_dict"]
    model.set_tags(blob["tag_names"], state["label_embed"], blob["thresholds"])
    model.load_state_dict(state, strict=True)
    model.checkpoint_extra = blob.get("extra", {})
    return model.to(device).eval()


def save_checkpoint(model, out_dir: str | os.PathLike, thresholds=None, extra: dict[str, Any] | None = None) -> Path:
    """Model folder: ``model.pt`` (:func:`save_model`) plus readable ``thresholds.json`` and
    ``config.json``; ``thresholds`` (one per tag) replace the model's before saving."""
    out_dir = Path(out_dir)
    if thresholds is not None:
        model.set_tags(model.tag_names, model.label_embed.detach().cpu(), [float(t) for t in thresholds])
    path = save_model(model, out_dir / CHECKPOINT_FILE, extra)
    (out_dir / "thresholds.json").write_text(
        json.dumps(dict(zip(model.tag_names, (float(t) for t in model.thresholds.tolist()))), indent=1),
        encoding="utf-8")
    (out_dir / "config.json").write_text(
        json.dumps({"model_name": model.config.name, "overrides": config_overrides(model.config),
                    "num_tags": len(model.tag_names)}, indent=1), encoding="utf-8")
    return path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Only the weights of a checkpoint file or model folder (e.g. to initialise a new stage):
    a ramflow model (``ramflow-model-v1``) or a custom model's export (``ramflow-state-v1``)."""
    file, blob = _read_blob(path)
    if blob.get("format") != FORMAT and not _is_state(blob):
        raise ValueError(f"{file}: neither a {FORMAT} checkpoint nor a {STATE_FORMAT} export")
    state = blob["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: its state_dict is not a mapping of tensors")
    return state


__all__ = ["CHECKPOINT_FILE", "FORMAT", "STATE_FORMAT", "UnsafeCheckpointError", "file_sha256", "load_model",
           "load_state_dict", "read_checkpoint", "resolve_checkpoint", "save_checkpoint", "save_model",
           "save_state"]
