"""Tagger on PIL / bytes / paths, custom tag lists, captions, and the tag/caption/models CLI."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from _model_helpers import TAGS, FakeTextEncoder, fake_embeddings, tiny_model
from ram_model.checkpoint import save_model
from ram_model.inference import Tagger, load_image, preprocess


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(tiny_model(), tmp_path_factory.mktemp("ckpt") / "m.pt")


def _images(tmp_path):
    pil = Image.new("RGB", (120, 80), (200, 30, 30))
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (30, 200, 30)).save(buf, format="PNG")
    path = tmp_path / "blue.jpg"
    Image.new("RGB", (64, 64), (30, 30, 200)).save(path)
    return [pil, buf.getvalue(), str(path), path]


def test_preprocess_normalises():
    x = preprocess([Image.new("RGB", (10, 20), (255, 0, 127))], {"image_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 127 / 255 * 2 - 1]), atol=1e-6)
    with pytest.raises(TypeError):
        load_image(123)


def test_tagger_inputs_agree(checkpoint, tmp_path):
    tagger = Tagger.from_checkpoint(checkpoint, batch_size=3)
    imgs = _images(tmp_path)
    scores = tagger.scores(imgs)
    assert scores.shape == (4, len(TAGS))
    np.testing.assert_allclose(scores[2], scores[3], rtol=1e-6)  # str path == Path
    single = tagger.scores([load_image(imgs[1])])
    np.testing.assert_allclose(single[0], scores[1], rtol=1e-5, atol=1e-6)  # batching-independent
    res = tagger.tag(imgs, threshold=0.0)
    assert len(res) == 4 and all(len(r) == len(TAGS) for r in res)
    assert [s for _, s in res[0]] == sorted((s for _, s in res[0]), reverse=True)
    assert all(len(r) == 2 for r in tagger.tag(imgs, threshold=0.0, top_k=2))
    assert tagger.tag(imgs, threshold=1.01) == [[], [], [], []]
    caps = tagger.caption(imgs)
    assert len(caps) == 4 and all(isinstance(c, str) for c in caps)


def test_tagger_custom_tags(checkpoint, tmp_path):
    tagger = Tagger.from_checkpoint(checkpoint)
    imgs = _images(tmp_path)[:2]
    before = tagger.scores(imgs)
    custom = ["cat", "zebra", "tree"]
    enc = FakeTextEncoder()
    res = tagger.tag(imgs, threshold=0.0, tags=None)
    assert {t for t, _ in res[0]} == set(TAGS)
    tagger.set_tags(custom, text_encoder=enc, cache_dir=tmp_path / "cache")
    assert tagger.tag_names == custom and tagger.scores(imgs).shape == (2, 3)
    assert (tmp_path / "cache").is_dir() and enc.calls == 1
    tagger.set_tags(TAGS, embeddings=fake_embeddings(TAGS))
    np.testing.assert_allclose(tagger.scores(imgs), before, rtol=1e-5)


def test_tag_call_with_custom_list_restores_tag_set(checkpoint, tmp_path, monkeypatch):
    import ram_model.registry as registry
    import ram_model.text_encoder as te

    monkeypatch.setattr(registry, "build_text_encoder", lambda name: FakeTextEncoder())
    monkeypatch.setenv(te.CACHE_ENV, str(tmp_path))
    tagger = Tagger.from_checkpoint(checkpoint)
    res = tagger.tag(_images(tmp_path)[:1], threshold=0.0, tags=["dog", "kite"])
    assert {t for t, _ in res[0]} == {"dog", "kite"}
    assert tagger.tag_names == TAGS


def test_cli_tag_caption_models(checkpoint, tmp_path, capsys, monkeypatch):
    import ram_model.registry as registry
    import ram_model.text_encoder as te
    from orchestration.cli import main

    monkeypatch.setattr(registry, "build_text_encoder", lambda name: FakeTextEncoder())
    monkeypatch.setenv(te.CACHE_ENV, str(tmp_path / "cache"))
    paths = [str(p) for p in _images(tmp_path)[2:]]
    assert main(["tag", *paths, "--checkpoint", str(checkpoint), "--threshold", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and set(lines[0].split(" | ")) == set(TAGS)
    tag_file = tmp_path / "tags.txt"
    tag_file.write_text("beach\n# comment\nsky\n\n")
    assert main(["tag", paths[0], "--checkpoint", str(checkpoint), "--tags", str(tag_file), "--threshold", "0"]) == 0
    assert set(capsys.readouterr().out.strip().split(" | ")) == {"beach", "sky"}
    assert main(["caption", *paths, "--checkpoint", str(checkpoint)]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # one line per image (may be empty untrained)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ram_swin_l_384" in out and "ram_tiny" in out


def test_embedding_cache_per_name_and_repeated_lists(checkpoint, tmp_path):
    """A repeated list costs no encoder call; a list overlapping an earlier one embeds only its new names."""
    from ram_model.text_encoder import TagEmbeddingCache

    enc = FakeTextEncoder()
    tagger = Tagger.from_checkpoint(checkpoint, text_encoder=enc, embedding_cache=TagEmbeddingCache(max_names=3))
    first = tagger.tag_set(["zebra", "kite"], cache_dir=tmp_path)
    again = tagger.tag_set(["kite", "zebra"], cache_dir=tmp_path)
    assert enc.calls == 1 and tagger.embedding_cache.hits == 2
    torch.testing.assert_close(again.embeddings, first.embeddings[[1, 0]])
    tagger.tag_set(["kite", "moon"], cache_dir=tmp_path)              # only "moon" is new
    assert enc.calls == 2 and tagger.embedding_cache.misses == 3
    assert len(tagger.embedding_cache) == 3
    tagger.tag_set(["sun"], cache_dir=tmp_path)                       # evicts the least recently used
    assert len(tagger.embedding_cache) == 3
    known = tagger.tag_set(["cat", "zebra"], cache_dir=tmp_path)
    assert known.thresholds[0] == pytest.approx(float(tagger.model.thresholds[0]))  # known names keep theirs
    assert known.thresholds[1] == pytest.approx(tagger.model.config.default_threshold)
    with pytest.raises(ValueError, match="unique"):
        tagger.tag_set(["kite", "kite"])


def test_concurrent_tag_calls_with_mixed_tag_sets_are_independent(checkpoint, tmp_path):
    """Threads tagging with the default set and with custom sets each get their own answer
    (the shared model is never changed)."""
    from concurrent.futures import ThreadPoolExecutor

    tagger = Tagger.from_checkpoint(checkpoint, text_encoder=FakeTextEncoder())
    images = _images(tmp_path)
    custom = [None, ["zebra", "kite"], ["dog", "moon", "sun"], None]
    expected = [tagger.tag(images, threshold=0.0, tags=c) for c in custom]
    weights_before = {k: v.clone() for k, v in tagger.model.state_dict().items()}
    jobs = [i % len(custom) for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: tagger.tag(images, threshold=0.0, tags=custom[i]), jobs))
    for i, result in zip(jobs, got):
        assert [[t for t, _ in r] for r in result] == [[t for t, _ in r] for r in expected[i]]
        np.testing.assert_allclose([s for r in result for _, s in r], [s for r in expected[i] for _, s in r],
                                   rtol=1e-5, atol=1e-6)
    assert tagger.tag_names == TAGS
    for key, value in tagger.model.state_dict().items():
        torch.testing.assert_close(value, weights_before[key])
    assert tagger.embedding_cache.misses == 5                        # every custom name embedded once


def test_tag_logits_with_label_embed_is_pure(checkpoint):
    """``tag_logits(x, label_embed=E)`` equals swapping the tag set to E, and leaves the model's set alone."""
    model = Tagger.from_checkpoint(checkpoint).model
    x = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    emb = fake_embeddings(["zebra", "kite", "moon"])
    with torch.no_grad():
        pure = model.tag_logits(x, label_embed=emb)
        assert model.tag_names == TAGS and model.num_tags == len(TAGS)
        model.set_tags(["zebra", "kite", "moon"], emb)
        torch.testing.assert_close(pure, model.tag_logits(x))
    with pytest.raises(ValueError, match="label_embed"):
        model.tag_logits(x, label_embed=torch.zeros(3, 7))


def test_images_are_decoded_one_batch_at_a_time(checkpoint, tmp_path, monkeypatch):
    """The loader of batch k+1 runs only after batch k was scored (no decoding of every row up front)."""
    tagger = Tagger.from_checkpoint(checkpoint, batch_size=2)
    events = []
    forward = tagger.model.tag_logits
    monkeypatch.setattr(tagger.model, "tag_logits", lambda x, **kw: events.append(("score", len(x))) or forward(x, **kw))

    def loader(item):
        events.append(("load", item))
        return load_image(item)

    images = _images(tmp_path)
    tagger.tag(images[:3], threshold=0.0, loader=loader)  # batches of 2 and 1
    assert [e[0] for e in events] == ["load", "load", "score", "load", "score"]
