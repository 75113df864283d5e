"""save_model / load_model round trip through torch.load(weights_only=True)."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import TAGS, tiny_model
from ram_model.checkpoint import load_model, load_state_dict, read_checkpoint, save_checkpoint, save_model
from ram_model.tokenizer import WordTokenizer


def test_round_trip_weights_only(tmp_path):
    model = tiny_model(decoder_layers=1, mean=(0.4, 0.4, 0.4)).eval()
    model.set_tags(TAGS, model.label_embed, thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    path = save_model(model, tmp_path / "m.pt", {"epoch": 3, "metrics": {"mAP": 0.5}})
    blob = torch.load(path, weights_only=True)  # only tensors / primitives inside
    assert blob["model_name"] == "ram_tiny" and blob["overrides"] == {"decoder_layers": 1, "mean": [0.4, 0.4, 0.4]}
    loaded = load_model(path)
    assert loaded.tag_names == TAGS and loaded.config == model.config
    assert loaded.thresholds.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert loaded.checkpoint_extra == {"epoch": 3, "metrics": {"mAP": 0.5}}
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.tag_logits(x), model.tag_logits(x))
        assert loaded.caption(x) == model.caption(x)


def test_checkpoint_keeps_its_config_when_registry_defaults_change(tmp_path, monkeypatch):
    """The full config is stored: a registry default changed after saving (here the decoder
    depth) does not change the model that loads, and the weights still load strictly."""
    import dataclasses

    from ram_model import registry

    model = tiny_model().eval()
    path = save_model(model, tmp_path / "m.pt")
    assert read_checkpoint(path)["config"]["decoder_layers"] == model.config.decoder_layers == 2
    changed = dict(registry.MODEL_CONFIGS)
    changed["ram_tiny"] = dataclasses.replace(changed["ram_tiny"], decoder_layers=3, tag_prior=None)
    monkeypatch.setattr(registry, "MODEL_CONFIGS", changed)
    assert registry.get_config("ram_tiny").decoder_layers == 3
    loaded = load_model(path)
    assert loaded.config == model.config and len(loaded.tagging_head) == 2
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.tag_logits(x), model.tag_logits(x))


def test_model_folder_and_word_tokenizer(tmp_path):
    tok = WordTokenizer(64).fit(["a red cat", "a blue dog"])
    model = tiny_model(tokenizer="word", word_vocab_size=64, caption_tokenizer=tok)
    assert model.text_decoder.word_embeddings.num_embeddings == 64
    path = save_checkpoint(model, tmp_path / "stage", thresholds=[0.3] * len(TAGS))
    assert path.name == "model.pt" and (tmp_path / "stage" / "thresholds.json").exists()
    loaded = load_model(tmp_path / "stage")
    assert loaded.tokenizer.words == tok.words and loaded.thresholds.tolist() == pytest.approx([0.3] * len(TAGS))
    assert set(load_state_dict(tmp_path / "stage")) == set(model.state_dict())
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        read_checkpoint(tmp_path / "bad.pt")
