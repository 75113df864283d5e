"""Batched tagging and captioning of image files, bytes or PIL images with a saved model.

Preprocessing (shared with evaluation): RGB, bicubic resize to ``image_size x image_size``,
``[0, 1]`` scaling, ``(x - mean) / std`` from ``model.data_config``.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ram_model import registry
from ram_model.registry import load_model
from ram_model.text_encoder import TagEmbeddingCache

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, bytes, Image.Image]


def load_image(image: ImageInput) -> Image.Image:
    """A path, raw encoded bytes or a PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(Path(image)) as img:
            return img.convert("RGB")
    raise TypeError(f"unsupported image input {type(image).__name__}")


def preprocess(images: Sequence[Image.Image], data_config: dict) -> torch.Tensor:
    """PIL images -> normalised ``[B, 3, S, S]`` float tensor."""
    size = int(data_config["image_size"])
    mean = np.asarray(data_config["mean"], dtype=np.float32).reshape(1, 1, 3)
    std = np.asarray(data_config["std"], dtype=np.float32).reshape(1, 1, 3)
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (size, size):  # imported official models resize bilinearly, as their code did
            img = img.resize((size, size), Image.BILINEAR if data_config.get("interpolation") == "bilinear"
                             else Image.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std  # [S, S, 3]
        arrays.append(arr.transpose(2, 0, 1))
    if not arrays:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class TagSet:
    """An immutable tag set one call scores: names, text embeddings ``[C, text_dim]``, thresholds ``[C]``.

    Passed per call instead of swapped into the shared model, so concurrent calls with
    different tag sets (threads of a server) never see each other's tags."""

    names: tuple[str, ...]
    embeddings: torch.Tensor  # [C, text_dim]
    thresholds: np.ndarray  # [C] float32


class Tagger:
    """Tags (and captions) images with a :class:`ram_model.model.RamModel`.

    ``tag``/``scores`` never change the model: custom tag lists become a per-call
    :class:`TagSet` (embeddings from an in-memory per-name LRU over the disk cache), so one
    Tagger can serve concurrent threads. ``set_tags`` changes the default set (not thread-safe:
    call it before serving).
    """

    def __init__(self, model, device: str | torch.device = "cpu", batch_size: int = 32, text_encoder=None,
                 embedding_cache: TagEmbeddingCache | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self._text_encoder = text_encoder
        self._encoder_lock = threading.Lock()
        self.embedding_cache = embedding_cache if embedding_cache is not None else TagEmbeddingCache()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        batch_size: int = 32, **kwargs) -> "Tagger":
        return cls(load_model(path), device=device, batch_size=batch_size, **kwargs)

    @property
    def tag_names(self) -> list[str]:
        return list(self.model.tag_names)

    def text_encoder(self):
        """The model's text encoder, built once (lazily: only open-set calls need it)."""
        with self._encoder_lock:
            if self._text_encoder is None:
                self._text_encoder = registry.build_text_encoder(self.model.config.text_encoder)
            return self._text_encoder

    def default_tag_set(self) -> TagSet:
        """Snapshot of the model's own tag set."""
        m = self.model
        return TagSet(tuple(m.tag_names), m.label_embed, m.thresholds.detach().cpu().numpy().astype(np.float32))

    def tag_set(self, names: Sequence[str], embeddings: torch.Tensor | None = None, text_encoder=None,
                cache_dir: str | os.PathLike | None = None) -> TagSet:
        """A custom tag set: names embedded with the text encoder (memory LRU + disk cache) unless
        ``embeddings [C, text_dim]`` are given; names the model knows keep their thresholds,
        new ones get ``config.default_threshold``."""
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError("tag names must be unique")
        if embeddings is None:
            encoder = text_encoder or self.text_encoder()
            embeddings = self.embedding_cache.embed(names, encoder, self.model.config.prompt_templates, cache_dir)
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        if emb.shape != (len(names), self.model.config.text_dim):
            raise ValueError(f"embeddings must be [{len(names)}, {self.model.config.text_dim}], "
                             f"got {tuple(emb.shape)}")
        default = self.default_tag_set()
        known = dict(zip(default.names, default.thresholds.tolist()))
        thr = np.asarray([known.get(n, self.model.config.default_threshold) for n in names], dtype=np.float32)
        return TagSet(tuple(names), emb.to(self.device), thr)

    def set_tags(self, names: Sequence[str], embeddings: torch.Tensor | None = None, text_encoder=None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        """Make a custom tag list the default set (see :meth:`tag_set`); changes the model."""
        ts = self.tag_set(names, embeddings, text_encoder, cache_dir)
        self.model.set_tags(list(ts.names), ts.embeddings, torch.from_numpy(ts.thresholds))

    def _batches(self, images: Sequence, loader: Callable[[Any], Image.Image] = load_image):
        """Normalised ``[b, 3, S, S]`` batches; each image is decoded, resized and dropped before
        the next is decoded, so at most one full-size decoded image is alive per call."""
        for start in range(0, len(images), self.batch_size):
            rows = []
            for item in images[start : start + self.batch_size]:
                rows.append(preprocess([loader(item)], self.model.data_config))  # [1, 3, S, S]
            yield torch.cat(rows).to(self.device)

    @torch.no_grad()
    def scores(self, images: Sequence, tag_set: TagSet | None = None,
               loader: Callable[[Any], Image.Image] = load_image) -> np.ndarray:
        """Sigmoid scores ``[N, C]`` over ``tag_set`` (default: the model's tag set)."""
        ts = tag_set if tag_set is not None else self.default_tag_set()
        out = [torch.sigmoid(self.model.tag_logits(x, label_embed=ts.embeddings)).cpu()
               for x in self._batches(list(images), loader)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(ts.names)), dtype=np.float32)

    def tag(self, images: Sequence, threshold: float | None = None, top_k: int | None = None,
            tags: Sequence[str] | TagSet | None = None,
            loader: Callable[[Any], Image.Image] = load_image) -> list[list[tuple[str, float]]]:
        """Per image, ``(tag, score)`` pairs above the threshold (per-tag calibrated thresholds
        unless ``threshold`` is given), highest score first, at most ``top_k``.

        ``tags``: a custom tag list (or :class:`TagSet`) for this call only (open set); the
        model is not changed, so concurrent calls are independent. ``loader`` turns each item
        into a PIL image (default :func:`load_image`).
        """
        ts = tags if isinstance(tags, TagSet) else self.default_tag_set() if tags is None else self.tag_set(tags)
        scores = self.scores(images, ts, loader)  # [N, C]
        thr = np.full(scores.shape[1], threshold, dtype=np.float32) if threshold is not None else ts.thresholds
        results = []
        for row in scores:
            keep = np.flatnonzero(row >= thr)
            keep = keep[np.argsort(-row[keep], kind="stable")][:top_k]
            results.append([(ts.names[i], float(row[i])) for i in keep])
        return results

    @torch.no_grad()
    def caption(self, images: Sequence[ImageInput], tags: Sequence[Sequence[str]] | None = None) -> list[str]:
        """Greedy captions conditioned on ``tags`` or on the predicted tags."""
        images = list(images)
        out: list[str] = []
        for i, x in enumerate(self._batches(images)):
            chunk_tags = None if tags is None else tags[i * self.batch_size : i * self.batch_size + len(x)]
            out.extend(self.model.caption(x, chunk_tags))
        return out
