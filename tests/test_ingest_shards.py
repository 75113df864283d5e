"""Shards round-trip through webdataset + a torch DataLoader with 2 workers; the reader
helpers and the `ramflow ingest` CLI."""

from __future__ import annotations

import json

import pytest

import _ingest_fake_corpus as fake
from ramflow_io.formats import list_shards
from data_engine.ingest import IngestConfig, ingest
from ramflow_io.shards import ShardWriter, iter_samples, make_dataset, read_manifest, shard_urls

CFG = IngestConfig(shard_size=4, max_side=40, progress=False)


@pytest.fixture
def root(tmp_path):
    ingest("embedded", tmp_path, CFG, corpus_cfg=fake.CorpusConfig(n_pretrain=10, n_finetune=2, n_test=3), corpus=fake)
    return tmp_path


def test_dataloader_two_workers_reads_every_sample_once(root):
    import torch
    import webdataset as wds

    urls = [str(p) for p in list_shards(root, "pretrain")]
    assert len(urls) == 3  # 2 workers <= 3 shards
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = {key: (image.size, caption, meta) for key, image, caption, meta in loader}
    manifest = read_manifest(root, split="pretrain")
    assert sorted(got) == sorted(manifest["key"])
    for row in manifest.itertuples():
        size, caption, meta = got[row.key]
        assert size == (row.width, row.height) and caption == row.caption and meta["sha256"] == row.sha256


def test_make_dataset_with_dataloader(root):
    import torch

    urls = shard_urls(root, "pretrain")
    loader = torch.utils.data.DataLoader(
        make_dataset(urls), batch_size=4, num_workers=2, collate_fn=lambda batch: batch
    )
    keys = [key for batch in loader for key, image, caption, meta in batch]
    assert sorted(keys) == sorted(read_manifest(root, split="pretrain")["key"])
    raw = next(iter(make_dataset(urls, decode=False)))
    assert isinstance(raw[1], bytes) and raw[1][:2] == b"\xff\xd8"


def test_iter_samples_in_order(root):
    samples = list(iter_samples(list_shards(root, "test")))
    assert [s.key for s in samples] == read_manifest(root, split="test")["key"].tolist()
    assert samples[0].image.mode == "RGB" and samples[0].shard.endswith("test-000000.tar")


def test_shard_writer_rejects_bad_key_and_is_atomic(tmp_path):
    path = tmp_path / "x.tar"
    with pytest.raises(ValueError, match="invalid shard key"):
        with ShardWriter(path) as writer:
            writer.write("a.b", b"\xff\xd8", "c", {})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_read_manifest_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="ramflow ingest"):
        read_manifest(tmp_path)


def test_cli_ingest_prints_summary(tmp_path, capsys, monkeypatch):
    from orchestration.cli import main

    from _ingest_helpers import sample_members, write_tar

    write_tar(tmp_path / "s.tar", sample_members("a", "one") + sample_members("b", ""))
    params = tmp_path / "params.yaml"
    params.write_text("paths:\n  data_root: %s\ningest:\n  shard_size: 7\n" % (tmp_path / "data"))
    code = main(["ingest", "--params", str(params), "--source", "img2dataset", "--path", str(tmp_path / "s.tar"),
                 "--split", "test", "--no-progress", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["test"] == {"seen": 2, "written": 1, "skipped": {"empty_caption": 1}, "shards": 1}
    assert out["counts_add_up"] is True
    assert read_manifest(tmp_path / "data")["key"].tolist() == ["a"]


def test_cli_embedded_prints_counts_and_noise(tmp_path, capsys):
    corpus = pytest.importorskip("data_engine.corpus")
    if not hasattr(corpus, "measure_noise"):
        pytest.skip("data_engine.corpus is not complete yet")
    from orchestration.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("corpus:\n  seed: 1\n  image_size: 48\n  n_pretrain: 4\n  n_finetune: 2\n  n_test: 3\n")
    code = main(["ingest", "--params", str(params), "--root", str(tmp_path / "data"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "counts add up (seen == written + skipped): yes" in out
    assert "caption noise measured against truth" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith(("pretrain", "finetune", "test "))] == [
        ["pretrain", "4", "4"], ["finetune", "2", "2"], ["test", "3", "3"],
    ]
