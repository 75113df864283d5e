"""Offline caption tokenizers with one small interface.

``encode(texts, max_len) -> (ids LongTensor[B, L], mask LongTensor[B, L])`` where each row is
``BOS tokens... EOS PAD...``; ``decode(ids) -> list[str]`` stops at EOS and drops special tokens.
``state()`` returns primitive data saved inside checkpoints; :func:`tokenizer_from_state` rebuilds.

* :class:`WordPieceTokenizer` (default): the uncased BERT WordPiece vocab bundled with the MiniLM
  package, run by the ``tokenizers`` library (``[CLS]`` = BOS, ``[SEP]`` = EOS, ``[PAD]`` = 0).
* :class:`OfficialWordPieceTokenizer`: the same vocab + ``[DEC]``/``[ENC]`` (released RAM / Tag2Text).
* :class:`WordTokenizer`: fallback when that package is absent; a word-level vocab fitted from
  captions (``fit``) with a fixed capacity so the embedding size is known before fitting.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Iterable, Protocol, Sequence

import torch

from ram_model.text_encoder import minilm_model_dir

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class CaptionTokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]: ...

    def state(self) -> dict[str, Any]: ...


def _pack(rows: list[list[int]], max_len: int, pad_id: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate (keeping EOS last) and right-pad rows into ``ids, mask`` ``[B, max_len]``."""
    if max_len < 2:
        raise ValueError("max_len must be >= 2 (BOS + EOS)")
    ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max_len), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) > max_len:
            row = row[: max_len - 1] + [eos_id]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _rows(ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    return [list(r) for r in ids]


class WordPieceTokenizer:
    """Uncased BERT WordPiece from a vocab list (``tokenizers`` library, fully offline)."""

    kind = "wordpiece"

    def __init__(self, vocab: Sequence[str]):
        from tokenizers import BertWordPieceTokenizer  # lazy: tokenizers, only for the MiniLM vocab

        self.vocab = list(vocab)
        index = {tok: i for i, tok in enumerate(self.vocab)}
        self._tok = BertWordPieceTokenizer(index, lowercase=True)
        self.vocab_size = len(self.vocab)
        self.pad_id = index["[PAD]"]
        self.bos_id = index["[CLS]"]
        self.eos_id = index["[SEP]"]
        self._special = {index[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]") if t in index}

    @classmethod
    def from_minilm(cls) -> "WordPieceTokenizer":
        lines = (minilm_model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
        return cls(lines)

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.ids for e in self._tok.encode_batch(list(texts))]  # [CLS] ... [SEP]
        return _pack(rows, max_len, self.pad_id, self.eos_id)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        out = []
        for row in _rows(ids):
            kept = []
            for t in row[1:] if row and row[0] == self.bos_id else row:
                if t == self.eos_id:
                    break
                if t not in self._special:
                    kept.append(t)
            out.append(self._tok.decode(kept, skip_special_tokens=True).strip())
        return out

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": list(self.vocab)}


class OfficialWordPieceTokenizer(WordPieceTokenizer):
    """The tokenizer of the released RAM / Tag2Text checkpoints: bert-base-uncased (the MiniLM
    package ships the same ``vocab.txt``, sha256 07eced37...) plus ``[DEC]`` (BOS of captions,
    id 30522) and ``[ENC]`` (first token of the tag encoder's input, id 30523): 30524 ids."""

    kind = "wordpiece_official"
    EXTRA = ("[DEC]", "[ENC]")

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        vocab += [t for t in self.EXTRA if t not in vocab]
        super().__init__(vocab)
        self.bos_id = vocab.index("[DEC]")
        self.enc_id = vocab.index("[ENC]")
        self._special |= {self.bos_id, self.enc_id}

    def encode_tags(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tag-encoder input: ``[ENC] tokens... [SEP]`` right-padded to ``max_len`` (ids, mask)."""
        ids, mask = self.encode(texts, max_len)
        ids[:, 0] = self.enc_id
        return ids, mask

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[DEC] tokens... [SEP]`` (captions start with BOS = [DEC], as in Tag2Text training)."""
        rows = [[self.bos_id] + e.ids[1:] for e in self._tok.encode_batch(list(texts))]
        return _pack(rows, max_len, self.pad_id, self.eos_id)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``[DEC]`` + the prompt's tokens, without the final ``[SEP]`` (what generation extends)."""
        return [self.bos_id] + self._tok.encode(prompt).ids[1:-1]

    @classmethod
    def from_minilm(cls) -> "OfficialWordPieceTokenizer":
        return cls((minilm_model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines())

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": list(self.vocab[: len(self.vocab) - len(self.EXTRA)])}


class WordTokenizer:
    """Lower-cased word/punctuation vocabulary fitted from captions, fixed capacity."""

    kind = "word"
    SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

    def __init__(self, capacity: int = 8000, words: Sequence[str] = ()):
        if capacity <= len(self.SPECIALS):
            raise ValueError("capacity too small")
        self.capacity = capacity
        self.vocab_size = capacity
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)
        self.words: list[str] = list(self.SPECIALS)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        self._add(words)

    def _add(self, words: Iterable[str]) -> None:
        for w in words:
            if w not in self.index and len(self.words) < self.capacity:
                self.index[w] = len(self.words)
                self.words.append(w)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())

    def fit(self, captions: Iterable[str]) -> "WordTokenizer":
        """Add the most frequent words of ``captions`` until the capacity is reached."""
        counts = Counter(w for c in captions for w in self.split(c))
        self._add(w for w, _ in counts.most_common())
        return self

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.bos_id] + [self.index.get(w, self.unk_id) for w in self.split(t)] + [self.eos_id]
                for t in texts]
        return _pack(rows, max_len, self.pad_id, self.eos_id)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        out = []
        for row in _rows(ids):
            words = []
            for t in row:
                if t == self.eos_id:
                    break
                if t in (self.pad_id, self.bos_id):
                    continue
                words.append(self.words[t] if t < len(self.words) else "[UNK]")
            text = " ".join(words)
            out.append(re.sub(r" ([.,!?;:)])", r"\1", text))
        return out

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "capacity": self.capacity, "words": list(self.words[len(self.SPECIALS):])}


def build_tokenizer(kind: str, word_vocab_size: int = 8000) -> CaptionTokenizer:
    """``"wordpiece"`` (falls back to an unfitted ``"word"`` tokenizer if MiniLM is absent) or ``"word"``."""
    if kind == "wordpiece":
        try:
            return WordPieceTokenizer.from_minilm()
        except (RuntimeError, FileNotFoundError):
            logging.getLogger(__name__).warning(
                "MiniLM vocab not available; using a word-level tokenizer (call .fit(captions))"
            )
            return WordTokenizer(word_vocab_size)
    if kind == "word":
        return WordTokenizer(word_vocab_size)
    if kind == "wordpiece_official":  # no fallback: the official ids must be bert-base-uncased's
        return OfficialWordPieceTokenizer.from_minilm()
    raise KeyError(f"unknown tokenizer {kind!r}")


def tokenizer_from_state(state: dict[str, Any]) -> CaptionTokenizer:
    if state["kind"] == "wordpiece":
        return WordPieceTokenizer(state["vocab"])
    if state["kind"] == "wordpiece_official":
        return OfficialWordPieceTokenizer(state["vocab"])
    if state["kind"] == "word":
        return WordTokenizer(state["capacity"], state["words"])
    raise KeyError(f"unknown tokenizer state kind {state['kind']!r}")
