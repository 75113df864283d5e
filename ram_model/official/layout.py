"""Key mapping between the released RAM / RAM++ / Tag2Text state dicts and :class:`OfficialRamModel`.

Official -> ramflow:

* ``visual_encoder``: the official Swin runs a stage's patch merging at the *end* of that stage
  (``layers.i.downsample``), timm at the *start* of the next (``layers.{i+1}.downsample``); block
  keys are the same. ``relative_position_bias_table`` is resampled (bicubic) when the window
  differs; ``relative_position_index`` / ``attn_mask`` are computed buffers and are dropped.
* BERT containers are renamed (``tagging_head.encoder.layer.N`` -> ``tagging_head.N``,
  ``tag_encoder.encoder.layer.N`` -> ``tag_encoder.layers.N``, ``text_decoder.bert.*`` ->
  ``text_decoder.*``, ``text_decoder.cls.predictions`` -> ``text_decoder.lm_head``); layer
  contents keep BERT's names. ``position_ids`` buffers are dropped (computed).
* Ties: the LM head's ``decoder.weight`` / ``decoder.bias`` are the word embeddings / the head
  bias; the tag encoder's first layers share modules with the tagging head. Every source of one
  tied tensor must hold the same values.
* ``vision_multi`` (the tagging head's old name) is read as ``tagging_head``; Tag2Text's
  ``label_embed.weight`` becomes ``label_embed``.

Every official key must be used and every model tensor set: anything else raises
:class:`LayoutError` naming the keys.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Mapping

import torch
import torch.nn as nn

COMPUTED_BUFFERS = ("relative_position_index", "attn_mask", "position_ids")
SET_BY_TAGS = ("thresholds",)  # model state that comes from the tag resources, not the checkpoint

_RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^tagging_head\.encoder\.layer\.(\d+)\.", r"tagging_head.\1."),
    (r"^tag_encoder\.encoder\.layer\.(\d+)\.", r"tag_encoder.layers.\1."),
    (r"^text_decoder\.bert\.encoder\.layer\.(\d+)\.", r"text_decoder.layers.\1."),
    (r"^text_decoder\.bert\.embeddings\.", "text_decoder.embeddings."),
    (r"^text_decoder\.cls\.predictions\.transform\.", "text_decoder.lm_head.transform."),
    (r"^text_decoder\.cls\.predictions\.(?:decoder\.)?bias$", "text_decoder.lm_head.bias"),
    (r"^text_decoder\.cls\.predictions\.decoder\.weight$", "text_decoder.embeddings.word_embeddings.weight"),
    (r"^label_embed\.weight$", "label_embed"),
))
_DOWNSAMPLE = re.compile(r"^visual_encoder\.layers\.(\d+)\.downsample\.")
_TIMM_DOWNSAMPLE = re.compile(r"^visual_encoder\.layers\.(\d+)\.downsample\.")


class LayoutError(ValueError):
    """The checkpoint does not fit the model (unused / missing keys, shapes, ties)."""


def unwrap_state(blob: Mapping) -> dict[str, torch.Tensor]:
    """``{"model": state_dict}`` or a bare state dict -> state dict, ``vision_multi`` renamed."""
    if not isinstance(blob, Mapping):
        raise LayoutError(f"expected a dict, got {type(blob).__name__}")
    state = blob["model"] if isinstance(blob.get("model"), Mapping) else blob
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LayoutError(f"not a state dict: non-tensor entries {bad[:5]}")
    return {re.sub(r"^vision_multi\.", "tagging_head.", k): v for k, v in state.items()}


def ramflow_key(key: str) -> str:
    """Official key -> ramflow key (computed buffers are filtered out before)."""
    match = _DOWNSAMPLE.match(key)
    if match:
        return f"visual_encoder.layers.{int(match[1]) + 1}.downsample.{key[match.end():]}"
    for pattern, repl in _RENAMES:
        new, count = pattern.subn(repl, key)
        if count:
            return new
    return key


def resize_rel_pos_table(table: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[(2w-1)^2, heads]`` -> ``shape``, bicubic over the (2w-1) x (2w-1) offset grid."""
    src, dst = int(round(table.shape[0] ** 0.5)), int(round(shape[0] ** 0.5))
    if src * src != table.shape[0] or dst * dst != shape[0] or table.shape[1] != shape[1]:
        raise LayoutError(f"cannot resize a relative position table {tuple(table.shape)} to {shape}")
    grid = table.T.reshape(1, table.shape[1], src, src).float()
    out = torch.nn.functional.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.reshape(table.shape[1], dst * dst).T.contiguous().to(table.dtype)


def alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys of ``model`` that are one tensor (tied modules), groups of 2+."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups[id(tensor)].append(name)
    return [names for names in groups.values() if len(names) > 1]


def map_official_state(official: Mapping[str, torch.Tensor], model: nn.Module,
                       log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Official state dict -> ``model``'s state dict (every key checked; see the module docstring)."""
    own = model.state_dict()
    sources: dict[str, list[str]] = defaultdict(list)
    dropped, unused, resized = [], [], []
    out: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        if key.endswith(COMPUTED_BUFFERS):
            dropped.append(key)
            continue
        target = ramflow_key(key)
        if target not in own or target in SET_BY_TAGS:
            unused.append(key)
            continue
        want = tuple(own[target].shape)
        if tuple(value.shape) != want:
            if target.endswith("relative_position_bias_table"):
                value = resize_rel_pos_table(value, want)
                resized.append(key)
            else:
                raise LayoutError(f"shape of {key} {tuple(value.shape)} does not fit {target} {want}")
        sources[target].append(key)
        if target in out and not torch.equal(out[target], value):
            raise LayoutError(f"tied weights differ: {' vs '.join(sources[target])}")
        out[target] = value
    if unused:
        raise LayoutError(f"{len(unused)} checkpoint key(s) left unused: {unused[:20]}")
    unset = sorted(set(own) - set(out) - set(SET_BY_TAGS))
    if unset:
        raise LayoutError(f"{len(unset)} model key(s) left unset: {unset[:20]}")
    for group in alias_groups(model):
        present = [k for k in group if k in out]
        for k in present[1:]:
            if not torch.equal(out[present[0]], out[k]):
                raise LayoutError(f"tied weights differ: {sources[present[0]]} vs {sources[k]}")
    if log is not None:
        log(f"mapped {len(out)} tensors from {len(official)} keys ({len(dropped)} computed buffers dropped, "
            f"{len(resized)} relative position tables resized)")
    return out


def _official_key(key: str) -> list[str]:
    """ramflow key -> the official key(s) holding it (inverse of :func:`ramflow_key`)."""
    match = _TIMM_DOWNSAMPLE.match(key)
    if match:
        return [f"visual_encoder.layers.{int(match[1]) - 1}.downsample.{key[match.end():]}"]
    inverse = (
        (r"^tagging_head\.(\d+)\.", r"tagging_head.encoder.layer.\1."),
        (r"^tag_encoder\.layers\.(\d+)\.", r"tag_encoder.encoder.layer.\1."),
        (r"^text_decoder\.layers\.(\d+)\.", r"text_decoder.bert.encoder.layer.\1."),
        (r"^text_decoder\.lm_head\.transform\.", "text_decoder.cls.predictions.transform."),
    )
    if key == "text_decoder.lm_head.bias":
        return ["text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.decoder.bias"]
    if key == "text_decoder.embeddings.word_embeddings.weight":
        return ["text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight"]
    if key.startswith("text_decoder.embeddings."):
        return ["text_decoder.bert." + key[len("text_decoder."):]]
    for pattern, repl in inverse:
        new, count = re.subn(pattern, repl, key)
        if count:
            return [new]
    return [key]


def export_official_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official keys (no computed buffers): what the released
    checkpoints hold. Used to check the mapping both ways and to write official-layout test weights."""
    label_key = "label_embed.weight" if getattr(model, "arch", "") == "tag2text" else "label_embed"
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in SET_BY_TAGS:
            continue
        for official in ([label_key] if key == "label_embed" else _official_key(key)):
            out[official] = value
    return out
