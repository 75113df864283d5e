"""``ramflow import-official``: a released RAM / RAM++ / Tag2Text checkpoint -> a ramflow model.

The result is an ordinary ramflow model folder (:func:`ram_model.checkpoint.save_model`):
config ``ram_official_swin_l_384`` / ``ram_plus_official_swin_l_384`` /
``tag2text_official_swin_b_384`` (:mod:`ram_model.registry`), every weight of the file mapped by
:mod:`ram_model.official.layout`, the official tag names and per-class thresholds (deleted
Tag2Text tags get a threshold no probability reaches), and in ``extra`` the Chinese names, the
official thresholds and deleted indices, the source file's name and sha-free size. Serving,
``ramflow tag``, evaluation, the data engine and ``init_from`` read it like any other model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from ram_model.checkpoint import save_model
from ram_model.official.layout import LayoutError, map_official_state, unwrap_state
from ram_model.official.resources import MODEL_NAMES, OfficialTagSet, official_tag_set
from ram_model.registry import create_unfilled_model
from ram_model.serving import log_pyfunc
from ram_model.tracking import mlflow_store

log = logging.getLogger(__name__)

SOURCE = "official"


class OfficialImportConfig(BaseModel):
    """What ``ramflow import-official`` does."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="released .pth: {'model': state_dict} or a bare state dict")
    arch: str = Field(description="ram | ram_plus | tag2text")
    out: Path | None = Field(None, description="model folder to write (model.pt, thresholds.json, config.json)")
    model_name: str | None = Field(None, description="registry config (default: the arch's official config)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config field overrides")
    to_registry: bool = Field(False, description="log the written model as an MLflow pyfunc and register it")
    registered_name: str | None = Field(None, description="registry name (default ram-official-<arch>)")


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint (``weights_only=True``; memory-mapped, so the
    file's tensors are read on demand and not copied twice)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        blob = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state(blob)


def _label_rows(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    for key in ("label_embed", "label_embed.weight"):
        if key in state:
            return state[key]
    raise LayoutError("checkpoint has no label_embed (the tag embeddings): is it a RAM / RAM++ / Tag2Text file?")


def build_from_official_state(state: Mapping[str, torch.Tensor], arch: str, model_name: str | None = None,
                              tag_set: OfficialTagSet | None = None, **overrides: Any):
    """An :class:`~ram_model.official.model.OfficialRamModel` (eval mode) holding ``state``.

    ``tag_set`` defaults to the shipped official one; ``overrides`` change config fields (tests
    use the ``*_official_tiny`` configs with their own tag lists)."""
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(MODEL_NAMES)})")
    tags = tag_set or official_tag_set(arch)
    model = create_unfilled_model(model_name or MODEL_NAMES[arch], **overrides)
    if model.config.official_arch != arch:
        raise ValueError(f"config {model.config.name} is for {model.config.official_arch!r}, not {arch!r}")
    rows = _label_rows(state)
    per_tag = model.config.descriptions_per_tag
    if rows.ndim != 2 or rows.shape[0] != len(tags.names) * per_tag:
        raise LayoutError(f"label_embed {tuple(rows.shape)} does not fit {len(tags.names)} tags x {per_tag} "
                          f"embedding(s) each ({model.config.name})")
    model.set_tags(list(tags.names), torch.zeros(rows.shape), tags.served_thresholds())
    mapped = map_official_state(state, model, log.info)
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"thresholds"}:
        raise LayoutError(f"load failed: missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
    return model.eval()


def official_extra(arch: str, tags: OfficialTagSet, source: Path | None) -> dict[str, Any]:
    """Checkpoint ``extra`` of an imported model (primitive values only)."""
    return {
        "source": SOURCE,
        "official_arch": arch,
        "source_file": source.name if source else "",
        "official_tag_names": list(tags.display_names()),
        "tag_names_chinese": list(tags.chinese),
        "official_thresholds": list(tags.thresholds),
        "delete_tag_index": list(tags.delete_index),
    }


def register_imported(model_dir: Path, name: str, tracking_uri: str | None = None) -> dict[str, str]:
    """Log the model folder as a ramflow pyfunc (:func:`ram_model.serving.log_pyfunc`) and register
    it as a new version of ``name`` (aliases are left alone: an imported model has no evaluation
    for the promotion gate). Returns the model uri and version."""
    import mlflow  # lazy: mlflow, only with --register

    uri = log_pyfunc(model_dir, run_id=None, tracking_uri=tracking_uri, example=[])
    with mlflow_store(tracking_uri):
        version = mlflow.register_model(uri, name, tags={"ramflow.source": SOURCE})
    log.info("registered %s v%s (%s)", name, version.version, uri)
    return {"name": name, "version": str(version.version), "model_uri": uri}


def import_official(cfg: OfficialImportConfig, tag_set: OfficialTagSet | None = None,
                    tracking_uri: str | None = None):
    """Read, map, check and (with ``cfg.out``) write the model; returns ``(model, path or None)``;
    with ``cfg.to_registry`` the model also carries ``registered`` (name, version, uri)."""
    state = read_official_checkpoint(cfg.checkpoint)
    tags = tag_set or official_tag_set(cfg.arch)
    model = build_from_official_state(state, cfg.arch, cfg.model_name, tags, **cfg.overrides)
    del state
    path = None
    if cfg.out is not None:
        path = save_model(model, cfg.out, extra=official_extra(cfg.arch, tags, cfg.checkpoint))
        log.info("wrote %s (%s, %d tags)", path, model.config.name, len(model.tag_names))
    if cfg.to_registry:
        if path is None:
            raise ValueError("--register needs --out (the registry logs the written model folder)")
        model.registered = register_imported(path.parent, cfg.registered_name
                                             or f"ram-official-{cfg.arch.replace('_', '-')}", tracking_uri)
    return model, path
