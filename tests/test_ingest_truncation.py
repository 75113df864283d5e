"""Cut tar shards: every sample is written, skipped, or lost behind one ``truncated_shard``
count that names the shard, whatever byte the file was cut at."""

from __future__ import annotations

import gzip
import json

import pytest

from _ingest_helpers import members_end, sample_members, tar_boundaries, tar_bytes, tar_layout
from data_engine.ingest import IngestConfig, ingest
from data_engine.ingest.sources import iter_img2dataset
from ramflow_io.shards import ShardWriter, iter_samples, read_manifest

N = 10
KEYS = [f"s{i}" for i in range(N)]
MEMBERS = [m for k in KEYS for m in sample_members(k, f"caption of {k}")]
ORIGINAL = dict((name, data) for name, data in MEMBERS)
TAR = tar_bytes(MEMBERS)
GZ = gzip.compress(TAR, mtime=0)
MARKER = members_end(TAR)  # the first end-of-archive block starts here
LAYOUT = tar_layout(TAR)
CUTS = sorted(set(range(0, len(TAR), 37)) | set(tar_boundaries(TAR)))
GZ_CUTS = sorted(set(range(0, len(GZ), 97)) | {len(GZ) - 1})
CFG = IngestConfig(shard_size=4, max_side=32, progress=False)


def _check_accounting(path, pairs):
    """Written + skipped + the loss behind a truncated_shard item account for all N samples."""
    good = [p for p in pairs if p.skip is None]
    other = [p for p in pairs if p.skip not in (None, "truncated_shard")]
    truncated = [p for p in pairs if p.skip == "truncated_shard"]
    # the samples read are a prefix of the original, each complete and byte-exact
    assert [p.key for p in good] == KEYS[: len(good)]
    for pair in good:
        assert pair.image == ORIGINAL[f"{pair.key}.jpg"]
        assert pair.caption == ORIGINAL[f"{pair.key}.txt"].decode()
        assert pair.meta["source_meta"]["key"] == pair.key  # its .json member was read too
    lost = N - len(good) - len(other)
    assert lost >= 0 and len(truncated) <= 1
    if lost:  # a cut that loses samples is always reported, naming the shard
        assert len(truncated) == 1, f"{lost} sample(s) lost without a truncated_shard count"
        assert truncated[0].key == str(path) and str(path) in truncated[0].detail
        assert f"{len(good) + len(other)} sample(s) before the cut" in truncated[0].detail
    return lost, len(truncated)


@pytest.fixture(scope="module")
def cut_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuts")


@pytest.mark.parametrize("cut", CUTS)
def test_every_cut_point_is_accounted(cut_dir, cut):
    path = cut_dir / f"cut-{cut}.tar"
    path.write_bytes(TAR[:cut])
    lost, truncated = _check_accounting(path, list(iter_img2dataset(path)))
    # cut before the first end-of-archive block is complete: reported (the last sample read
    # may be incomplete, so it counts as lost); after it: nothing lost, nothing reported
    assert (lost > 0, truncated) == ((True, 1) if cut < MARKER + 512 else (False, 0))


@pytest.mark.parametrize("cut", GZ_CUTS)
def test_every_cut_point_of_a_gzipped_tar_is_accounted(cut_dir, cut):
    path = cut_dir / f"cut-{cut}.tar.gz"
    path.write_bytes(GZ[:cut])
    _check_accounting(path, list(iter_img2dataset(path)))


@pytest.mark.parametrize(
    ("tail", "truncated"),
    [(b"", 0), (b"\0" * 512, 0), (b"junk after the end", 1), (TAR, 1)],  # TAR: a second archive appended
    ids=["complete", "extra_zeros", "trailing_bytes", "concatenated"],
)
def test_end_of_archive(tmp_path, tail, truncated):
    path = tmp_path / "whole.tar"
    path.write_bytes(TAR + tail)
    pairs = list(iter_img2dataset(path))
    assert sum(p.skip is None for p in pairs) == N
    assert _check_accounting(path, pairs) == (0, truncated)


def test_one_block_of_the_end_marker_is_enough(tmp_path):
    """A cut after the first end-of-archive block loses nothing (GNU tar accepts it too)."""
    path = tmp_path / "lone_zero_block.tar"
    path.write_bytes(TAR[: MARKER + 512])
    assert _check_accounting(path, list(iter_img2dataset(path))) == (0, 0)


@pytest.mark.parametrize("where", ["in_header", "at_block_boundary", "in_data"])
def test_truncated_shard_in_the_ingest_report(tmp_path, where):
    cut, written = {"in_header": (LAYOUT["s4.jpg"][0] + 100, 3), "at_block_boundary": (LAYOUT["s5.jpg"][0], 4),
                    "in_data": (LAYOUT["s6.txt"][1] + 3, 6)}[where]
    src = tmp_path / "cut.tar"
    src.write_bytes(TAR[:cut])
    summary = ingest("img2dataset", tmp_path / "data", CFG, path=src)
    counts = summary.splits["pretrain"]
    assert counts.skipped == {"truncated_shard": 1} and counts.counts_add_up
    assert counts.seen == counts.written + 1 and counts.written == written  # the sample being read is lost
    assert summary.truncated_shards == {"pretrain": [str(src)]}
    assert "truncated input shard(s)" in summary.format() and str(src) in summary.format()
    stored = json.loads((tmp_path / "data" / "raw" / "summary.json").read_text())
    assert stored["truncated_shards"] == {"pretrain": [str(src)]}
    assert read_manifest(tmp_path / "data")["key"].tolist() == KEYS[: counts.written]


def test_reading_a_cut_canonical_shard_is_an_error(tmp_path):
    path = tmp_path / "shard.tar"
    with ShardWriter(path) as writer:
        for key in KEYS:
            writer.write(key, b"\xff\xd8jpeg", "a caption", {"key": key})
    assert [s.key for s in iter_samples([path], decode=False)] == KEYS
    data = path.read_bytes()
    path.write_bytes(data[: tar_layout(data)["s6.jpg"][0]])  # at a header: tarfile alone sees 6 samples
    with pytest.raises(ValueError, match="truncated or corrupt"):
        list(iter_samples([path], decode=False))
