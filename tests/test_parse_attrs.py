"""Cached token attributes (data_engine.parse_attrs) give the real ruler + lemmatizer output."""

from __future__ import annotations

import pytest

from data_engine.parse_attrs import CachedTokenAttrs
from data_engine.parsing import ParseConfig, load_spacy

CAPTIONS = [
    "A man is riding a horse on the beach.",
    "There is a dog and there are two cats.",        # expl + be -> VERB (two-token pattern)
    "There's a cat sleeping while it rains",
    "I think you should see it, she said to them.",  # pronoun rules that read DEP
    "The woman has had a long day and does her best",
    "They're gonna eat, let's go y'all",              # words that start multi-token patterns
    "A bus  parked   near two\tgiraffes",             # whitespace tokens (re-tagged, re-labelled)
    "Geese, oxen and mice were running; the children laughed.",
    "A man is riding a horse on the beach.",          # repeated: answered from the cache
    "",
]


def _view(doc) -> list[tuple]:
    return [(t.text, t.tag_, t.pos_, str(t.morph), t.lemma_, t.dep_, t.head.i) for t in doc]


@pytest.fixture(scope="module")
def pipelines():
    cfg = ParseConfig()
    real = load_spacy(cfg.spacy_model, cfg.exclude_components)
    fast = load_spacy(cfg.spacy_model, cfg.exclude_components)
    attrs = CachedTokenAttrs.build(fast)
    assert attrs is not None
    return real, fast, attrs


def test_build_takes_the_rule_components_out(pipelines):
    _, fast, attrs = pipelines
    assert "attribute_ruler" not in fast.pipe_names and "lemmatizer" not in fast.pipe_names
    assert [type(c).__name__ for c in attrs.components] == ["AttributeRuler", "EnglishLemmatizer"]
    assert attrs.context_deps and attrs.triggers and attrs.dep_tests


@pytest.mark.parametrize("batch", [1, 4, len(CAPTIONS)])
def test_same_docs_as_the_real_components(pipelines, batch):
    real, fast, attrs = pipelines
    expected = [_view(d) for d in real.pipe(CAPTIONS)]
    got = []
    for i in range(0, len(CAPTIONS), batch):
        got += [_view(d) for d in attrs(list(fast.pipe(CAPTIONS[i:i + batch])))]
    assert got == expected


def test_pattern_words_take_the_real_path(pipelines):
    _, fast, attrs = pipelines
    before = dict(attrs.stats)
    docs = attrs(list(fast.pipe(["let's go", "a dog  and a cat", "a dog and a cat"])))
    assert attrs.stats["docs_real"] - before["docs_real"] == 2
    assert attrs.stats["docs_cached"] - before["docs_cached"] == 1
    assert docs[0][1].lemma_ == "us"           # the real "let 's" rule
    assert docs[1][2].pos_ == "SPACE" and docs[1][2].dep_ == "dep"


def test_cache_is_bounded(pipelines):
    real, _, _ = pipelines
    cfg = ParseConfig()
    nlp = load_spacy(cfg.spacy_model, cfg.exclude_components)
    small = CachedTokenAttrs.build(nlp, max_keys=8)
    for text, expected in zip(CAPTIONS, real.pipe(CAPTIONS)):
        doc = small(list(nlp.pipe([text])))[0]
        assert _view(doc) == _view(expected)
        assert len(small.cache) <= max(8, len(doc))


def test_not_used_when_the_rules_are_not_last():
    cfg = ParseConfig()
    nlp = load_spacy(cfg.spacy_model, cfg.exclude_components)
    nlp.add_pipe("sentencizer")  # after the lemmatizer: the cache could not stand in for it
    names = list(nlp.pipe_names)
    assert CachedTokenAttrs.build(nlp) is None
    assert nlp.pipe_names == names


def test_parser_pool_uses_the_cache_and_freezes_the_loaded_heap(tmp_path):
    import gc

    from data_engine.parsing import ParserPool

    before = gc.get_freeze_count()
    with ParserPool(ParseConfig(nltk_data=tmp_path / "nltk_data")) as pool:
        assert gc.get_freeze_count() > before  # the new pipeline's objects are frozen
        local = pool._local
        assert local._attrs is not None and "lemmatizer" not in local.nlp.pipe_names
        out = pool.parse_batch(["There is a man riding a horse", "Two dogs are running"])
        assert out[0].tags == ["man", "horse", "ride"]
        assert out[1].tags == ["dog", "run"]
        assert local._attrs.stats["docs_cached"] == 2
