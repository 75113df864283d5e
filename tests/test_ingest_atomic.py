"""A failed, crashed or empty re-ingest leaves the previous split and manifest byte-identical;
leftovers of a killed ingest are cleaned up by the next one."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

import _ingest_fake_corpus as fake
from _ingest_helpers import image_bytes, sample_members, snapshot, write_coco, write_tar
from ramflow_io.formats import list_shards, raw_dir
from data_engine.ingest import EmptyIngestError, IngestConfig, ingest
from data_engine.ingest import swap
from ramflow_io.shards import ShardWriter, iter_samples, read_manifest

CFG = IngestConfig(shard_size=4, max_side=32, progress=False)
KEYS = [f"old{i}" for i in range(10)]


def _hidden(root):
    """Staging folders, moved-aside splits, temporary files and markers left under raw/."""
    return sorted(p.name for p in raw_dir(root).iterdir() if p.name.startswith("."))


def _consistent(root):
    """The manifest lists exactly the samples in the shards, split by split."""
    manifest = read_manifest(root)
    for split in set(manifest["split"]):
        keys = [s.key for s in iter_samples(list_shards(root, split), decode=False)]
        assert keys == manifest[manifest["split"] == split]["key"].tolist()


@pytest.fixture
def old_root(tmp_path):
    """A data root with a 10-sample ``pretrain`` split (3 shards) and a 1-sample ``test`` split."""
    root = tmp_path / "data"
    write_tar(tmp_path / "old.tar", [m for k in KEYS for m in sample_members(k, f"caption {k}")])
    write_tar(tmp_path / "other.tar", sample_members("t0", "a test caption"))
    ingest("img2dataset", root, CFG, path=tmp_path / "old.tar")
    ingest("img2dataset", root, CFG, path=tmp_path / "other.tar", split="test")
    assert len(list_shards(root, "pretrain")) == 3
    return root


def _coco(tmp_path, kind):
    images = {f"n{i}.jpg": image_bytes() for i in range(6)}
    path = write_coco(tmp_path / "coco", images, {name: ["a new caption"] for name in images})
    data = json.loads(path.read_text())
    if kind == "annotations_not_a_list":
        data["annotations"] = {"1": data["annotations"][0]}
    elif kind == "late_entry_wrong_type":  # read after some images would already be written
        data["images"].append("n9.jpg")
    path.write_text(json.dumps(data))
    return path


def _fail_writer_after(monkeypatch, n):
    """Make the shard writer raise on its ``n+1``-th sample (a crash mid-write)."""
    real, calls = ShardWriter.write, []

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise RuntimeError("injected crash while writing")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", write)


CASES = {
    "coco_annotations_not_a_list": (ValueError, "'annotations' must be a list"),
    "coco_late_entry_wrong_type": (ValueError, r"images\[6\] must be an object"),
    "mistyped_tar_path": (FileNotFoundError, "no such tar shard"),
    "mistyped_tar_pattern": (FileNotFoundError, "no such tar shard"),
    "empty_folder": (FileNotFoundError, "no \\*.tar shards"),
    "every_item_bad": (EmptyIngestError, "no sample to write"),
    "key_taken_by_another_split": (ValueError, "more than one shard/split"),
    "writer_crash_after_5_samples": (RuntimeError, "injected crash"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_failed_reingest_leaves_previous_split_byte_identical(old_root, tmp_path, monkeypatch, case):
    before = snapshot(raw_dir(old_root))
    error, message = CASES[case]
    new = [m for i in range(7) for m in sample_members(f"new{i}", f"new caption {i}")]
    path = write_tar(tmp_path / "new.tar", new)
    source, images = "img2dataset", None
    if case.startswith("coco_"):
        source, path = "coco", _coco(tmp_path, case.removeprefix("coco_"))
        images = path.parent / "images"
    elif case == "mistyped_tar_path":
        path = tmp_path / "nwe.tar"
    elif case == "mistyped_tar_pattern":
        path = str(tmp_path / "shard-{000..003}.tar")
    elif case == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "every_item_bad":
        path = write_tar(tmp_path / "bad.tar", sample_members("b0", "") + sample_members("b1", None))
    elif case == "key_taken_by_another_split":
        path = write_tar(tmp_path / "dupe.tar", new + sample_members("t0", "t0 is a test key"))
    elif case == "writer_crash_after_5_samples":
        _fail_writer_after(monkeypatch, 5)
    with pytest.raises(error, match=message):
        ingest(source, old_root, CFG, path=path, images=images)
    assert snapshot(raw_dir(old_root)) == before
    assert _hidden(old_root) == []  # the staging folder was removed
    assert read_manifest(old_root, split="pretrain")["key"].tolist() == KEYS


def _killed_ingest(root, path, n):
    """Child process: ingest ``path`` into pretrain and die (no cleanup) at its ``n+1``-th sample."""
    real, calls = ShardWriter.write, []

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            os._exit(17)
        return real(self, *args, **kwargs)

    ShardWriter.write = write
    ingest("img2dataset", root, CFG, path=path)


def test_killed_ingest_keeps_old_split_and_next_ingest_cleans_up(old_root, tmp_path):
    before = snapshot(raw_dir(old_root))
    path = write_tar(tmp_path / "new.tar", [m for i in range(7) for m in sample_members(f"new{i}", f"c {i}")])
    child = multiprocessing.get_context("fork").Process(target=_killed_ingest, args=(old_root, path, 5))
    child.start()
    child.join(60)
    assert child.exitcode == 17
    leftovers = _hidden(old_root)
    assert len(leftovers) == 1 and leftovers[0].startswith(".pretrain.tmp-")
    assert {k: v for k, v in snapshot(raw_dir(old_root)).items() if not k.startswith(".")} == before
    assert read_manifest(old_root, split="pretrain")["key"].tolist() == KEYS
    summary = ingest("img2dataset", old_root, CFG, path=path)  # the next ingest succeeds and cleans up
    assert _hidden(old_root) == []
    assert summary.splits["pretrain"].written == 7 and summary.splits["test"].written == 1
    assert read_manifest(old_root, split="pretrain")["key"].tolist() == [f"new{i}" for i in range(7)]
    _consistent(old_root)


def test_crash_after_swap_rolls_forward(old_root, tmp_path, monkeypatch):
    """Killed between swapping the split in and writing the manifest: the next ingest rebuilds
    the manifest from the split folders, so manifest and shards agree again."""
    from data_engine.ingest import steps

    path = write_tar(tmp_path / "new.tar", [m for i in range(3) for m in sample_members(f"new{i}", f"c {i}")])
    real = steps._write_manifest
    monkeypatch.setattr(steps, "_write_manifest", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        ingest("img2dataset", old_root, CFG, path=path)
    assert _hidden(old_root) == [swap.PENDING]
    monkeypatch.setattr(steps, "_write_manifest", real)
    write_tar(tmp_path / "t.tar", sample_members("t1", "another test caption"))
    ingest("img2dataset", old_root, CFG, path=tmp_path / "t.tar", split="test")
    assert _hidden(old_root) == []
    assert read_manifest(old_root, split="pretrain")["key"].tolist() == ["new0", "new1", "new2"]
    _consistent(old_root)


def test_recover_puts_back_a_split_moved_aside(old_root):
    """The two-rename fallback crashed between its renames: the old split is restored."""
    aside = raw_dir(old_root) / ".pretrain.old-0123456789ab"
    os.rename(raw_dir(old_root, "pretrain"), aside)
    (raw_dir(old_root) / ".pretrain.tmp-0123456789ab").mkdir()
    assert swap.recover(old_root) is False
    assert _hidden(old_root) == []
    _consistent(old_root)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_swap_in_replaces_a_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    target, staged = tmp_path / "split", tmp_path / ".split.tmp-x"
    for folder, name in ((target, "old"), (staged, "new")):
        folder.mkdir()
        (folder / f"{name}.tar").write_text(name)
    previous = swap.swap_in(staged, target)
    assert [p.name for p in target.iterdir()] == ["new.tar"]
    assert [p.name for p in previous.iterdir()] == ["old.tar"]


def test_legacy_parts_layout_is_migrated(old_root):
    """Data roots from before parts moved into the split folders still merge."""
    legacy = old_root / "raw" / "parts"
    legacy.mkdir()
    for split in ("pretrain", "test"):
        for part in (raw_dir(old_root, split) / "parts").iterdir():
            os.replace(part, legacy / part.name)
        (raw_dir(old_root, split) / "parts").rmdir()
    from data_engine.ingest import merge_manifests

    summary = merge_manifests(old_root)
    assert summary.splits["pretrain"].written == 10 and not legacy.exists()
    _consistent(old_root)


def test_failed_embedded_reingest_leaves_previous_data(tmp_path, monkeypatch):
    small = fake.CorpusConfig(n_pretrain=6, n_finetune=2, n_test=3)
    ingest("embedded", tmp_path, CFG, corpus_cfg=small, corpus=fake)
    before = snapshot(raw_dir(tmp_path))
    real = fake.iter_corpus

    def failing(cfg, split, start=0, stop=None):
        for i, item in enumerate(real(cfg, split, start, stop)):
            if split == "test" and i == 2:
                raise RuntimeError("generator failed")
            yield item

    monkeypatch.setattr(fake, "iter_corpus", failing)
    with pytest.raises(RuntimeError, match="generator failed"):
        ingest("embedded", tmp_path, CFG, corpus_cfg=small.model_copy(update={"seed": 5}), corpus=fake)
    assert snapshot(raw_dir(tmp_path)) == before
    assert _hidden(tmp_path) == []


def test_cli_reports_a_failed_ingest_in_one_line_and_keeps_the_split(old_root, tmp_path):
    """``ramflow ingest`` with a mistyped path exits non-zero with the reason, not a traceback."""
    from orchestration.cli import main

    before = snapshot(old_root)
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--root", str(old_root), "--source", "img2dataset",
              "--path", str(tmp_path / "typo.tar"), "--no-progress"])
    message = str(exit_info.value.code)
    assert message.startswith("ramflow ingest: no such tar shard") and "unchanged" in message
    assert snapshot(old_root) == before
