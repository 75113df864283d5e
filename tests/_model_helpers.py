"""Shared helpers of the model-package tests: a deterministic fake text encoder and tiny models."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

TAGS = ["cat", "dog", "tree", "sky", "red"]


class FakeTextEncoder:
    """Deterministic hash-seeded embeddings (no model files); counts calls to test the cache."""

    encoder_id = "fake-hash-encoder"

    def __init__(self, dim: int = 384):
        self.dim = dim
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(rows), dim=-1) if rows else torch.zeros(0, self.dim)


def fake_embeddings(names, dim: int = 384) -> torch.Tensor:
    return FakeTextEncoder(dim).encode(list(names))


def tiny_model(tags=TAGS, **overrides):
    """ram_tiny with fake tag embeddings (no text-encoder load), seeded."""
    from ram_model.registry import create_model

    torch.manual_seed(0)
    return create_model("ram_tiny", tag_names=list(tags), tag_embeddings=fake_embeddings(tags), **overrides)
