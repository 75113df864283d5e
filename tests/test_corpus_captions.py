"""Corpus captions: noise rates as configured, clean finetune captions, honest ``mentioned``."""

from __future__ import annotations

import re

import pytest

from data_engine.corpus import CorpusConfig, iter_corpus, measure_noise, surface_forms
from data_engine.corpus.captions import INTERJECTIONS, NO_ANYTHING, NO_OBJECT, OPENERS, PRE
from data_engine.corpus.vocab import OBJECTS

SMALL = 48  # captions do not depend on pixels; small images keep the tests fast


def _tag_words(text: str) -> set[str]:
    """Canonical tags named in ``text`` by any surface form (compounds first)."""
    forms = surface_forms()
    pattern = r"\b(" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)) + r")\b"
    return {forms[m.lower()] for m in re.findall(pattern, text, flags=re.IGNORECASE)}


@pytest.fixture(scope="module")
def pretrain_truths():
    cfg = CorpusConfig(image_size=SMALL)
    return [(it.caption, it.truth) for it in iter_corpus(cfg, "pretrain", 0, 600)]


def test_default_noise_rates_match_config(pretrain_truths):
    cfg = CorpusConfig()
    m = measure_noise(t for _, t in pretrain_truths)
    assert m["items"] == 600
    assert abs(m["omit_rate"] - cfg.omit_rate) < 0.05
    assert abs(m["hallucinate_rate"] - cfg.hallucinate_rate) < 0.035
    assert abs(m["synonym_rate"] - cfg.synonym_rate) < 0.08
    assert m["synonym_eligible_mentions"] > 100


@pytest.mark.parametrize("omit,halluc,syn", [(0.2, 0.25, 0.6), (0.6, 0.0, 0.0)])
def test_noise_rates_follow_params(omit, halluc, syn):
    cfg = CorpusConfig(image_size=SMALL, omit_rate=omit, hallucinate_rate=halluc,
                       synonym_rate=syn)
    m = measure_noise(it.truth for it in iter_corpus(cfg, "pretrain", 0, 300))
    assert abs(m["omit_rate"] - omit) < 0.06
    assert abs(m["hallucinate_rate"] - halluc) < 0.05
    assert abs(m["synonym_rate"] - syn) < 0.1


def test_mentioned_is_exactly_what_the_caption_names(pretrain_truths):
    for caption, truth in pretrain_truths:
        assert _tag_words(caption) == set(truth["mentioned"]), caption
        hallucinated = set(truth["hallucinated"])
        present = {o["name"] for o in truth["objects"]}
        assert hallucinated == (set(truth["mentioned"]) - present) & hallucinated
        assert not hallucinated & present
        for canonical, word in truth["synonyms_used"]:
            assert surface_forms()[word] == canonical
            plural = dict(s for o in OBJECTS for s in o.synonyms).get(word, word)
            assert re.search(rf"\b({re.escape(word)}|{re.escape(plural)})\b", caption,
                             re.IGNORECASE), (word, caption)


def test_filler_never_names_a_tag():
    for text in (*PRE, *INTERJECTIONS, *OPENERS, *NO_ANYTHING,
                 *(t.format("") for t in NO_OBJECT)):
        assert _tag_words(text) == set(), text
    assert not re.search(r"\b(no|not|without|never)\b", " ".join(INTERJECTIONS + NO_ANYTHING))


def test_captions_look_like_web_text(pretrain_truths):
    caps = [c for c, _ in pretrain_truths]
    joined = " ".join(caps).lower()
    assert len(set(caps)) > 0.85 * len(caps)  # short all-omitted ones repeat, as on the web
    for word in ("two", "striped", "dotted", "flying", "lovely", "vacation", "photo of",
                 "there are", "automobile", "plane", "fire hydrant", "traffic light"):
        assert word in joined, word
    assert any(c.islower() for c in caps) and any(c[0].isupper() for c in caps)
    assert not re.search(r"\b(no|not|without)\b", joined)  # no negated objects


@pytest.fixture(scope="module")
def finetune_items():
    return list(iter_corpus(CorpusConfig(image_size=SMALL), "finetune", 0, 200))


def test_finetune_captions_complete_and_correct(finetune_items):
    truths = []
    for item in finetune_items:
        t = item.truth
        assert set(t["mentioned"]) == set(t["tags"]), item.caption
        assert t["hallucinated"] == []
        assert _tag_words(item.caption) == set(t["tags"])
        truths.append(t)
    m = measure_noise(truths)
    assert m["omit_rate"] == 0.0 and m["hallucinate_rate"] == 0.0
    assert m["scene_omit_rate"] == 0.0
    assert m["synonym_rate"] > 0.1  # synonyms are correct, so finetune still uses them


def test_counts_in_captions_match_truth(finetune_items):
    """A number word before a present object's noun equals its instance count."""
    numbers = {"two": 2, "three": 3, "four": 4}
    checked = 0
    for item in finetune_items:
        t = item.truth
        if len({(o["name"], o["color"]) for o in t["objects"]}) != 1:
            continue  # one class in one colour: one phrase, whole count
        m = re.search(r"\b(two|three|four)\b", item.caption.lower())
        n = len(t["objects"])
        if n > 1 and m:
            assert numbers[m.group(1)] == n, item.caption
            checked += 1
        elif n == 1:
            assert not m, item.caption
    assert checked > 3
