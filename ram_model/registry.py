"""Building models: from a registered config name (:func:`create_model`) or from a saved model
file (:func:`load_model`), and the text encoders their tag queries come from
(:func:`build_text_encoder`).

The configs themselves are plain data in :mod:`ram_model.configs` (re-exported here, so
``from ram_model.registry import get_config`` keeps working); the model file format is
:mod:`ram_model.checkpoint`. This module sits above both and above the model classes, so none
of them imports it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from timm.models._manipulate import reinit_non_persistent_buffers

from ram_model.checkpoint import read_checkpoint, resolve_checkpoint
from ram_model.configs import (  # noqa: F401  (re-exported: the registry's names)
    DEFAULT_TEMPLATES, EFFNET_LITE0_PACKAGE, IMAGENET_MEAN, IMAGENET_STD, MODEL_CONFIGS, RamConfig,
    config_fields, config_overrides, get_config, list_models,
)
from ram_model.model import RamModel
from ram_model.official.model import OfficialRamModel
from ram_model.official.openset import build_checkpoint_bank, build_official_clip_encoder, description_table
from ram_model.text_encoder import (
    OPEN_CLIP_WEIGHTS_ENV, MiniLMTextEncoder, TextEncoder, TextEncoderUnavailable, embed_tag_names,
)
from ram_model.tokenizer import tokenizer_from_state


def build_text_encoder(name: str, config=None) -> TextEncoder:
    """Text encoder named in a config.

    ``"minilm"``; ``"open_clip_ram[:WEIGHTS]"`` (the official RAM / RAM++ label space: CLIP
    ViT-B/16's text tower through open_clip, weights from a local file named here or in
    ``$RAMFLOW_OPEN_CLIP_WEIGHTS``); ``"checkpoint_tags:MODEL_DIR"`` (the embeddings an imported
    checkpoint holds for known names, CLIP for new ones); ``"none"`` (learned tag embeddings: no encoder can add tags);
    ``"package.module:factory"`` (any callable returning a :class:`TextEncoder`). ``config`` (the
    model's) only makes error messages name the model.
    """
    if name == "minilm":
        return MiniLMTextEncoder()
    if name == "open_clip_ram" or name.startswith("open_clip_ram:"):
        return build_official_clip_encoder(name.partition(":")[2] or os.environ.get(OPEN_CLIP_WEIGHTS_ENV), config)
    if name.startswith("checkpoint_tags:"):  # fine-tuning an imported model: its own tag embeddings
        return build_checkpoint_bank(name.partition(":")[2], config)
    if name == "none":
        model = getattr(config, "name", "this model")
        raise TextEncoderUnavailable(f"{model} has learned tag embeddings (Tag2Text): it scores only its own "
                                     "tags, no text encoder can add new ones")
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)()
    raise KeyError(f"unknown text encoder {name!r} (known: minilm, open_clip_ram[:weights], checkpoint_tags:dir, none, module:factory)")


def create_model(
    name: str,
    pretrained: bool = True,
    tag_names: list[str] | None = None,
    tag_embeddings: Any = None,
    caption_tokenizer: Any = None,
    **overrides: Any,
):
    """Build ``name`` with ``overrides``.

    ``pretrained=False`` skips every weight file (backbone and teacher), e.g. to count parameters.
    ``tag_names`` without ``tag_embeddings`` embeds the names with the config's text encoder
    (disk-cached); with neither the model starts with an empty tag set (call ``set_tags``).
    ``caption_tokenizer``: a ready tokenizer (e.g. a fitted ``WordTokenizer``) instead of the one
    the config's ``tokenizer`` field names.
    """
    config = get_config(name, **overrides)
    if config.layout == "official":
        model_class = OfficialRamModel
    elif config.layout == "ramflow":
        model_class = RamModel
    else:
        raise ValueError(f"{name}: unknown layout {config.layout!r} (known: ramflow, official)")
    model = model_class(config, pretrained=pretrained, tokenizer=caption_tokenizer)
    if tag_names is not None:
        if tag_embeddings is None:
            encoder = build_text_encoder(config.text_encoder, config)
            if config.tag_descriptions:  # RAM++: each tag's descriptions, [C, D, text_dim]
                tag_embeddings = description_table(tag_names, config.tag_descriptions, encoder)
            else:
                tag_embeddings = embed_tag_names(tag_names, encoder, config.prompt_templates)
        model.set_tags(list(tag_names), tag_embeddings)
    return model


def create_unfilled_model(name: str, caption_tokenizer: Any = None, **overrides: Any):
    """``name`` with allocated but *unset* weights, for a caller that loads every persistent tensor
    next (a checkpoint, an official import): built on the meta device, so the random init it
    would overwrite (about 30 s of CPU for Swin-L + BERT) is skipped. Computed buffers (Swin's
    relative position index and window masks) are filled; a model with computed buffers that
    cannot be refilled this way is built normally instead."""
    with torch.device("meta"):
        model = create_model(name, pretrained=False, caption_tokenizer=caption_tokenizer, **overrides)
    unfillable = [type(m).__name__ for m in model.modules()
                  if getattr(m, "_non_persistent_buffers_set", None) and not hasattr(m, "init_non_persistent_buffers")]
    if unfillable:
        return create_model(name, pretrained=False, caption_tokenizer=caption_tokenizer, **overrides)
    model.to_empty(device="cpu")
    reinit_non_persistent_buffers(model)
    return model


def count_parameters(name: str, **overrides: Any) -> dict[str, int]:
    """Parameter counts of ``name`` built on the meta device (no memory, no download)."""
    with torch.device("meta"):
        model = create_model(name, pretrained=False, **overrides)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts: dict[str, int] = {}
    for child_name, child in model.named_children():
        parts[child_name] = sum(p.numel() for p in child.parameters())
    return {"total": total, "trainable": trainable, **{f"part.{k}": v for k, v in parts.items()}}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a registry model saved by :func:`~ram_model.checkpoint.save_model` (no pretrained weights are read), in
    eval mode. A custom model's file names a factory, which is never imported from a file: build
    the model with it and load :func:`~ram_model.checkpoint.load_state_dict`."""
    blob = read_checkpoint(path)
    if ":" in blob["model_name"] or not blob["model_name"]:
        raise ValueError(f"{resolve_checkpoint(path)}: a custom model ({blob['model_name'] or 'factory unknown'}): "
                         "build it with its factory and load its weights with load_state_dict()")
    fields = blob.get("config")
    if not fields:  # only the registry's differences: the model would follow today's defaults
        raise ValueError(f"{resolve_checkpoint(path)}: written before model files stored their full config; "
                         "retrain it, or build the model and load its weights with load_state_dict()")
    tokenizer = tokenizer_from_state(blob["tokenizer"]) if blob.get("tokenizer") else None
    # every persistent tensor is loaded below (strict): no random init to overwrite
    model = create_unfilled_model(blob["model_name"], caption_tokenizer=tokenizer, **fields)
    state = blob["state_dict"]
    model.set_tags(blob["tag_names"], state["label_embed"], blob["thresholds"])
    model.load_state_dict(state, strict=True)
    model.checkpoint_extra = blob.get("extra", {})
    return model.to(device).eval()
