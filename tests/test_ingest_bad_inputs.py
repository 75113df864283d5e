"""Every kind of bad input is skipped and counted by reason, and the counts add up."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from _ingest_helpers import cut_tar_inside, image_bytes, png_bomb_header, sample_members, truncated_jpeg, write_coco, write_tar
from data_engine.ingest import EmptyIngestError, IngestConfig, ImageRejected, ingest, normalize_image
from data_engine.ingest.steps import summary_path
from ramflow_io.shards import read_manifest

CFG = IngestConfig(shard_size=3, max_side=32, progress=False)


def _assert_adds_up(summary, root):
    for counts in [*summary.splits.values(), summary.total]:
        assert counts.seen == counts.written + sum(counts.skipped.values())
    stored = json.loads(summary_path(root).read_text())
    assert stored["counts_add_up"] is True
    assert stored["total"]["seen"] == summary.total.seen
    assert len(read_manifest(root)) == summary.total.written


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"definitely not an image", "corrupt_image"),
        (image_bytes()[:40] + b"\x00" * 5, "corrupt_image"),
        (truncated_jpeg(), "truncated_image"),
        (png_bomb_header(), "decompression_bomb"),  # PIL's own bomb error, raised at open
    ],
)
def test_normalize_image_rejects(data, reason):
    with pytest.raises(ImageRejected) as err:
        normalize_image(data, max_side=32, max_pixels=10**9, jpeg_quality=90)
    assert err.value.reason == reason


def test_pixel_cap_from_config_is_a_bomb():
    normalize_image(image_bytes((40, 30)), max_side=32, max_pixels=1200, jpeg_quality=90)
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        normalize_image(image_bytes((41, 30)), max_side=32, max_pixels=1200, jpeg_quality=90)


def test_alpha_and_palette_images_become_rgb():
    encoded = normalize_image(image_bytes((20, 10), fmt="PNG", mode="RGBA"), max_side=32, max_pixels=10**6, jpeg_quality=90)
    assert (encoded.width, encoded.height) == (20, 10)


def test_img2dataset_bad_members_counted(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    members = (
        sample_members("good1", "a fine photo")
        + sample_members("corrupt", "x", image=b"garbage bytes")
        + sample_members("trunc", "x", image=truncated_jpeg())
        + sample_members("empty", "   \n ")
        + sample_members("nocap", None)
        + sample_members("bomb", "big", image=image_bytes((200, 200)))
        + sample_members("good1", "again")  # duplicate key, not contiguous
        + [("README", b"stray member without an extension")]
        + [("noimage.txt", b"caption without an image")]
        + sample_members("good2", "another fine photo")
    )
    write_tar(src / "00000.tar", members, symlinks=("link.jpg",))  # non-regular member
    write_tar(src / "00001.tar", sample_members("good3", "kept") + sample_members("lost", "cut"))
    cut_tar_inside(src / "00001.tar", "lost.jpg")
    (src / "00002.tar").write_bytes(b"this is not a tar file at all" * 40)
    cfg = CFG.model_copy(update={"max_pixels": 100 * 100})
    summary = ingest("img2dataset", tmp_path / "data", cfg, path=src)
    assert summary.total.written == 3
    assert sorted(read_manifest(tmp_path / "data")["key"]) == ["good1", "good2", "good3"]
    assert summary.total.skipped == {
        "corrupt_image": 1,
        "decompression_bomb": 1,
        "duplicate_key": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "stray_member": 1,
        "truncated_image": 1,
        "truncated_shard": 1,  # 00001.tar, cut inside lost.jpg: good3 is kept
        "unreadable_member": 2,  # link.jpg, 00002.tar (not a tar)
    }
    assert summary.total.seen == 14
    assert summary.truncated_shards == {"pretrain": [str(src / "00001.tar")]}
    assert f"truncated input shard(s), samples after the cut lost: {src / '00001.tar'}" in summary.format()
    _assert_adds_up(summary, tmp_path / "data")


@pytest.mark.parametrize("workers", [1, 2])
def test_coco_bad_items_counted(tmp_path, workers):
    captions = write_coco(
        tmp_path / "coco",
        {"ok.jpg": image_bytes(), "gone.jpg": None, "nocap.jpg": image_bytes(), "blank.jpg": image_bytes(),
         "bad.jpg": b"\xff\xd8\xff garbage"},
        {"ok.jpg": ["fine"], "gone.jpg": ["where"], "blank.jpg": [" ", ""], "bad.jpg": ["x"]},
        orphan_ids=(999,),
    )
    cfg = CFG.model_copy(update={"workers": workers})
    summary = ingest("coco", tmp_path / "data", cfg, path=captions, images=tmp_path / "coco" / "images")
    assert summary.total.written == 1
    assert summary.total.skipped == {
        "corrupt_image": 1, "empty_caption": 1, "missing_caption": 1, "missing_image": 2,
    }
    _assert_adds_up(summary, tmp_path / "data")


def test_table_bad_rows_counted(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "b.jpg").write_bytes(image_bytes((30, 30)))
    frame = pd.DataFrame(
        {
            "image": ["a.jpg", "a.jpg", "b.jpg", None, "missing.jpg", "b.jpg"],
            "caption": ["one", "dup", None, "no image", "file absent", ""],
            "key": ["k.1", "k_1", "k2", "k3", "k4", "..."],
        }
    )
    frame.to_parquet(tmp_path / "t.parquet")
    cfg = CFG.model_copy(update={"key_column": "key"})
    summary = ingest("table", tmp_path / "data", cfg, path=tmp_path / "t.parquet")
    assert summary.total.written == 1
    assert summary.total.skipped == {
        "duplicate_key": 1, "invalid_key": 1, "missing_caption": 1, "missing_image": 2,
    }
    _assert_adds_up(summary, tmp_path / "data")


def test_everything_skipped_is_an_error_with_the_counts(tmp_path):
    write_tar(tmp_path / "bad.tar", sample_members("a", "") + sample_members("b", None))
    with pytest.raises(EmptyIngestError, match=r"read 2 item\(s\), skipped: empty_caption=1, missing_caption=1") as err:
        ingest("img2dataset", tmp_path / "data", CFG, path=tmp_path / "bad.tar")
    assert (err.value.counts.seen, err.value.counts.written) == (2, 0)
    assert not (tmp_path / "data" / "raw" / "pretrain").exists()  # no empty split was put in place


def test_failing_pipe_url_counted_once(tmp_path):
    write_tar(tmp_path / "ok.tar", sample_members("fine", "a caption"))
    urls = [str(tmp_path / "ok.tar"), f"pipe:cat {tmp_path / 'absent.tar'}", str(tmp_path / "absent2.tar")]
    summary = ingest("img2dataset", tmp_path / "data", CFG, path=urls)
    assert summary.total.written == 1
    assert summary.total.skipped == {"unreadable_member": 2}
    _assert_adds_up(summary, tmp_path / "data")


def test_pixel_cap_above_pil_limit_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="MAX_IMAGE_PIXELS"):
        IngestConfig(max_pixels=10**12)
