"""Label system: determinism, stable ids, synonym merging, RAM-format files, id assignment."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_engine.label_system import (
    LabelSystem,
    LabelSystemConfig,
    assign_label_ids,
    build_label_system,
)
from data_engine.wordnet import LEXNAMES, ensure_wordnet
from ramflow_io.formats import label_names


def write_parsed(path: Path, rows: list[list[tuple[str, str]]]) -> Path:
    """A parsed parquet: rows of (tag, category) pairs."""
    pq.write_table(pa.table({
        "key": [f"k{i}" for i in range(len(rows))],
        "caption": [" ".join(t for t, _ in r) for r in rows],
        "tags": [[t for t, _ in r] for r in rows],
        "categories": [[c for _, c in r] for r in rows],
        "status": ["ok"] * len(rows)}), path)
    return path


CORPUS = (
    [[("car", "object"), ("street", "scene"), ("red", "attribute")]] * 6
    + [[("automobile", "object"), ("run", "action")]] * 3
    + [[("man", "object"), ("bike", "object")]] * 4
    + [[("woman", "object"), ("boy", "object"), ("dog", "object")]] * 3
    + [[("zebra crossing", "object")]] * 3
    + [[("rareword", "object")]] * 1
)


@pytest.fixture(scope="module")
def nltk_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nltk_data")


@pytest.fixture
def cfg(nltk_data) -> LabelSystemConfig:
    return LabelSystemConfig(min_freq=3, nltk_data=nltk_data)


@pytest.fixture(scope="module")
def built(tmp_path_factory, nltk_data):
    """``(label system, parsed file)`` over CORPUS, built once for the module (each build reads
    WordNet: seconds) into ``{parsed's folder}/ls``; a test that changes it loads its own copy."""
    tmp = tmp_path_factory.mktemp("built")
    parsed = write_parsed(tmp / "p.parquet", CORPUS)
    return build_label_system([parsed], LabelSystemConfig(min_freq=3, nltk_data=nltk_data), tmp / "ls"), parsed


def test_wordnet_setup_is_idempotent(nltk_data):
    root = ensure_wordnet(nltk_data)
    lex = (root / "lexnames").read_text().splitlines()
    assert len(lex) == len(LEXNAMES) == 45 and lex[5].split("\t")[:2] == ["05", "noun.animal"]
    assert (root / "index.sense").exists() and (root / "data.noun").stat().st_size > 1e6
    mtime = (root / "data.noun").stat().st_mtime_ns
    assert ensure_wordnet(nltk_data) == root
    assert (root / "data.noun").stat().st_mtime_ns == mtime


def test_synonyms_merge(built):
    ls, _ = built
    assert ls.id_of("automobile") == ls.id_of("car") is not None
    person = ls.id_of("person")
    assert person is not None and ls.id_of("man") == ls.id_of("woman") == ls.id_of("boy") == person
    assert ls.id_of("bike") == ls.id_of("bicycle")  # synonyms file (WordNet's 1st sense: motorbike)
    assert ls.normalize(["man", "woman", "automobile", "car"]) == ["person", "car"]
    assert ls.category(ls.id_of("street")) == "scene" and ls.category(ls.id_of("run")) == "action"


def test_min_freq_and_seeds(built):
    ls, _ = built
    assert "zebra crossing" in ls.names and "rareword" not in ls.names
    assert ls.id_of("rareword") is None
    assert {"person", "bicycle", "toothbrush"} <= set(ls.names)  # COCO-80 seed
    assert ls.id_of("tennis player") == ls.id_of("player")  # suffix back-off, or both None
    assert ls.id_of("red car") == ls.id_of("car")


def test_deterministic(tmp_path, cfg, built):
    ls, parsed = built
    again = build_label_system([parsed], cfg, tmp_path / "ls2")
    assert again.names == ls.names
    assert (tmp_path / "ls2/label_system.json").read_text() == (parsed.parent / "ls/label_system.json").read_text()


def test_ids_stable_under_additions(tmp_path, cfg, built):
    ls, parsed = built
    more = write_parsed(tmp_path / "more.parquet", CORPUS + [[("kangaroo", "object")]] * 5
                        + [[("aardvark", "object")]] * 4)
    grown = build_label_system([more], cfg, tmp_path / "ls3", previous=parsed.parent / "ls")
    assert grown.names[: len(ls)] == ls.names
    assert grown.names[len(ls):] == ["kangaroo", "aardvark"]
    for name in ls.names:
        assert grown.id_of(name) == ls.id_of(name)


def test_editable_synonyms_file(tmp_path, cfg):
    syn = tmp_path / "syn.txt"
    syn.write_text("# mine\ndog: doggo, pupper\n")
    parsed = write_parsed(tmp_path / "p.parquet", [[("doggo", "object")]] * 3 + [[("dog", "object")]])
    ls = build_label_system([parsed], cfg.model_copy(update={"synonyms_file": syn}), tmp_path / "o")
    assert ls.id_of("doggo") == ls.id_of("pupper") == ls.id_of("dog") is not None
    assert "doggo" not in ls.names


def test_ram_format_round_trip(tmp_path, built):
    ls = LabelSystem.load(built[1].parent / "ls")  # a private copy: the threshold below changes it
    assert ls.names == built[0].names
    ls.labels[ls.id_of("car")].threshold = 0.8
    ls.save(tmp_path / "rt")
    lines = (tmp_path / "rt/ram_tag_list.txt").read_text().splitlines()
    thr = [float(x) for x in (tmp_path / "rt/ram_tag_list_threshold.txt").read_text().split()]
    assert lines == ls.names and len(thr) == len(lines)
    assert thr[ls.id_of("car")] == 0.8 and thr[0] == ls.default_threshold
    from_json = LabelSystem.load(tmp_path / "rt")
    assert from_json.names == ls.names and from_json.id_of("automobile") == ls.id_of("car")
    (tmp_path / "rt/label_system.json").unlink()
    from_txt = LabelSystem.load(tmp_path / "rt")  # RAM text files only
    assert from_txt.names == ls.names and from_txt.thresholds == thr


def test_model_side_reader_matches_the_builder(tmp_path, built):
    """Training reads tag names through ramflow_io (no import of data_engine): same names, same order."""
    built[0].save(tmp_path / "ls")
    assert label_names(tmp_path / "ls") == built[0].names
    assert label_names(tmp_path / "ls" / "label_system.json") == built[0].names
    payload = json.loads((tmp_path / "ls/label_system.json").read_text())
    payload["labels"][0]["id"] = 5
    (tmp_path / "ls/label_system.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="0..n-1"):
        label_names(tmp_path / "ls")
    with pytest.raises(FileNotFoundError):
        label_names(tmp_path / "absent")


def test_reads_user_ram_tag_list(tmp_path):
    (tmp_path / "ram_tag_list.txt").write_text("3D CG rendering\nabacus\nliving room\n")
    ls = LabelSystem.load(tmp_path / "ram_tag_list.txt")
    assert ls.names == ["3d cg rendering", "abacus", "living room"] and len(ls) == 3
    assert ls.to_ids(["Living Room", "abacus", "unknown"]) == [2, 1]
    assert ls.thresholds == [ls.default_threshold] * 3


def test_assign_label_ids(tmp_path, built):
    ls, parsed = built
    out = tmp_path / "labels" / "pretrain.parquet"
    summary = assign_label_ids(parsed, ls, out)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(CORPUS) == summary["rows"]
    assert rows[0]["parse_label_ids"] == ls.to_ids(["car", "street", "red"])
    assert rows[-1]["unmapped"] == ["rareword"] and rows[-1]["parse_label_ids"] == []
    assert summary["unmapped_tags"] == 1 and summary["top_unmapped"] == [("rareword", 1)]
    assert summary["mapped_tags"] + summary["unmapped_tags"] == summary["tags"]
    assert json.dumps(summary)
