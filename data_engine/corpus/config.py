"""Configuration of the embedded corpus (the ``corpus:`` section of ``params.yaml``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_engine.corpus.vocab import OBJECT_NAMES

DEFAULT_HELD_OUT: tuple[str, ...] = ("butterfly", "cat", "truck", "windmill")
"""Object classes that only ever appear in ``test`` images (open-set evaluation)."""


class CorpusConfig(BaseModel):
    """All knobs of the synthetic image-text generator.

    Item ``i`` of a split is generated from a seed derived from ``(seed, split, i)`` only,
    so any slice of any split can be produced independently, in any order, with flat memory.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    seed: int = 0
    image_size: int = Field(96, ge=32, le=1024)
    n_pretrain: int = Field(5000, ge=0)
    n_finetune: int = Field(500, ge=0)
    n_test: int = Field(1000, ge=0)
    # Web-like caption noise of the noisy splits (``pretrain`` and ``test``); ``finetune``
    # captions are always complete and correct (omit 0, hallucinate 0).
    omit_rate: float = Field(0.4, ge=0.0, lt=1.0)
    """Probability that a present object class (or the scene) is left out of the caption."""
    hallucinate_rate: float = Field(0.1, ge=0.0, lt=0.9)
    """Expected fraction of the mentioned object classes that are absent from the image."""
    synonym_rate: float = Field(0.3, ge=0.0, le=1.0)
    """Probability that a tag with WordNet synonyms is written with one of them."""
    attribute_rate: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a mentioned object gets its colour adjective (noisy splits)."""
    pattern_rate: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a striped/dotted object is described with its pattern."""
    verb_rate: float = Field(0.3, ge=0.0, le=1.0)
    """Probability that an object phrase gets an action ("a dog running")."""
    filler_rate: float = Field(0.6, ge=0.0, le=1.0)
    """Probability of non-visual words ("lovely", "my vacation", "photo of")."""
    held_out: list[str] = Field(default_factory=lambda: list(DEFAULT_HELD_OUT))
    max_classes: int = Field(4, ge=1, le=8)
    """Most distinct object classes in one image (at least one is always drawn)."""
    max_instances: int = Field(3, ge=1, le=6)
    """Most instances of one class in one image."""
    min_object_frac: float = Field(0.25, gt=0.05, lt=1.0)
    max_object_frac: float = Field(0.45, gt=0.05, le=1.0)
    """Object size: sqrt(box width * box height) as a fraction of the image side."""
    max_overlap: float = Field(0.3, ge=0.0, le=1.0)
    """Placement tries to keep intersection / smaller-box area below this."""

    @field_validator("held_out")
    @classmethod
    def _known_classes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(OBJECT_NAMES))
        if unknown:
            raise ValueError(f"held_out names are not object classes: {unknown}")
        if len(set(value)) > len(OBJECT_NAMES) - 8:
            raise ValueError("held_out leaves fewer than 8 trainable object classes")
        return sorted(set(value))

    @model_validator(mode="after")
    def _sizes(self) -> "CorpusConfig":
        if self.min_object_frac > self.max_object_frac:
            raise ValueError("min_object_frac must be <= max_object_frac")
        return self
