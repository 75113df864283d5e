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
