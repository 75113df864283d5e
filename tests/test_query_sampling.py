"""Trained tag queries: observed tags only, sampled negatives with importance weights."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import tiny_model
from _train_helpers import TAGS, labelled_root
from ramflow_io.formats import labels_path
from ram_model.data import AugmentConfig, TrainLoader, index_shards, load_label_table
from ram_model.losses import asymmetric_loss
from ram_model.query_sampling import observed_tags, select_queries
from ram_model.train_stage import trained_tags
from ram_model.trainer import Trainer, TrainStageConfig
from ramflow_io.formats import list_shards


def _targets() -> torch.Tensor:
    # [4, 8]: rows with 2, 1, 0 and 3 positives; class 7 never positive
    t = torch.zeros(4, 8)
    t[0, [0, 3]] = 1
    t[1, 5] = 1
    t[3, [1, 2, 6]] = 1
    return t


def test_observed_tags_marks_the_named_classes():
    seen = observed_tags([[0, 2], [], [2, 5]], 7)
    assert seen.tolist() == [True, False, True, False, False, True, False]


def test_without_sampling_the_targets_are_the_trainable_columns():
    t = _targets()
    trainable = torch.ones(8, dtype=torch.bool)
    trainable[7] = False
    q = select_queries(t, trainable, None)
    assert q.tag_ids.tolist() == list(range(7)) and q.weights is None
    assert torch.equal(q.targets, t[:, :7])


def test_a_positive_outside_the_trainable_tags_is_an_error():
    trainable = torch.ones(8, dtype=torch.bool)
    trainable[5] = False
    with pytest.raises(ValueError, match=r"class ids \[5\]"):
        select_queries(_targets(), trainable, None)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_sampling_keeps_every_positive_and_weights_the_negatives(k):
    t = _targets()
    trainable = torch.ones(8, dtype=torch.bool)
    trainable[7] = False
    q = select_queries(t, trainable, k, torch.Generator().manual_seed(0))
    n_pos = t.sum(1).long()
    n_neg = 7 - n_pos  # trainable negatives per row
    drawn = n_neg.clamp(max=k)
    assert q.tag_ids.shape == q.targets.shape == q.weights.shape == (4, int((n_pos + drawn).max()))
    for row in range(4):
        ids, tgt, w = q.tag_ids[row], q.targets[row], q.weights[row]
        real = w > 0
        assert set(ids[tgt > 0].tolist()) == set(torch.nonzero(t[row]).squeeze(1).tolist())
        assert torch.equal(tgt, t[row, ids] * real)  # targets are the gathered truth (padding: 0)
        negs = ids[real & (tgt == 0)]
        assert len(negs) == drawn[row] and len(set(negs.tolist())) == len(negs)  # without replacement
        assert 7 not in negs.tolist()  # never an untrainable tag
        assert torch.allclose(w[real & (tgt == 0)], torch.tensor(float(n_neg[row] / drawn[row])))
        assert torch.all(w[tgt > 0] == 1)


def test_sampling_is_reproducible_from_the_generator_seed():
    t = _targets()
    a = select_queries(t, None, 2, torch.Generator().manual_seed(3))
    b = select_queries(t, None, 2, torch.Generator().manual_seed(3))
    c = select_queries(t, None, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a.tag_ids, b.tag_ids)
    assert not torch.equal(a.tag_ids, c.tag_ids)


def test_weighted_sampled_loss_is_unbiased():
    """Averaged over draws, the weighted loss over sampled negatives equals the full ASL loss."""
    torch.manual_seed(0)
    logits = torch.randn(4, 8) * 2
    t = _targets()
    full = asymmetric_loss(logits, t, gamma_neg=2.0, reduction="sum")
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(3000):
        q = select_queries(t, None, 2, gen)
        draws.append(asymmetric_loss(logits.gather(1, q.tag_ids), q.targets, gamma_neg=2.0, reduction="sum",
                                     weights=q.weights))
    assert torch.stack(draws).mean().item() == pytest.approx(full.item(), rel=0.02)


def test_padding_entries_are_never_rejected_as_missing_labels():
    logits = torch.full((2, 4), 5.0)  # every entry confident: large negative losses
    targets = torch.zeros(2, 4)
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    loss = asymmetric_loss(logits, targets, reduction="sum", reject_negatives=0.5, weights=weights)
    # 6 real negatives, half of them (3) rejected: 3 entries' loss remains, padding adds nothing
    one = asymmetric_loss(logits[:1, :1], targets[:1, :1], reduction="sum")
    assert loss.item() == pytest.approx(3 * one.item(), rel=1e-5)


def test_per_image_queries_score_like_the_full_tag_set():
    """Queries never attend to each other, so a per-image subset gets the same logits."""
    model = tiny_model().eval()
    images = torch.randn(3, 3, 96, 96)
    ids = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 0, 0]])  # [B, K]
    with torch.no_grad():
        tokens, _ = model.encode_image(images)
        full = model._decode_tags(tokens).logits  # [B, C]
        sub = model._decode_tags(tokens, ids).logits  # [B, K]
    torch.testing.assert_close(sub, full.gather(1, ids), rtol=1e-5, atol=1e-5)


def test_forward_trains_a_subset_with_weights():
    model = tiny_model().train()
    batch = {"image": torch.randn(2, 3, 96, 96), "tag_targets": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
             "tag_ids": torch.tensor([[0, 3], [2, 4]]), "tag_weights": torch.tensor([[1.0, 2.0], [2.0, 0.0]])}
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.wordvec_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"tag_targets must be \[B, 2\]"):
        model({**batch, "tag_targets": torch.zeros(2, 5)})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return labelled_root(tmp_path_factory.mktemp("data"), [16, 16])


def _trainer(root, tmp_path, **kw) -> Trainer:
    from _train_helpers import TinyTagger

    cfg = TrainStageConfig(model="_train_helpers:tiny_tagger", batch_size=8, micro_batch_size=4, max_steps=3,
                           warmup_steps=1, num_workers=0, validation_fraction=0.0, **kw)
    # one tag more than the labels name ("extra" is never labelled)
    loader = TrainLoader(index_shards(list_shards(root, "pretrain")),
                         load_label_table(labels_path(root, "pretrain"), len(TAGS) + 1), cfg.micro_batch_size,
                         AugmentConfig(image_size=16), num_workers=0, shuffle_buffer=8)
    return Trainer(TinyTagger(num_classes=len(TAGS) + 1), loader, cfg, tmp_path,
                   trainable_tags=trained_tags(cfg, loader))


def test_observed_training_leaves_the_unlabelled_tag_out(root, tmp_path):
    t = _trainer(root, tmp_path, train_tags="observed", sampled_negatives=2)
    assert t.trainable_tags.tolist() == [True] * len(TAGS) + [False]
    batch = next(iter(t.loader.iter_epoch(0)))
    first, again = t._prepare(batch), t._prepare(batch)
    assert torch.equal(first["tag_ids"], again["tag_ids"])  # same place in the run, same draw
    assert len(TAGS) not in first["tag_ids"].tolist()
    t.state.step = 1
    assert not torch.equal(t._prepare(batch)["tag_ids"], first["tag_ids"])
    summary = t.fit()
    assert summary.steps == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in summary.history)


def test_all_tags_is_the_default_and_adds_no_keys(root, tmp_path):
    t = _trainer(root, tmp_path)
    assert t.trainable_tags is None
    batch = t._prepare(next(iter(t.loader.iter_epoch(0))))
    assert "tag_ids" not in batch and batch["tag_targets"].shape[1] == len(TAGS) + 1
