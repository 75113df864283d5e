"""Batched tagging and captioning of image files, bytes or PIL images with a saved model.

Preprocessing (shared with evaluation): RGB, bicubic resize to ``image_size x image_size``,
``[0, 1]`` scaling, ``(x - mean) / std`` from ``model.data_config``.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

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


class Tagger:
    """Tags (and captions) images with a :class:`ram_model.model.RamModel`."""

    def __init__(self, model, device: str | torch.device = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        batch_size: int = 32) -> "Tagger":
        from ram_model.checkpoint import load_model

        return cls(load_model(path), device=device, batch_size=batch_size)

    @property
    def tag_names(self) -> list[str]:
        return list(self.model.tag_names)

    def set_tags(self, names: Sequence[str], embeddings: torch.Tensor | None = None, text_encoder=None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        """Use a custom tag list; names are embedded with the model's text encoder (disk-cached)
        unless ``embeddings [C, text_dim]`` are given. Known names keep their thresholds."""
        if embeddings is None:
            from ram_model.text_encoder import build_text_encoder, embed_tag_names

            encoder = text_encoder or build_text_encoder(self.model.config.text_encoder)
            embeddings = embed_tag_names(list(names), encoder, self.model.config.prompt_templates, cache_dir)
        self.model.set_tags(list(names), embeddings)

    def _batches(self, images: Sequence[ImageInput]):
        for start in range(0, len(images), self.batch_size):
            pil = [load_image(x) for x in images[start : start + self.batch_size]]
            yield preprocess(pil, self.model.data_config).to(self.device)

    @torch.no_grad()
    def scores(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Sigmoid scores ``[N, C]`` over the current tag set."""
        out = [torch.sigmoid(self.model.tag_logits(x)).cpu() for x in self._batches(list(images))]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.num_tags), dtype=np.float32)

    def tag(self, images: Sequence[ImageInput], threshold: float | None = None, top_k: int | None = None,
            tags: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
        """Per image, ``(tag, score)`` pairs above the threshold (per-tag calibrated thresholds
        unless ``threshold`` is given), highest score first, at most ``top_k``.

        ``tags``: a custom tag list for this call only (open set; embedded via the text-encoder
        cache), the model's tag set is restored afterwards.
        """
        if tags is not None:
            saved = (list(self.model.tag_names), self.model.label_embed.clone(), self.model.thresholds.clone())
            try:
                self.set_tags(list(tags))
                return self.tag(images, threshold=threshold, top_k=top_k)
            finally:
                self.model.set_tags(*saved)
        scores = self.scores(images)
        thr = (np.full(scores.shape[1], threshold, dtype=np.float32) if threshold is not None
               else self.model.thresholds.cpu().numpy())
        names = self.model.tag_names
        results = []
        for row in scores:
            keep = np.flatnonzero(row >= thr)
            keep = keep[np.argsort(-row[keep], kind="stable")][:top_k]
            results.append([(names[i], float(row[i])) for i in keep])
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
