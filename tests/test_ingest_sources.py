"""Every source format becomes canonical shards + manifest + summary (tiny inputs in tmp_path)."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from PIL import Image

from _ingest_helpers import image_bytes, sample_members, write_coco, write_tar
from ramflow_io.formats import MANIFEST_COLUMNS, list_shards
from data_engine.ingest import IngestConfig, ingest, sanitize_key
from data_engine.ingest.steps import summary_path
from ramflow_io.shards import iter_samples, read_manifest

CFG = IngestConfig(shard_size=2, max_side=32, progress=False)


def _check_layout(root, split, n_written):
    manifest = read_manifest(root)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == n_written
    samples = list(iter_samples(list_shards(root, split)))
    assert [s.key for s in samples] == manifest["key"].tolist()
    for sample, row in zip(samples, manifest.itertuples()):
        assert "." not in sample.key
        assert sample.caption == row.caption and sample.caption.strip()
        assert sample.image.mode == "RGB" and max(sample.image.size) <= CFG.max_side
        assert sample.image.size == (row.width, row.height)
        assert sample.meta["sha256"] == row.sha256 and sample.meta["split"] == split
        assert (root / row.shard).exists()
    summary = json.loads(summary_path(root).read_text())
    assert summary["counts_add_up"] is True
    return manifest, samples


def test_img2dataset_folder(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    write_tar(src / "00000.tar", sample_members("000000000", "a red car") + sample_members("000000001", "two dogs"))
    write_tar(src / "00001.tar", sample_members("000010000", "a cat", image=image_bytes((80, 40), fmt="PNG")))
    (src / "00000_stats.json").write_text("{}")  # img2dataset side files are ignored
    summary = ingest("img2dataset", tmp_path / "data", CFG, path=src, split="finetune")
    manifest, samples = _check_layout(tmp_path / "data", "finetune", 3)
    assert manifest["key"].tolist() == ["000000000", "000000001", "000010000"]
    assert (manifest["source"] == "img2dataset").all()
    assert summary.splits["finetune"].written == 3 and summary.splits["finetune"].shards == 2
    assert samples[2].image.size == (32, 16)  # 80x40 PNG shrunk, aspect kept
    assert samples[0].meta["source_meta"]["url"] == "http://x/000000000"


def test_img2dataset_url_opened_by_webdataset(tmp_path):
    tar = write_tar(tmp_path / "remote.tar", sample_members("k1", "one") + sample_members("k2", "two"))
    summary = ingest("img2dataset", tmp_path / "data", CFG, path=[f"pipe:cat {tar}", f"file:{tar}"])
    # the same shard twice: the second copy's keys are duplicates
    assert summary.total.written == 2 and summary.total.skipped == {"duplicate_key": 2}


def test_coco_one_pair_per_image_keeps_all_captions(tmp_path):
    captions = write_coco(
        tmp_path / "coco",
        {"000000000001.jpg": image_bytes((64, 48)), "000000000002.png": image_bytes(fmt="PNG")},
        {"000000000001.jpg": ["  A dog\non grass. ", "", "A brown dog"], "000000000002.png": ["A cup"]},
    )
    summary = ingest("coco", tmp_path / "data", CFG, path=captions, images=tmp_path / "coco" / "images")
    manifest, samples = _check_layout(tmp_path / "data", "pretrain", 2)
    assert manifest["caption"].tolist() == ["A dog on grass.", "A cup"]
    assert samples[0].meta["captions"] == ["A dog on grass.", "A brown dog"]
    assert samples[0].meta["source_meta"]["image_id"] == 1
    assert summary.total.seen == 2 and summary.sources == ["coco"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_with_configured_columns(tmp_path, fmt):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.webp"):
        Image.open(io.BytesIO(image_bytes())).save(tmp_path / "imgs" / name)
    frame = pd.DataFrame({"file": ["imgs/a.jpg", "imgs/b.webp"], "text": ["first", "second"], "id": ["x.1", "x/2"]})
    table = tmp_path / f"pairs.{fmt}"
    frame.to_csv(table, index=False) if fmt == "csv" else frame.to_parquet(table)
    cfg = CFG.model_copy(update={"image_column": "file", "caption_column": "text", "key_column": "id"})
    summary = ingest("table", tmp_path / "data", cfg, path=table)
    manifest, _ = _check_layout(tmp_path / "data", "pretrain", 2)
    assert manifest["key"].tolist() == ["x_1", "x_2"]  # '.' and '/' sanitised
    assert summary.total.written == 2


def test_table_missing_column_is_a_clear_error(tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame({"image": ["a.jpg"], "caption": ["c"]}).to_csv(table, index=False)
    with pytest.raises(ValueError, match="no column"):
        ingest("table", tmp_path / "data", CFG.model_copy(update={"caption_column": "text"}), path=table)


def test_reingesting_a_split_replaces_it_and_keeps_others(tmp_path):
    root = tmp_path / "data"
    write_tar(tmp_path / "five.tar", [m for k in "abcde" for m in sample_members(k, f"caption {k}")])
    write_tar(tmp_path / "z.tar", sample_members("z", "only z"))
    write_tar(tmp_path / "y.tar", sample_members("y", "only y"))
    ingest("img2dataset", root, CFG, path=tmp_path / "five.tar", split="test")
    ingest("img2dataset", root, CFG, path=tmp_path / "z.tar", split="finetune")
    assert len(list_shards(root, "test")) == 3
    summary = ingest("img2dataset", root, CFG, path=tmp_path / "y.tar", split="test")
    assert len(list_shards(root, "test")) == 1  # stale shards and parts removed
    assert sorted(read_manifest(root)["key"]) == ["y", "z"]
    assert {s: c.written for s, c in summary.splits.items()} == {"finetune": 1, "test": 1}
    # the same key in two splits is refused at merge time (keys are unique across splits)
    with pytest.raises(ValueError, match="more than one"):
        ingest("img2dataset", root, CFG, path=tmp_path / "z.tar", split="test")
    assert sorted(read_manifest(root)["key"]) == ["y", "z"]  # refused before anything was replaced
    assert [s.key for s in iter_samples(list_shards(root, "test"), decode=False)] == ["y"]


def test_sanitize_key():
    assert sanitize_key("a.b/c d") == "a_b_c_d"
    assert sanitize_key("...") == ""
    assert sanitize_key(12) == "12"


def test_params_section_mirrors_config_defaults():
    from pathlib import Path

    from ramflow_io.params import stage_config

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    assert stage_config(IngestConfig, "ingest", params) == IngestConfig()
