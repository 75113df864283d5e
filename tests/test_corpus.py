"""Embedded corpus: vocabulary, determinism, truth, splits, held-out classes, streaming."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_engine.corpus import (
    COLORS,
    DEFAULT_HELD_OUT,
    OBJECT_NAMES,
    SCENE_NAMES,
    CorpusConfig,
    generate_item,
    iter_corpus,
    split_size,
    surface_forms,
    vocabulary,
)
from data_engine.corpus.vocab import OBJECTS
from ramflow_io.formats import SPLITS
from ramflow_io.params import stage_config


def test_vocabulary_sizes_and_categories():
    vocab = vocabulary()
    by_cat = {c: [v["name"] for v in vocab if v["category"] == c]
              for c in ("object", "scene", "attribute")}
    assert len(by_cat["object"]) >= 40
    assert len(by_cat["scene"]) >= 6
    assert len(by_cat["attribute"]) >= 8
    names = [v["name"] for v in vocab]
    assert len(names) == len(set(names))
    assert all(n == n.lower() and n.strip() == n for n in names)
    assert sum(" " in n for n in by_cat["object"]) >= 5  # compound nouns
    assert set(by_cat["object"]) == set(OBJECT_NAMES)
    assert set(by_cat["scene"]) == set(SCENE_NAMES)
    assert set(by_cat["attribute"]) == set(COLORS)
    assert len(DEFAULT_HELD_OUT) == 4 and set(DEFAULT_HELD_OUT) <= set(OBJECT_NAMES)


def test_synonyms_consistent_and_unambiguous():
    vocab = vocabulary()
    names = {v["name"] for v in vocab}
    seen: dict[str, str] = {}
    for v in vocab:
        for s in v["synonyms"]:
            assert s not in names, f"synonym {s!r} is also a canonical tag"
            assert seen.setdefault(s, v["name"]) == v["name"], f"{s!r} names two tags"
    # every caption word form maps to exactly one tag, and each synonym to its own tag
    forms = surface_forms()
    for v in vocab:
        assert forms[v["name"]] == v["name"]
        for s in v["synonyms"]:
            assert forms[s] == v["name"]
    counts: dict[str, set] = {}
    for o in OBJECTS:
        for word in (o.name, o.plural, *[w for pair in o.synonyms for w in pair]):
            counts.setdefault(word, set()).add(o.name)
    assert all(len(tags) == 1 for tags in counts.values())


@pytest.mark.slow  # loading WordNet takes ~5-15 s
@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="no WordNet")
def test_synonyms_are_wordnet_synonyms_and_no_hypernym_pairs():
    pytest.importorskip("nltk")
    from data_engine.corpus.wordnet_check import check_vocabulary

    result = check_vocabulary()
    assert result["synonyms"], "no synonym pairs checked"
    bad = [r for r in result["synonyms"] if not r["ok"]]
    assert not bad
    assert result["hypernyms"] == []


def test_same_seed_same_bytes_different_seed_differs():
    cfg = CorpusConfig(seed=3)
    a = [generate_item(cfg, "pretrain", i) for i in range(6)]
    b = list(iter_corpus(CorpusConfig(seed=3), "pretrain", 0, 6))
    for x, y in zip(a, b):
        assert x.key == y.key
        assert x.image.tobytes() == y.image.tobytes()
        assert x.caption == y.caption and x.truth == y.truth
    c = list(iter_corpus(CorpusConfig(seed=4), "pretrain", 0, 6))
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in c]
    assert [x.caption for x in a] != [x.caption for x in c]
    # item i does not depend on where iteration starts
    assert next(iter_corpus(cfg, "pretrain", 4)).image.tobytes() == a[4].image.tobytes()
    # splits draw different items
    assert generate_item(cfg, "test", 0).image.tobytes() != a[0].image.tobytes()


def test_keys_sizes_and_ranges():
    cfg = CorpusConfig(n_pretrain=7, n_finetune=3, n_test=5)
    assert [split_size(cfg, s) for s in SPLITS] == [7, 3, 5]
    it = iter_corpus(cfg, "finetune")
    assert inspect.isgenerator(it)  # streaming, never a list of all items
    assert [x.key for x in it] == [f"finetune_{i:08d}" for i in range(3)]
    assert [x.key for x in iter_corpus(cfg, "test", 3, 100)] == ["test_00000003", "test_00000004"]
    with pytest.raises(ValueError):
        split_size(cfg, "train")
    with pytest.raises(IndexError):
        generate_item(cfg, "pretrain", 7)
    with pytest.raises(ValueError):
        list(iter_corpus(cfg, "pretrain", 5, 2))
    with pytest.raises(ValueError):
        CorpusConfig(held_out=["unicorn"])


@pytest.mark.parametrize("size", [96, 224])
def test_truth_structure_and_boxes_inside(size):
    cfg = CorpusConfig(image_size=size)
    for item in iter_corpus(cfg, "test", 0, 40 if size == 96 else 10):
        assert isinstance(item.image, Image.Image)
        assert item.image.mode == "RGB" and item.image.size == (size, size)
        t = item.truth
        assert set(t) >= {"tags", "mentioned", "scene", "objects"}
        assert t["scene"] in SCENE_NAMES and t["objects"]
        names = {o["name"] for o in t["objects"]}
        colors = {o["color"] for o in t["objects"]}
        assert set(t["tags"]) == names | {t["scene"]} | colors
        assert set(t["mentioned"]) <= {v["name"] for v in vocabulary()}
        for o in t["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert (x1 - x0) * (y1 - y0) >= (0.1 * size) ** 2  # clearly visible size
            assert o["color"] in COLORS


def test_boxes_cover_the_drawn_object():
    """The object's own pixels differ from the bare background inside its box."""
    cfg = CorpusConfig()
    item = generate_item(cfg, "pretrain", 11)
    for o in item.truth["objects"]:
        crop = item.image.crop(o["box"])
        extrema = crop.getextrema()
        assert any(hi - lo > 40 for lo, hi in extrema)


def test_held_out_classes_only_in_test():
    cfg = CorpusConfig(image_size=48)
    held = set(cfg.held_out)
    for split, n in (("pretrain", 200), ("finetune", 100)):
        for item in iter_corpus(cfg, split, 0, n):
            assert not held & {o["name"] for o in item.truth["objects"]}
            assert not held & set(item.truth["mentioned"])
            assert not held & set(item.truth["tags"])
    seen = set()
    for item in iter_corpus(cfg, "test", 0, 300):
        seen |= {o["name"] for o in item.truth["objects"]}
    assert held <= seen
    assert len(seen) >= 40  # test covers (nearly) every class


def test_params_yaml_section_loads(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cfg = stage_config(CorpusConfig, "corpus", repo / "params.yaml")
    default = CorpusConfig()
    assert cfg.image_size == default.image_size and cfg.n_pretrain == default.n_pretrain
    (tmp_path / "p.yaml").write_text("corpus:\n  seed: 5\n  image_size: 64\n")
    cfg = stage_config(CorpusConfig, "corpus", tmp_path / "p.yaml")
    assert (cfg.seed, cfg.image_size) == (5, 64)


def test_contact_sheets(tmp_path):
    from data_engine.corpus.contact_sheet import classes_sheet, items_sheet

    p = items_sheet(CorpusConfig(), "pretrain", tmp_path / "items.png", n=4, show_boxes=True)
    q = classes_sheet(tmp_path / "classes.png", size=48)
    assert Image.open(p).size[0] > 0 and Image.open(q).size[1] > 0
    shutil.rmtree(tmp_path)


def test_report_stage_and_cli(tmp_path):
    import argparse
    import json

    from data_engine.corpus.cli import register
    from data_engine.corpus.report import corpus_report

    cfg = CorpusConfig(image_size=48, n_pretrain=30, n_finetune=10, n_test=20)
    report = corpus_report(cfg, tmp_path / "rep", n_measure=20)
    assert report["sizes"] == {"pretrain": 30, "finetune": 10, "test": 20}
    assert report["noise"]["finetune"]["items"] == 10
    assert report["noise"]["finetune"]["omit_rate"] == 0.0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["n_tags"]["object"] >= 40
    assert (tmp_path / "rep" / "classes.png").exists()

    (tmp_path / "p.yaml").write_text("corpus:\n  image_size: 48\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["corpus", "sheet", "--out", str(tmp_path / "s.png"),
                              "--params", str(tmp_path / "p.yaml"), "--n", "3"])
    assert args.func(args) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 0
