"""Tiny shards, label files and a stand-in model for the training tests (no shared data needed).

``TinyTagger`` follows the model contract (``model(batch) -> {"loss", "loss_tag", ...}``,
``data_config``, ``tokenizer.encode``, ``set_tags``), has dropout (so RNG restore matters) and
trains in milliseconds. Tests that need the real thing use ``create_model("ram_tiny")``.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch
from torch import nn

from ramflow_io.formats import labels_path, shard_path

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TAGS = ["red", "green", "blue", "yellow", "square", "wide"]


def _jpeg(rgb: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_split(root: Path, split: str, shard_sizes: list[int], unlabeled_every: int = 0, seed: int = 0) -> list[str]:
    """Write shards of coloured images + ``labels/{split}.parquet``; return the labelled keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ramflow_io.shards import ShardWriter

    rng = random.Random(seed)
    keys, rows, n = [], [], 0
    for i, size in enumerate(shard_sizes):
        with ShardWriter(shard_path(root, split, i)) as w:
            for _ in range(size):
                key = f"{split}_{n:05d}"
                color = rng.choice(list(COLORS))
                wh = rng.choice([(32, 32), (48, 24)])
                shape = "square" if wh[0] == wh[1] else "wide"
                meta = {"key": key, "split": split, "source": "test", "width": wh[0], "height": wh[1], "sha256": "",
                        "truth": {"tags": [color, shape]}}
                w.write(key, _jpeg(COLORS[color], wh), f"a {color} {shape} thing", meta)
                ids = [TAGS.index(color), TAGS.index(shape)]
                if not (unlabeled_every and n % unlabeled_every == unlabeled_every - 1):
                    rows.append((key, ids))
                    keys.append(key)
                n += 1
    out = labels_path(root, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": [k for k, _ in rows], "parse_label_ids": [ids for _, ids in rows]}), out)
    return keys


def write_label_system(root: Path) -> Path:
    from data_engine.label_system import Label, LabelSystem

    return LabelSystem([Label(i, name) for i, name in enumerate(TAGS)]).save(root / "label_system")


def labelled_root(root: Path, shard_sizes: list[int], unlabeled_every: int = 0) -> Path:
    """A data root with a labelled ``pretrain`` split of ``shard_sizes`` shards and the label system."""
    make_split(root, "pretrain", shard_sizes, unlabeled_every=unlabeled_every)
    write_label_system(root)
    return root



class CharTokenizer:
    """Bytes as token ids (0 = pad): enough for a caption loss in tests."""

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode("utf-8"))[:max_len]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long) + 1
        return ids, (ids > 0).long()


class TinyTagger(nn.Module):
    """Conv -> pooled features -> tag logits (+ a bag-of-bytes caption head)."""

    def __init__(self, num_classes: int = len(TAGS), image_size: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.data_config = {"image_size": image_size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        self.tokenizer = CharTokenizer()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.tag_head = nn.Linear(8, num_classes)
        self.cap_head = nn.Linear(8 + num_classes, 258)
        self.tag_names: list[str] = []

    def set_tags(self, names: list[str], embeddings: torch.Tensor | None = None) -> None:
        self.tag_names = list(names)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        feat = self.drop(torch.relu(self.conv(batch["image"])).mean((2, 3)))  # [B,8]
        logits = self.tag_head(feat)  # [B,C]
        ids = batch.get("tag_ids")  # [K] or [B,K]: the trained subset (ram_model.query_sampling)
        if ids is not None:
            logits = logits[:, ids] if ids.ndim == 1 else logits.gather(1, ids)  # [B,K]
        loss_tag = nn.functional.binary_cross_entropy_with_logits(logits, batch["tag_targets"],
                                                                  weight=batch.get("tag_weights"))
        out = {"logits": logits, "loss_tag": loss_tag}
        loss = loss_tag
        if "caption_ids" in batch:
            cap = self.cap_head(torch.cat([feat, batch["parse_targets"]], 1)).log_softmax(-1)  # [B,258]
            tok = batch["caption_ids"]  # [B,L]
            nll = -cap.gather(1, tok) * batch["caption_mask"]
            out["loss_caption"] = nll.sum() / batch["caption_mask"].sum().clamp(min=1)
            loss = loss + 0.1 * out["loss_caption"]
        out["loss"] = loss
        return out


def tiny_tagger(tag_names: list[str] | None = None, **overrides) -> TinyTagger:
    """Factory for ``TrainStageConfig(model="_train_helpers:tiny_tagger")``."""
    model = TinyTagger(num_classes=len(tag_names) if tag_names else len(TAGS), **overrides)
    if tag_names:
        model.set_tags(tag_names)
    return model


def dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


class CodeOnLoad:
    """Unpickling this object runs code (writes ``marker``): a stand-in for a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def write_code_pickle(path: Path, marker: Path, **fields) -> Path:
    """``torch.save`` a dict whose ``state_dict`` runs code when unpickled (other keys: ``fields``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "state_dict": {"conv.weight": CodeOnLoad(marker)}}, path)
    return path
