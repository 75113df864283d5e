"""Measure the caption noise of a set of corpus truths (what the config asked for, checked)."""

from __future__ import annotations

from typing import Iterable

from data_engine.corpus.vocab import vocabulary


def measure_noise(truths: Iterable[dict]) -> dict:
    """Measured noise rates over ``truths`` (the ``truth`` dicts of corpus items).

    - ``omit_rate``: present object classes (per image) the caption does not mention.
    - ``hallucinate_rate``: mentioned object classes that are absent from the image.
    - ``synonym_rate``: mentions of tags that have WordNet synonyms (objects and scenes)
      written with a synonym; needs ``truth["synonyms_used"]`` (else ``None``).
    - ``scene_omit_rate``: images whose scene is not mentioned.
    Plus the counts behind each rate, so rates from several runs can be pooled.
    """
    vocab = vocabulary()
    objects = {v["name"] for v in vocab if v["category"] == "object"}
    with_syn = {v["name"] for v in vocab if v["synonyms"]}
    n_items = n_present = n_omitted = n_obj_mentions = n_halluc = 0
    n_syn_eligible = n_syn_used = n_scene_omitted = 0
    syn_recorded = True
    for t in truths:
        n_items += 1
        present = {o["name"] for o in t["objects"]}
        mentioned = set(t["mentioned"])
        m_obj = mentioned & objects
        n_present += len(present)
        n_omitted += len(present - m_obj)
        n_obj_mentions += len(m_obj)
        n_halluc += len(m_obj - present)
        n_scene_omitted += t["scene"] not in mentioned
        n_syn_eligible += len(mentioned & with_syn)
        if "synonyms_used" in t:
            n_syn_used += len({c for c, _ in t["synonyms_used"]})
        else:
            syn_recorded = False

    def rate(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "items": n_items,
        "omit_rate": rate(n_omitted, n_present),
        "hallucinate_rate": rate(n_halluc, n_obj_mentions),
        "synonym_rate": rate(n_syn_used, n_syn_eligible) if syn_recorded else None,
        "scene_omit_rate": rate(n_scene_omitted, n_items),
        "present_objects": n_present,
        "omitted_objects": n_omitted,
        "mentioned_objects": n_obj_mentions,
        "hallucinated_objects": n_halluc,
        "synonym_eligible_mentions": n_syn_eligible,
        "synonym_mentions": n_syn_used,
    }
