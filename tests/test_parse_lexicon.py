"""The parser's WordNet lexicon answers as NLTK's WordNet reader does (it replaces it).

The parser used NLTK's reader for morphy, verb sense counts and the compound-join test; the
lexicon (data_engine.wordnet.Lexicon) is built from the same files without the reader. These
tests compare both on a vocabulary; they skip when the WordNet files are not installed.
"""

from __future__ import annotations

import random

import pytest

from data_engine import wordnet

VOCAB = ("men women geese mice children buses boxes knives leaves glasses oranges skis jeans "
         "riding rode ridden shining ran running sitting sat lying laid flies flying ate eaten "
         "saw seen standing stood holding held wearing worn parked cutting cut hit playing "
         "better best larger biggest happier dogs cats hot dog teddy bears is are was were "
         "goes went does did has had made making surfing skiing kites hydrants players").split()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    try:
        nltk_data = tmp_path_factory.mktemp("nltk_data")
        reader = wordnet.load_wordnet(nltk_data)
    except FileNotFoundError as err:
        pytest.skip(f"WordNet not installed: {err}")
    return reader, wordnet.load_lexicon(nltk_data)


@pytest.mark.parametrize("pos", ["n", "v", "a"])
def test_morphy_matches_nltk(both, pos):
    reader, lex = both
    for word in VOCAB:
        assert lex.morphy(word, pos) == reader._morphy(word, pos), (word, pos)


def test_verb_choice_matches_nltk(both):
    """The parser picks the most frequent verb reading; both sources must pick the same one."""
    reader, lex = both

    def nltk_count(form: str) -> int:
        return sum(lm.count() for s in reader.synsets(form, "v") for lm in s.lemmas()
                   if lm.name() == form)

    ambiguous = [w for w in VOCAB + sorted(lex.lemmas["v"])[:3000] if len(lex.morphy(w, "v")) > 1]
    assert ambiguous
    for word in ambiguous:
        forms = lex.morphy(word, "v")
        for spacy_lemma in forms + ["none"]:
            want = max(sorted(forms), key=lambda f: (nltk_count(f), f == spacy_lemma))
            got = max(sorted(forms), key=lambda f: (lex.verb_count(f), f == spacy_lemma))
            assert got == want, (word, spacy_lemma)


def test_joinable_compounds_match_nltk(both):
    reader, lex = both

    def nltk_join(phrase: str) -> bool:
        words = phrase.split()
        compound = reader.synsets(phrase.replace(" ", "_"), "n")[:1]
        heads = set(reader.synsets(words[-1], "n"))
        return bool(compound) and not any(h in heads for path in compound[0].hypernym_paths()
                                          for h in path[:-1])

    sample = random.Random(0).sample(sorted(lex.multiword), 400) + ["hot dog", "young man"]
    for phrase in sample:
        assert (phrase in lex.joinable) == nltk_join(phrase), phrase
    assert "hot dog" in lex.joinable and "young man" not in lex.joinable


def test_noun_classes(both):
    _, lex = both
    assert {"man", "baby", "child"} <= lex.person
    assert {"elephant", "giraffe", "dog"} <= lex.animal
    assert {"teddy", "doll", "toy"} <= lex.toy and "man" not in lex.toy


def test_cache_is_reused_and_rebuilt_when_stale(tmp_path):
    try:
        lex = wordnet.load_lexicon(tmp_path)
    except FileNotFoundError as err:
        pytest.skip(f"WordNet not installed: {err}")
    cache = next(tmp_path.rglob(wordnet.LEXICON_FILE))
    stamp = cache.stat().st_mtime_ns
    assert wordnet.load_lexicon(tmp_path).joinable == lex.joinable
    assert cache.stat().st_mtime_ns == stamp  # read, not rebuilt
    cache.write_text("{not json")
    assert wordnet.load_lexicon(tmp_path).morphy("geese", "n") == ["goose"]
