"""The one model file format of ramflow (``ramflow-model-v1``), read with ``weights_only=True``.

:func:`save_model` writes it and :func:`read_checkpoint` reads it; :func:`load_model` (the
whole model) and :func:`load_state_dict` (its weights, e.g. to initialise a new stage) are built
on that one reader. The file holds only tensors and primitive containers:

- ``format``: ``"ramflow-model-v1"``;
- ``model_name``: the registry name, or ``"pkg.module:factory"`` for a custom model (tests,
  experiments);
- ``config``: every config field, primitive values (the model is rebuilt as trained even after
  the registry's defaults change); a custom model: its factory's keyword arguments;
- ``overrides``: the fields differing from the registry (for people; loading reads ``config``);
  a custom model: its factory's keyword arguments;
- ``state_dict``, ``tag_names``, ``thresholds`` (list of floats, or None), ``tokenizer`` (its
  primitive state, or None) and ``extra`` (caller data, e.g. training metrics; primitive/tensors).

A model folder (``models/{stage}/``) holds it as ``model.pt`` beside readable
``thresholds.json`` and ``config.json``. Files of custom models written before this one format
(``ramflow-state-v1``, or no ``format`` key with a ``factory``) are read by the same reader as
this format. Nothing in a file is unpickled beyond tensors and primitives (a file that needs
more is refused with :class:`~ram_model.backends.UnsafeCheckpointError`, its code never runs),
and no file names code that loading would run: a custom model is rebuilt by its caller.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ram_model.backends import UnsafeCheckpointError, load_tensors
from ram_model.configs import config_fields, config_overrides
from ram_model.tokenizer import tokenizer_from_state

FORMAT = "ramflow-model-v1"
LEGACY_STATE_FORMAT = "ramflow-state-v1"  # custom models' files before the one format: read, never written
CHECKPOINT_FILE = "model.pt"  # inside a model folder (``models/{stage}/``)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a model folder holding ``model.pt``."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def save_model(model, path: str | os.PathLike, extra: dict[str, Any] | None = None, *,
               thresholds=None, factory: str | None = None, factory_kwargs: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in the one format; returns the model file's path.

    ``path`` ending in ``.pt`` is that file; any other path is a model folder: ``model.pt`` plus
    readable ``thresholds.json`` and ``config.json``. ``thresholds`` (one per tag) replace the
    model's own before saving. A custom model (no registry config) passes its ``factory``
    (``"pkg.module:callable"``) and the keyword arguments it was built with.
    """
    path = Path(path)
    file = path if path.suffix == ".pt" else path / CHECKPOINT_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    if factory is None:
        if thresholds is not None:
            model.set_tags(model.tag_names, model.label_embed.detach().cpu(), [float(t) for t in thresholds])
        name, fields, overrides = model.config.name, config_fields(model.config), config_overrides(model.config)
        thresholds = model.thresholds.tolist()
        tokenizer = model.tokenizer.state() if model.tokenizer is not None else None
    else:
        name, fields, tokenizer = factory, dict(factory_kwargs or {}), None
        overrides = dict(fields)
    tag_names = list(getattr(model, "tag_names", []))
    blob = {
        "format": FORMAT,
        "model_name": name,
        "config": fields,
        "overrides": overrides,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "tag_names": tag_names,
        "thresholds": [float(t) for t in thresholds] if thresholds is not None else None,
        "tokenizer": tokenizer,
        "extra": dict(extra or {}),
    }
    tmp = file.with_name(file.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(file)
    if file != path:  # a model folder: its readable side files
        if blob["thresholds"] is not None:
            (path / "thresholds.json").write_text(
                json.dumps(dict(zip(tag_names, blob["thresholds"])), indent=1), encoding="utf-8")
        (path / "config.json").write_text(
            json.dumps({"model_name": name, "overrides": overrides, "num_tags": len(tag_names)}, indent=1),
            encoding="utf-8")
    return file


def _from_legacy_state(blob: dict[str, Any]) -> dict[str, Any] | None:
    """A custom model's file written before the one format (``ramflow-state-v1``; the oldest
    ones had no ``format`` key: exactly factory / state_dict / thresholds / tag_names), in the
    one format; None for any other dict."""
    legacy = blob.get("format") == LEGACY_STATE_FORMAT or ("format" not in blob and "factory" in blob)
    if not legacy or "state_dict" not in blob:
        return None
    return {"format": FORMAT, "model_name": blob.get("factory", ""), "config": {}, "overrides": {},
            "state_dict": blob["state_dict"], "tag_names": list(blob.get("tag_names") or []),
            "thresholds": blob.get("thresholds"), "tokenizer": None, "extra": {}}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The model file's dict in the one format (``weights_only=True``: no code is unpickled; a
    refused file raises before any of it runs). ``path``: a model file or a model folder."""
    file = resolve_checkpoint(path)
    blob = load_tensors(file, map_location="cpu")
    if not isinstance(blob, dict):
        raise ValueError(f"{file}: not a ramflow model file (a {type(blob).__name__}, not a dict)")
    if blob.get("format") == FORMAT:
        return blob
    upgraded = _from_legacy_state(blob)
    if upgraded is None:
        raise ValueError(f"{file}: not a ramflow model file: format {blob.get('format')!r}, expected {FORMAT!r}")
    return upgraded


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file (or of a model folder's ``model.pt``): the model's content id."""
    h = hashlib.sha256()
    with resolve_checkpoint(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Only the weights of a model file or folder (e.g. to initialise a new stage)."""
    state = read_checkpoint(path)["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{resolve_checkpoint(path)}: its state_dict is not a mapping of tensors")
    return state


__all__ = ["CHECKPOINT_FILE", "FORMAT", "LEGACY_STATE_FORMAT", "UnsafeCheckpointError", "file_sha256",
           "load_state_dict", "read_checkpoint", "resolve_checkpoint", "save_model"]
