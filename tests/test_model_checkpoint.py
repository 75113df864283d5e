"""The one model file format: save_model / read_checkpoint / load_model through torch.load(weights_only=True)."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import TAGS, tiny_model
from ram_model.checkpoint import FORMAT, LEGACY_STATE_FORMAT, load_state_dict, read_checkpoint, save_model
from ram_model.registry import load_model
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

    from ram_model import configs

    model = tiny_model().eval()
    path = save_model(model, tmp_path / "m.pt")
    assert read_checkpoint(path)["config"]["decoder_layers"] == model.config.decoder_layers == 2
    changed = dict(configs.MODEL_CONFIGS)
    changed["ram_tiny"] = dataclasses.replace(changed["ram_tiny"], decoder_layers=3, tag_prior=None)
    monkeypatch.setattr(configs, "MODEL_CONFIGS", changed)
    assert configs.get_config("ram_tiny").decoder_layers == 3
    loaded = load_model(path)
    assert loaded.config == model.config and len(loaded.tagging_head) == 2
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.tag_logits(x), model.tag_logits(x))


def test_model_folder_and_word_tokenizer(tmp_path):
    tok = WordTokenizer(64).fit(["a red cat", "a blue dog"])
    model = tiny_model(tokenizer="word", word_vocab_size=64, caption_tokenizer=tok)
    assert model.text_decoder.word_embeddings.num_embeddings == 64
    path = save_model(model, tmp_path / "stage", thresholds=[0.3] * len(TAGS))
    assert path.name == "model.pt" and (tmp_path / "stage" / "thresholds.json").exists()
    loaded = load_model(tmp_path / "stage")
    assert loaded.tokenizer.words == tok.words and loaded.thresholds.tolist() == pytest.approx([0.3] * len(TAGS))
    assert set(load_state_dict(tmp_path / "stage")) == set(model.state_dict())
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        read_checkpoint(tmp_path / "bad.pt")


def test_a_custom_model_is_saved_in_the_same_format_and_read_by_the_same_reader(tmp_path):
    """A ``module:factory`` model (tests, experiments) gets the one format, with its factory and
    keyword arguments in place of a registry config; its weights load through the one reader,
    and load_model refuses to import the factory a file names."""
    from _train_helpers import tiny_tagger

    model = tiny_tagger(["a", "b", "c"], image_size=16)
    path = save_model(model, tmp_path / "stage", thresholds=[0.2, 0.4, 0.6],
                      factory="_train_helpers:tiny_tagger", factory_kwargs={"image_size": 16})
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == FORMAT and blob["model_name"] == "_train_helpers:tiny_tagger"
    assert blob["config"] == {"image_size": 16} and blob["tag_names"] == ["a", "b", "c"]
    assert blob["thresholds"] == pytest.approx([0.2, 0.4, 0.6]) and blob["tokenizer"] is None
    assert (tmp_path / "stage" / "thresholds.json").exists() and (tmp_path / "stage" / "config.json").exists()
    state = load_state_dict(tmp_path / "stage")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="custom model.*load_state_dict"):
        load_model(tmp_path / "stage")


@pytest.mark.parametrize("legacy", [{"format": LEGACY_STATE_FORMAT}, {}], ids=["ramflow-state-v1", "no-format-key"])
def test_an_older_custom_model_file_reads_through_the_one_reader(tmp_path, legacy):
    """Files of custom models written before the one format (their own ``ramflow-state-v1``,
    or older still without a format key) are read into the format, weights included."""
    weights = {"conv.weight": torch.randn(4, 3, 3, 3), "head.bias": torch.zeros(2)}
    torch.save({**legacy, "factory": "_train_helpers:tiny_tagger", "state_dict": weights,
                "thresholds": [0.5, 0.5], "tag_names": ["a", "b"]}, tmp_path / "model.pt")
    blob = read_checkpoint(tmp_path)
    assert blob["format"] == FORMAT and blob["model_name"] == "_train_helpers:tiny_tagger"
    assert blob["tag_names"] == ["a", "b"] and blob["thresholds"] == [0.5, 0.5]
    assert all(torch.equal(load_state_dict(tmp_path)[k], v) for k, v in weights.items())


def test_a_file_of_another_format_is_named_in_the_error(tmp_path):
    torch.save({"format": "other", "state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a ramflow model file: format 'other', expected 'ramflow-model-v1'"):
        load_state_dict(tmp_path / "x.pt")
    torch.save([1, 2], tmp_path / "y.pt")
    with pytest.raises(ValueError, match="not a dict"):
        read_checkpoint(tmp_path / "y.pt")


def test_a_file_without_the_full_config_is_refused_with_the_way_out(tmp_path):
    """Model files from before the full config was stored held only the registry overrides; they
    are not rebuilt on today's defaults (a silent change of model), but their weights still read."""
    model = tiny_model()
    path = save_model(model, tmp_path / "m.pt")
    blob = torch.load(path, weights_only=True)
    del blob["config"]
    torch.save(blob, path)
    with pytest.raises(ValueError, match="full config.*load_state_dict"):
        load_model(path)
    assert load_state_dict(path).keys() == model.state_dict().keys()
