"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

The file holds only tensors and primitive containers: ``format``, ``model_name``, ``config``
(every config field, primitive values: the model is rebuilt as trained even after the
registry's defaults change), ``overrides`` (the fields differing from the registry, for people
and for files written before ``config`` was stored), ``state_dict``, ``tag_names``,
``thresholds`` (list of floats), ``tokenizer`` (its primitive state) and ``extra`` (caller data,
e.g. training metrics; must itself be primitive/tensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ram_model.registry import config_fields, config_overrides, create_model
from ram_model.tokenizer import tokenizer_from_state

FORMAT = "ramflow-model-v1"
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


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dict (``weights_only=True``: no code is unpickled)."""
    blob = torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    return blob


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model saved by :func:`save_model` (no pretrained weights are read), in eval mode."""
    blob = read_checkpoint(path)
    tokenizer = tokenizer_from_state(blob["tokenizer"]) if blob.get("tokenizer") else None
    fields = blob.get("config") or blob["overrides"]
    model = create_model(blob["model_name"], pretrained=False, caption_tokenizer=tokenizer, **fields)
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
    """Only the weights of a checkpoint file or model folder (e.g. to initialise a new stage)."""
    return read_checkpoint(path)["state_dict"]
