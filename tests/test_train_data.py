"""Loader determinism, resumable order, worker/shard handling and label joining."""

from __future__ import annotations

import pytest
import torch

from _train_helpers import TAGS, make_split
from ramflow_io.formats import labels_path, list_shards
from ram_model.data import AugmentConfig, TrainLoader, index_shards, load_label_table, round_robin

AUG = AugmentConfig(image_size=16)


def _loader(root, **kw) -> TrainLoader:
    shards = index_shards(list_shards(root, "pretrain"))
    labels = load_label_table(labels_path(root, "pretrain"), len(TAGS))
    args = dict(micro_batch_size=4, aug=AUG, seed=3, num_workers=2, shuffle_buffer=8)
    args.update(kw)
    return TrainLoader(shards, labels, **args)


def _keys(batches) -> list[list[str]]:
    return [b["keys"] for b in batches]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_split(root, "pretrain", [13, 9, 11], unlabeled_every=7)  # uneven shards, some unlabelled
    return root


def test_round_robin_drops_exhausted_workers():
    assert round_robin([1, 3, 2]) == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]


def test_counts_add_up_and_unlabelled_are_skipped(root):
    loader = _loader(root)
    c = loader.counts
    assert c["images"] == 33
    assert c["skipped_no_labels"] == 4  # keys 6, 13, 20, 27
    assert c["train_samples"] + c["skipped_no_labels"] + c["held_out_validation"] == c["images"]
    seen = [k for b in _keys(loader.iter_epoch(0)) for k in b]
    assert len(seen) == len(set(seen)) == loader.steps_per_epoch(0) * 4
    labels = load_label_table(labels_path(root, "pretrain"), len(TAGS))
    assert all(k in labels for k in seen)


def test_empty_label_lists_are_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = make_split(tmp_path, "pretrain", [8])
    pq.write_table(pa.table({"key": keys, "parse_label_ids": [[] if i < 3 else [0] for i in range(len(keys))]}),
                   labels_path(tmp_path, "pretrain"))
    loader = _loader(tmp_path)
    assert loader.counts["skipped_empty_labels"] == 3 and loader.counts["train_samples"] == 5
    assert {k for b in _keys(loader.iter_epoch(0)) for k in b} <= set(keys[3:])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 1, 2, 3, 5])
def test_same_order_for_any_run_and_workers_capped_by_shards(root, workers):
    loader = _loader(root, num_workers=workers)
    assert loader.n_roles == max(1, min(workers, 3))
    first = list(loader.iter_epoch(0))
    again = list(_loader(root, num_workers=workers).iter_epoch(0))
    assert _keys(first) == _keys(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert first[0]["image"].shape == (4, 3, 16, 16)
    assert first[0]["tag_targets"].shape == (4, len(TAGS))
    assert float(first[0]["tag_targets"].sum()) == 8.0  # two tags per sample
    assert _keys(first) != _keys(list(loader.iter_epoch(1)))  # a new epoch reshuffles


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_gives_the_remaining_batches(root, workers):
    loader = _loader(root, num_workers=workers)
    full = list(loader.iter_epoch(1))
    for skip in (1, 2, 3, len(full) - 1):
        rest = list(loader.iter_epoch(1, skip=skip))
        assert _keys(rest) == _keys(full[skip:]), (workers, skip)
        assert torch.equal(rest[0]["image"], full[skip]["image"])


def test_ranks_split_shards_and_take_equal_steps(root):
    loaders = [_loader(root, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert loaders[0].n_roles == 1  # 3 shards / 2 ranks: one shard per worker at most
    assert loaders[0].steps_per_epoch(0) == loaders[1].steps_per_epoch(0)
    k0 = {k for b in _keys(loaders[0].iter_epoch(0)) for k in b}
    k1 = {k for b in _keys(loaders[1].iter_epoch(0)) for k in b}
    assert k0 and k1 and not k0 & k1


def test_validation_keys_are_held_out(root):
    loader = _loader(root, validation_fraction=0.3)
    assert loader.counts["held_out_validation"] > 0
    from ram_model.data import is_validation_key

    seen = {k for b in _keys(loader.iter_epoch(0)) for k in b}
    assert not any(is_validation_key(k, 0.3) for k in seen)


def test_bad_label_ids_raise(tmp_path, root):
    with pytest.raises(ValueError, match="outside"):
        load_label_table(labels_path(root, "pretrain"), 2)


def test_a_repeated_clean_split_is_read_per_listing_with_its_reserved_keys_left_out(root, tmp_path):
    from ram_model.data import is_validation_key

    clean = make_split(tmp_path, "finetune", [12], seed=5)
    complete = frozenset(clean)
    reserved = frozenset(k for k in clean if is_validation_key(k, 0.5))
    assert 0 < len(reserved) < len(clean)
    shards = index_shards(list_shards(root, "pretrain")) + index_shards(list_shards(tmp_path, "finetune")) * 3
    labels = load_label_table([labels_path(root, "pretrain"), labels_path(tmp_path, "finetune")], len(TAGS))
    loader = TrainLoader(shards, labels, micro_batch_size=4, aug=AUG, seed=3, num_workers=2, shuffle_buffer=8,
                         reserved_keys=reserved, complete_keys=complete)
    c = loader.counts
    usable = len(clean) - len(reserved)
    assert c["images"] == 33 + 12 and c["reserved"] == len(reserved) and c["complete_labels"] == usable
    assert c["repeated_samples"] == 2 * usable
    assert (c["skipped_no_labels"] + c["reserved"] + c["held_out_validation"] + c["train_samples"]
            - c["repeated_samples"]) == c["images"]
    seen: list[str] = []
    for b in loader.iter_epoch(0):
        assert b["complete_labels"].tolist() == [k in complete for k in b["keys"]]
        seen += b["keys"]
    assert not set(seen) & reserved
    clean_seen = [k for k in seen if k in complete]
    assert clean_seen and max(clean_seen.count(k) for k in clean_seen) > 1  # read again per listing
    assert max(clean_seen.count(k) for k in clean_seen) <= 3
    assert [s.path for s in loader.unique_shards()] == [s.path for s in shards[:4]]  # 3 pretrain + finetune
    assert loader.validation_keys().isdisjoint(reserved)
