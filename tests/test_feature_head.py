"""The few-photo recipe on tiny synthetic data: cached tokens, the decoder trained on them, the
linear probe, the out-of-fold data engine and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_rounds.feature_engine import (FeatureEngineConfig, generate_labels, generation_threshold, label_quality,
                                        label_weights, out_of_fold_scores)
from ram_model.evaluate import mean_average_precision
from ram_model.feature_head import (FeatureCacheConfig, HeadTrainConfig, extract_tokens, kfold_indices,
                                    linear_probe_scores, pooled_features, score_head, train_head)
from ram_model.paired_bootstrap import paired_bootstrap


def _tiny_model(n_tags: int = 3):
    from ram_model.registry import create_model

    torch.manual_seed(0)
    emb = torch.randn(n_tags, 384)
    model = create_model("ram_tiny", pretrained=False, tag_names=[f"t{i}" for i in range(n_tags)],
                         tag_embeddings=emb, caption=False, image_size=32)
    model.visual_encoder.requires_grad_(False)
    return model


def _planted_tokens(n: int = 48, c: int = 3, dim: int = 256, seed: int = 0):
    """Tokens ``[n, 2, 4, dim]`` where tag k present adds a fixed direction to every token."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.4).astype(np.float32)
    dirs = rng.normal(size=(c, dim)) * 2.0
    base = rng.normal(size=(n, 2, 4, dim)) * 0.5
    tokens = base + (y @ dirs)[:, None, None, :]
    return torch.tensor(tokens, dtype=torch.float16), y


def test_extract_tokens_caches_both_views_pooled(tmp_path):
    from PIL import Image

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        Image.new("RGB", (50 + 10 * i, 40), (30 * i, 100, 200)).save(p)
        paths.append(p)
    model = _tiny_model()
    tokens = extract_tokens(model, paths, FeatureCacheConfig(image_size=64, grid_pool=2, batch_size=2))
    # ram_tiny: stride 16 -> 4x4 grid at 64 px, pooled 2x2 -> 4 tokens of 256 channels
    assert tokens.shape == (3, 2, 4, 256) and tokens.dtype == torch.float16
    assert pooled_features(tokens).shape == (3, 2, 256)


def test_decoder_on_cached_tokens_learns_planted_tags():
    tokens, y = _planted_tokens()
    model = _tiny_model()
    before = mean_average_precision(score_head(model, tokens[32:]), y[32:])
    stats = train_head(model, tokens[:32], y[:32], HeadTrainConfig(epochs=30, batch_size=8, lr=3e-3))
    after = mean_average_precision(score_head(model, tokens[32:]), y[32:])
    assert stats["steps"] == 30 * 4 and stats["last_epoch_loss"] < stats["first_loss"]
    assert after > 0.9 and after > before


def test_linear_probe_learns_planted_tags_and_handles_absent_classes():
    tokens, y = _planted_tokens()
    y[:32, 2] = 0  # no positive of class 2 in training: it scores its (zero) training rate
    feats = pooled_features(tokens)
    scores = linear_probe_scores(feats[:32], y[:32], feats[32:])
    assert scores.shape == (16, 3)
    assert mean_average_precision(scores[:, :2], y[32:, :2]) > 0.9
    assert np.all(scores[:, 2] == 0)


@pytest.mark.parametrize("precision, expected", [(1.0, 0.9), (0.75, 0.6), (0.6, 0.4), (0.01, 0.1)])
def test_generation_threshold_is_the_lowest_score_meeting_the_parsed_precision(precision, expected):
    scores = np.array([[0.9, 0.8], [0.7, 0.6], [0.4, 0.1]])
    parsed = np.array([[1, 0], [1, 1], [0, 0]])
    # ranked: 0.9(1) 0.8(0) 0.7(1) 0.6(1) 0.4(0) 0.1(0) -> running precision 1, .5, .67, .75, .6, .5
    assert generation_threshold(scores, parsed, precision) == pytest.approx(expected)


def test_generate_labels_adds_only_above_threshold_and_never_removes():
    scores = np.array([[0.9, 0.8], [0.7, 0.6], [0.4, 0.1]])
    parsed = np.array([[1, 0], [1, 1], [0, 0]], dtype=np.float32)
    labels, summary = generate_labels(scores, parsed, FeatureEngineConfig(parsed_precision=0.75, min_score=0.0))
    assert summary["threshold"] == pytest.approx(0.6) and summary["added"] == 1
    assert labels.tolist() == [[1, 1], [1, 1], [0, 0]]
    w = label_weights(parsed, labels, 0.5)
    assert w.tolist() == [[1, 0.5], [1, 1], [1, 1]]
    q = label_quality(labels, np.array([[1, 1], [1, 0], [0, 0]]))
    assert q["precision"] == pytest.approx(0.75) and q["recall"] == 1.0


def test_out_of_fold_scores_never_score_an_image_with_its_own_fold():
    seen = []

    def fit_score(train_idx, held_idx):
        assert not set(train_idx) & set(held_idx)
        seen.extend(held_idx.tolist())
        return np.full((len(held_idx), 2), float(len(train_idx)))

    oof = out_of_fold_scores(fit_score, 10, 5)
    assert sorted(seen) == list(range(10)) and np.all(oof == 8.0)
    assert sum(len(p) for p in kfold_indices(10, 3)) == 10
    with pytest.raises(ValueError):
        kfold_indices(3, 5)


def test_paired_bootstrap_of_a_scorer_against_itself_and_a_worse_one():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 4)) < 0.3).astype(np.float32)
    good = y + rng.normal(scale=0.3, size=y.shape)
    bad = rng.random(y.shape)
    same = paired_bootstrap(good, good, y, n_boot=50)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    better = paired_bootstrap(good, bad, y, n_boot=200)
    assert better["diff"] > 0.3 and better["low"] > 0 and better["p_le_0"] == 0
    with pytest.raises(ValueError):
        paired_bootstrap(good[:5], bad, y)


def test_token_tagger_residual_starts_at_the_decoder_and_learns_planted_tags():
    from ram_model.feature_head import TokenTagger, head_parameters, token_logits

    tokens, y = _planted_tokens()
    ram = _tiny_model()
    tagger = TokenTagger(ram, mean_residual=True)
    tagger.set_feature_stats(tokens[:32])
    batch = tokens[:4, 0].float()  # [4, hw, Cb]
    # zero-initialised residual: the same logits as the bare decoder
    torch.testing.assert_close(token_logits(tagger, batch), token_logits(ram, batch))
    names = {n for n, p in tagger.named_parameters() if any(p is q for q in head_parameters(tagger))}
    assert "residual.weight" in names and not any("visual_encoder" in n for n in names)
    stats = train_head(tagger, tokens[:32], y[:32], HeadTrainConfig(epochs=30, batch_size=8, lr=3e-3,
                                                                    mean_residual=True))
    assert stats["last_epoch_loss"] < stats["first_loss"]
    assert mean_average_precision(score_head(tagger, tokens[32:]), y[32:]) > 0.9


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reject", [0.0, 0.1])
def test_train_head_loss_options_train_with_and_without_entry_weights(weighted, reject):
    tokens, y = _planted_tokens(n=24)
    model = _tiny_model()
    weights = np.full_like(y, 0.5) if weighted else None
    cfg = HeadTrainConfig(epochs=3, batch_size=8, gamma_neg=2.0, asl_clip=0.1, reject_negatives=reject)
    stats = train_head(model, tokens, y, cfg, weights)
    assert stats["steps"] == 9 and np.isfinite(stats["last_epoch_loss"])


def test_fit_head_returns_a_tagger_with_feature_stats_of_its_tokens():
    from ram_model.feature_head import TokenTagger, fit_head

    tokens, y = _planted_tokens(n=16)
    ram = _tiny_model()
    model, _ = fit_head("ram_tiny", [f"t{i}" for i in range(3)], ram.label_embed, {"caption": False,
                        "image_size": 32}, ram.visual_encoder, tokens, y,
                        HeadTrainConfig(epochs=1, batch_size=8, mean_residual=True))
    assert isinstance(model, TokenTagger) and model.residual is not None
    torch.testing.assert_close(model.feat_mean, tokens.float().mean(2).flatten(0, 1).mean(0))


def test_per_class_engine_thresholds_each_tag_on_its_own_pairs():
    # tag 0: well ranked (parsed on its top images) -> the unnamed image scored among them is added;
    # tag 1: named on too few images to calibrate -> nothing added despite a high score
    scores = np.array([[0.9, 0.95], [0.8, 0.1], [0.7, 0.2], [0.6, 0.3], [0.1, 0.4]])
    parsed = np.array([[1, 1], [1, 0], [0, 0], [1, 0], [0, 0]], dtype=np.float32)
    cfg = FeatureEngineConfig(parsed_precision=0.75, per_class=True, min_parsed=2, min_score=0.0)
    labels, summary = generate_labels(scores, parsed, cfg)
    assert labels[:, 0].tolist() == [1, 1, 1, 1, 0] and labels[:, 1].tolist() == [1, 0, 0, 0, 0]
    assert summary["added"] == 1 and summary["threshold"] == pytest.approx(0.6)
    pooled, _ = generate_labels(scores, parsed, FeatureEngineConfig(parsed_precision=0.75, min_score=0.0))
    assert pooled.sum() >= labels.sum()
