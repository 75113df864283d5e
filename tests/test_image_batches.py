"""Images are decoded to uint8 per sample and normalised once per batch: the tensors are the
ones per-image normalisation gave (bit for bit), for training (crop, flip) and evaluation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ram_model.data import AugmentConfig, image_to_tensor, image_to_uint8, iter_eval_batches, normalize_batch


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _per_image_reference(jpeg: bytes, aug: AugmentConfig, rng: random.Random | None) -> torch.Tensor:
    """The normalisation as it was done per image: float32 / 255, then (x - mean) / std."""
    arr = image_to_uint8(jpeg, aug, rng).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(aug.mean).view(3, 1, 1)) / torch.tensor(aug.std).view(3, 1, 1)


AUGS = [AugmentConfig(image_size=32, random_crop=False),
        AugmentConfig(image_size=24, random_crop=True, hflip=1.0),
        AugmentConfig(image_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]


@pytest.mark.parametrize("aug", AUGS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_normalisation_equals_per_image_normalisation(aug, train):
    jpegs = [_jpeg(i, (40 + 3 * i, 30 + i)) for i in range(5)]
    rngs = (lambda i: random.Random(f"0-0-{i}")) if train else (lambda i: None)
    batch = normalize_batch([image_to_uint8(j, aug, rngs(i)) for i, j in enumerate(jpegs)], aug)
    assert batch.shape == (5, 3, aug.image_size, aug.image_size) and batch.dtype == torch.float32
    for i, j in enumerate(jpegs):
        assert torch.equal(batch[i], _per_image_reference(j, aug, rngs(i)))
        assert torch.equal(batch[i], image_to_tensor(j, aug, rngs(i)))


def test_uint8_image_is_the_resized_picture():
    aug = AugmentConfig(image_size=8, random_crop=False)
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 60)).save(buf, "PNG")  # lossless: exact colour
    arr = image_to_uint8(buf.getvalue(), aug, None)
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 3)
    assert (arr == np.array([200, 10, 60], dtype=np.uint8)).all()


def test_eval_batches_cover_every_selected_key_once(tmp_path):
    import webdataset as wds

    shard = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(7):
            sink.write({"__key__": f"k{i}", "jpg": _jpeg(i, (20, 20)), "txt": f"caption {i}".encode()})
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": b"x"})
    aug = AugmentConfig(image_size=16, random_crop=False)
    keys = {f"k{i}" for i in range(6)} | {"broken"}
    batches = list(iter_eval_batches([shard], keys, aug, batch_size=4))
    assert [len(b["keys"]) for b in batches] == [4, 2]  # k6 not selected, the broken one skipped
    assert sorted(k for b in batches for k in b["keys"]) == sorted(keys - {"broken"})
    first = batches[0]
    assert first["image"].shape == (4, 3, 16, 16)
    assert torch.equal(first["image"][1], image_to_tensor(_jpeg(1, (20, 20)), aug, None))
    assert first["captions"][1] == "caption 1"
