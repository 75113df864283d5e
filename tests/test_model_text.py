"""Tokenizers, tag-embedding cache, and the offline MiniLM text encoder."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import FakeTextEncoder
from ram_model.text_encoder import TextEncoder, embed_tag_names
from ram_model.tokenizer import WordPieceTokenizer, WordTokenizer, build_tokenizer, tokenizer_from_state


def test_wordpiece_round_trip_and_packing():
    tok = build_tokenizer("wordpiece")
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == 30522
    ids, mask = tok.encode(["A dog runs on the beach.", "two cats"], 8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id  # truncated, EOS kept last
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and ids[1, 4:].eq(tok.pad_id).all()
    full, _ = tok.encode(["A dog runs on the beach."], 20)
    assert tok.decode(full) == ["a dog runs on the beach."]
    assert tokenizer_from_state(tok.state()).decode(full) == tok.decode(full)


def test_word_tokenizer_fit_encode_decode():
    tok = WordTokenizer(capacity=12).fit(["a red cat.", "a blue dog", "a red bird, flying!"])
    ids, mask = tok.encode(["a red zebra."], 10)
    assert tok.decode(ids) == ["a red [UNK]."]
    assert len(tok.words) == 12 and tok.vocab_size == 12  # capacity fixed
    again = tokenizer_from_state(tok.state())
    assert again.encode(["a red cat."], 10)[0].tolist() == tok.encode(["a red cat."], 10)[0].tolist()


def test_tag_embedding_cache(tmp_path):
    enc = FakeTextEncoder()
    assert isinstance(enc, TextEncoder)
    templates = ("a photo of a {}.", "{}")
    a = embed_tag_names(["cat", "hot_dog"], enc, templates, tmp_path)
    assert a.shape == (2, 384) and torch.allclose(a.norm(dim=-1), torch.ones(2))
    manual = torch.nn.functional.normalize(enc.encode(["a photo of a hot dog.", "hot dog"]).mean(0), dim=0)
    torch.testing.assert_close(a[1], manual)
    calls = enc.calls
    b = embed_tag_names(["cat", "hot_dog"], enc, templates, tmp_path)
    assert enc.calls == calls and torch.equal(a, b)  # served from the disk cache
    embed_tag_names(["cat", "hot_dog"], enc, ("{}",), tmp_path)
    assert enc.calls == calls + 1 and len(list(tmp_path.glob("*.pt"))) == 2  # key includes templates


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from ram_model.text_encoder import MiniLMTextEncoder, minilm_model_dir

    texts = ["a photo of a dog.", "a photo of a puppy.", "a red car."]
    ours = MiniLMTextEncoder().encode(texts)
    ref = SentenceTransformer(str(minilm_model_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-5)
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2]  # dog is closer to puppy than to car
