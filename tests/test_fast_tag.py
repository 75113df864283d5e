"""The fast tag path (oneDNN packed linears, cached window masks and queries) computes the same
logits as the official-layout model's reference modules."""

from __future__ import annotations

import pytest
import torch

from ram_model.fast_tag import can_use, fast_tag_logits, window_permutation
from ram_model.registry import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("ram_official_tiny", pretrained=False)
    m.set_tags([f"t{i}" for i in range(9)], torch.nn.functional.normalize(torch.randn(9, m.config.text_dim), dim=-1))
    with torch.no_grad():  # non-trivial LayerNorm / bias values, as in a trained model
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _reference(model, images, label_embed=None):
    with torch.no_grad():
        return model._decode_tags(model.encode_image(images)[0], label_embed=label_embed).logits


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_matches_reference(model, batch):
    images = torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        fast = fast_tag_logits(model, images)
    assert fast.shape == (batch, model.num_tags)
    torch.testing.assert_close(fast, _reference(model, images), atol=1e-5, rtol=0)


def test_custom_tag_set_and_rebuild_after_update(model):
    images = torch.randn(2, 3, 96, 96)
    other = torch.nn.functional.normalize(torch.randn(4, model.config.text_dim), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(fast_tag_logits(model, images, other), _reference(model, images, other),
                                   atol=1e-5, rtol=0)
        model.fc.bias.add_(1.0)  # an in-place weight update must not serve stale packed weights
        torch.testing.assert_close(fast_tag_logits(model, images), _reference(model, images), atol=1e-5, rtol=0)


def test_bf16_path_close(model):
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        fast = fast_tag_logits(model, images, dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    assert (fast - _reference(model, images)).abs().max() < 0.1


def test_only_used_for_inference(model):
    with torch.no_grad():
        assert can_use(model)
        assert not can_use(model, tag_ids=[0, 1])
        model.train()
        assert not can_use(model)
        model.eval()
    assert not can_use(model)  # autograd on


@pytest.mark.parametrize("shift", [0, 2])
def test_window_permutation_is_roll_then_partition(shift):
    res, w = 8, 4
    grid = torch.arange(res * res).view(1, res, res, 1)
    rolled = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    windows = rolled.view(1, res // w, w, res // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1)
    assert torch.equal(window_permutation(res, w, shift), windows)


def test_model_tag_logits_uses_fast_path(model):
    images = torch.randn(2, 3, 96, 96)
    model.__dict__.pop("_fast_tag_paths", None)
    with torch.no_grad():
        logits = model.tag_logits(images)
    assert torch.float32 in model.__dict__["_fast_tag_paths"]
    torch.testing.assert_close(logits, _reference(model, images), atol=1e-5, rtol=0)
