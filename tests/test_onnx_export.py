"""ONNX export of the tag path: onnxruntime matches PyTorch within 1e-4, with a dynamic batch axis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from ram_model.checkpoint import save_model  # noqa: E402
from ram_model.onnx_export import OnnxExportConfig, export_checkpoint, export_tag_path, onnx_session  # noqa: E402
from ram_model.registry import create_model  # noqa: E402


def _tiny_model(name: str, tags: int = 7):
    torch.manual_seed(0)
    model = create_model(name, pretrained=False)
    per_tag = model.config.descriptions_per_tag
    names = [f"tag{i}" for i in range(tags)]
    emb = torch.nn.functional.normalize(torch.randn(tags * per_tag, model.config.text_dim), dim=-1)
    model.set_tags(names, emb, [0.5 + 0.01 * i for i in range(tags)])
    return model.eval()


@pytest.mark.parametrize("name,probs", [("ram_official_tiny", False), ("ram_official_tiny", True),
                                        ("ram_plus_official_tiny", False)])
def test_onnxruntime_matches_torch(tmp_path, name, probs):
    model = _tiny_model(name)
    path = export_tag_path(model, tmp_path / "tagger.onnx", probs=probs, trace_batch=2)
    session = onnx_session(path, threads=1)
    size = model.config.image_size
    for batch in (1, 3):  # neither is the traced batch size: the batch axis is dynamic
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model._decode_tags(model.encode_image(images)[0]).logits
        expected = torch.sigmoid(expected) if probs else expected
        (got,) = session.run(None, {"images": images.numpy()})
        assert got.shape == (batch, model.num_tags)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    meta = json.loads((tmp_path / "tagger.onnx.tags.json").read_text())
    assert meta["tag_names"] == model.tag_names
    assert meta["output"] == ("probs" if probs else "logits")
    assert meta["image_size"] == size and len(meta["thresholds"]) == model.num_tags


def test_export_from_checkpoint(tmp_path):
    model = _tiny_model("ram_official_tiny")
    ckpt = save_model(model, tmp_path / "ckpt")
    out = export_checkpoint(OnnxExportConfig(checkpoint=ckpt, out=tmp_path / "x" / "m.onnx", output="probs"))
    images = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    (got,) = onnx_session(out, threads=1).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = torch.sigmoid(model.tag_logits(images))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    assert not list((tmp_path / "x").glob("*.tmp"))


def test_export_needs_a_tag_set(tmp_path):
    model = create_model("ram_official_tiny", pretrained=False).eval()
    with pytest.raises(ValueError, match="no tag set"):
        export_tag_path(model, tmp_path / "m.onnx")
