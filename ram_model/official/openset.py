"""Open-set tags for official RAM / RAM++ models: CLIP ViT-B/16 text embeddings, made the way the
official open-set code makes them.

A new tag of an imported model needs an embedding in the model's label space, i.e. from the text
encoder the checkpoint was trained with (CLIP ViT-B/16's text tower). ramflow ships no CLIP
weights: with a local open_clip weights file (``text_encoder="open_clip_ram:<file>"`` or
``$RAMFLOW_OPEN_CLIP_WEIGHTS``) the name is expanded with RAM's 63 open-set prompts, each prompt
embedded and L2-normalised, averaged and normalised again (RAM, and RAM++ without descriptions:
one embedding per tag). RAM++ descriptions (``[{"tag": ["description", ...]}, ...]``, the format of
the official LLM description files) give ``[C, D, 512]`` for :meth:`OfficialRamModel.set_tags`.
Without the weights every path raises :class:`TextEncoderUnavailable`; MiniLM is never used instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ram_model.checkpoint import read_checkpoint
from ram_model.text_encoder import OPEN_CLIP_WEIGHTS_ENV, TextEncoderUnavailable

log = logging.getLogger(__name__)

OPEN_CLIP_MODEL = "ViT-B-16-quickgelu"  # OpenAI's ViT-B/16 (QuickGELU), what RAM was trained with

# RAM's open-set prompt set ({article} = "an" before a vowel, else "a").
RAM_OPENSET_TEMPLATES: tuple[str, ...] = (
    "There is {article} {} in the scene.", "There is the {} in the scene.",
    "a photo of {article} {} in the scene.", "a photo of the {} in the scene.", "a photo of one {} in the scene.",
    "itap of {article} {}.", "itap of my {}.", "itap of the {}.",
    "a photo of {article} {}.", "a photo of my {}.", "a photo of the {}.", "a photo of one {}.",
    "a photo of many {}.", "a good photo of {article} {}.", "a good photo of the {}.",
    "a bad photo of {article} {}.", "a bad photo of the {}.", "a photo of a nice {}.", "a photo of the nice {}.",
    "a photo of a cool {}.", "a photo of the cool {}.", "a photo of a weird {}.", "a photo of the weird {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a clean {}.", "a photo of the clean {}.", "a photo of a dirty {}.", "a photo of the dirty {}.",
    "a bright photo of {article} {}.", "a bright photo of the {}.", "a dark photo of {article} {}.",
    "a dark photo of the {}.", "a photo of a hard to see {}.", "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.", "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.", "a cropped photo of the {}.", "a close-up photo of {article} {}.",
    "a close-up photo of the {}.", "a jpeg corrupted photo of {article} {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.", "a blurry photo of the {}.", "a pixelated photo of {article} {}.",
    "a pixelated photo of the {}.", "a black and white photo of the {}.",
    "a black and white photo of {article} {}.", "a plastic {}.", "the plastic {}.", "a toy {}.", "the toy {}.",
    "a plushie {}.", "the plushie {}.", "a cartoon {}.", "the cartoon {}.", "an embroidered {}.",
    "the embroidered {}.", "a painting of the {}.", "a painting of a {}.",
)


def openset_prompts(name: str) -> list[str]:
    """The 63 prompts of one tag name (lower-cased, "_" -> " ", "/" -> " or ", trailing dots cut;
    prompts starting with "a"/"the" get "This is " in front, as the official code does)."""
    text = name.replace("_", " ").replace("/", " or ").lower().rstrip(".")
    article = "an" if name[:1] in "aeiou" else "a"
    prompts = [t.format(text, article=article) for t in RAM_OPENSET_TEMPLATES]
    return ["This is " + p if p.startswith(("a", "the")) else p for p in prompts]


class OpenClipTextTower:
    """CLIP text tower from a local open_clip weights file -> L2-normalised ``[N, 512]``."""

    dim = 512

    def __init__(self, weights: str | Path, model_name: str = OPEN_CLIP_MODEL):
        self.weights = Path(weights)
        self.model_name = model_name
        stat = self.weights.stat()
        self.encoder_id = f"open_clip:{model_name}:{self.weights.name}:{stat.st_size}"
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        import open_clip  # lazy: optional open_clip

        model, _, _ = open_clip.create_model_and_transforms(self.model_name, pretrained=str(self.weights))
        self._model = model.eval()
        self._tokenizer = open_clip.get_tokenizer(self.model_name)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if self._model is None:
            self._load()
        if not texts:
            return torch.zeros(0, self.dim)
        return F.normalize(self._model.encode_text(self._tokenizer(list(texts))).float(), dim=-1)


class OfficialTagNameEncoder:
    """Tag names -> RAM's open-set embeddings ``[N, 512]`` (63 prompts averaged, see module doc)."""

    dim = 512

    def __init__(self, tower):
        self.tower = tower
        self.encoder_id = f"{tower.encoder_id}:ram-openset-63"

    @torch.no_grad()
    def encode(self, names: Sequence[str]) -> torch.Tensor:
        rows = []
        for name in names:
            emb = self.tower.encode(openset_prompts(name))  # [63, 512], each row normalised
            rows.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)


def missing_clip_message(config=None) -> str:
    model = getattr(config, "name", "this official model")
    return (f"{model}: new tag names need embeddings from the text encoder the checkpoint was trained with "
            f"(CLIP ViT-B/16's text tower), which ramflow does not ship. Give a local open_clip weights file "
            f"({OPEN_CLIP_MODEL}) as text_encoder='open_clip_ram:/path/to/weights' or in ${OPEN_CLIP_WEIGHTS_ENV}. "
            "MiniLM embeddings are not in this model's label space and are never used instead.")


def build_official_clip_encoder(weights: str | None, config=None) -> OfficialTagNameEncoder:
    """The official open-set encoder, or :class:`TextEncoderUnavailable` saying what is missing."""
    if not weights:
        raise TextEncoderUnavailable(missing_clip_message(config))
    if not Path(weights).is_file():
        raise TextEncoderUnavailable(f"CLIP text encoder weights not found: {weights}. " + missing_clip_message(config))
    try:
        import open_clip  # lazy: optional open_clip  # noqa: F401
    except ImportError:
        raise TextEncoderUnavailable("the open_clip package is not installed (pip install open_clip_torch); "
                                     + missing_clip_message(config)) from None
    return OfficialTagNameEncoder(OpenClipTextTower(weights))


def read_descriptions(path: str | Path) -> list[tuple[str, list[str]]]:
    """An official LLM description file: ``[{"tag": ["description", ...]}, ...]`` -> (tag, descriptions)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"{path}: entry {i} must be {{tag: [descriptions]}}")
        (tag, descs), = item.items()
        if not descs or not all(isinstance(d, str) for d in descs):
            raise ValueError(f"{path}: tag {tag!r} needs a non-empty list of description strings")
        out.append((tag, list(descs)))
    counts = {len(d) for _, d in out}
    if len(counts) > 1:
        raise ValueError(f"{path}: every tag needs the same number of descriptions (RAM++ reweights a fixed "
                         f"number per tag), got {sorted(counts)}")
    return out


def description_table(names: Sequence[str], path: str | Path, encoder) -> torch.Tensor:
    """``[C, D, 512]``: the descriptions of each of ``names`` in the file at ``path``, embedded by
    the CLIP tower (``encoder.tower`` of an :class:`OfficialTagNameEncoder`, else ``encoder``)."""
    items = dict(read_descriptions(path))
    missing = [n for n in names if n not in items]
    if missing:
        raise KeyError(f"{path} has no descriptions for {len(missing)} tag(s): {missing[:10]}")
    tower = getattr(encoder, "tower", encoder)
    return torch.stack([tower.encode(items[n]) for n in names])


def embed_descriptions(path: str | Path, tower) -> tuple[list[str], torch.Tensor]:
    """RAM++ description embeddings: names and ``[C, D, 512]`` (each description normalised)."""
    items = read_descriptions(path)
    emb = torch.stack([tower.encode(descs) for _, descs in items])  # [C, D, 512]
    return [tag for tag, _ in items], emb


class CheckpointTagBank:
    """Tag names -> the embeddings an imported RAM checkpoint already holds for them.

    Fine-tuning an official RAM on another label system (``text_encoder="checkpoint_tags:<model
    dir>"``): names the checkpoint knows keep its CLIP embeddings exactly; names it does not know
    are embedded by the CLIP encoder when one is configured (``$RAMFLOW_OPEN_CLIP_WEIGHTS``), else
    :class:`TextEncoderUnavailable` names them. Names are matched as prompts arrive
    (``"t_shirt"`` and ``"t shirt"`` are the same tag).
    """

    def __init__(self, checkpoint: str | Path, fallback=None):
        blob = read_checkpoint(checkpoint)
        names, table = list(blob["tag_names"]), blob["state_dict"]["label_embed"]
        if table.shape[0] != len(names):
            raise ValueError(f"{checkpoint}: {table.shape[0]} embeddings for {len(names)} tags (RAM++ description "
                             "tables cannot serve one embedding per name)")
        self.dim = int(table.shape[1])
        self.rows = {_bank_key(n): table[i] for i, n in enumerate(names)}
        self.fallback = fallback
        self.encoder_id = f"checkpoint_tags:{Path(checkpoint).resolve()}:{len(names)}" + (
            f"+{fallback.encoder_id}" if fallback is not None else "")

    def encode(self, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in names if _bank_key(n) not in self.rows]
        extra = {}
        if missing:
            if self.fallback is None:
                raise TextEncoderUnavailable(f"{len(missing)} tag(s) not in the imported checkpoint: {missing[:10]}. "
                                             + missing_clip_message())
            extra = dict(zip(missing, self.fallback.encode(missing)))
        if not names:
            return torch.zeros(0, self.dim)
        return torch.stack([self.rows[_bank_key(n)] if n in names and _bank_key(n) in self.rows else extra[n]
                            for n in names]).float()


def _bank_key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def build_checkpoint_bank(checkpoint: str, config=None) -> CheckpointTagBank:
    """``checkpoint_tags:<model dir>`` (+ the CLIP encoder of ``$RAMFLOW_OPEN_CLIP_WEIGHTS`` for new names)."""
    if not checkpoint:
        raise ValueError("checkpoint_tags needs a model folder or file: checkpoint_tags:/path/to/model")
    weights = os.environ.get(OPEN_CLIP_WEIGHTS_ENV)
    return CheckpointTagBank(checkpoint, build_official_clip_encoder(weights, config) if weights else None)
