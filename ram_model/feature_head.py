"""The few-photo recipe: a frozen backbone whose tokens are computed once, and the RAM decoder
trained on those cached tokens for many epochs.

Why: on a few hundred real photos, fine-tuning the backbone end to end at a small input size
(the embedded corpus' recipe) over-fits and loses to a linear probe on the same backbone. With
the backbone frozen, each image is decoded, resized and run through the backbone once per view
(the photo and its mirror image); every epoch afterwards costs only the decoder
(``image_proj`` + ``tagging_head`` + readout), so a larger input size (320 px) and tens of epochs fit
in a few CPU seconds.

Also here: the linear-probe baseline on the same cached tokens (one logistic regression per
class on the mean-pooled backbone features) and out-of-fold scoring, which the data engine of
:mod:`engine_rounds.feature_engine` uses to tag training images with a model that never saw them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ram_model.backbones import backbone_tokens
from ram_model.losses import asymmetric_loss, large_loss_mask
from ram_model.registry import create_model

log = logging.getLogger(__name__)


class FeatureCacheConfig(BaseModel):
    """How images become cached backbone tokens."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    image_size: int = Field(320, ge=32, description="square side: the whole photo is squashed to it")
    flip: bool = Field(True, description="also cache the mirror image (a second view)")
    batch_size: int = Field(16, ge=1, description="images per backbone forward")
    grid_pool: int = Field(2, ge=1, description="average-pool the token grid by this factor (10x10 -> 5x5 at "
                                                "320 px): the decoder's cost scales with the token count")


class HeadTrainConfig(BaseModel):
    """Training of the decoder on cached tokens (the backbone never runs)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    epochs: int = Field(60, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    token_dropout: float = Field(0.25, ge=0, lt=1, description="fraction of grid tokens dropped per sample")
    mean_residual: bool = Field(False, description="add a linear readout of the standardised mean backbone "
                                                   "feature through the shared tag queries (TokenTagger)")
    gamma_neg: float | None = Field(None, ge=0, description="ASL negative focusing; None: the model config's")
    asl_clip: float | None = Field(None, ge=0, lt=1, description="ASL negative clip; None: the model config's")
    reject_negatives: float = Field(0.0, ge=0, lt=1, description="fraction of a batch's negatives with the "
                                                                 "largest loss left out (missing labels)")
    seed: int = 0


def load_square(path: str | Path, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One image file -> ``[3, size, size]`` normalised tensor (aspect not kept: squashed)."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0  # [H, W, 3]
    x = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_tokens(model, image_paths: Sequence[str | Path], cfg: FeatureCacheConfig) -> torch.Tensor:
    """Backbone tokens of every image and view: ``[N, V, hw, Cb]`` float16 (V = 2 with flip).

    ``model`` is a :class:`ram_model.model.RamModel`; only its ``visual_encoder`` runs, in eval
    mode (frozen batch-norm statistics)."""
    backbone = model.visual_encoder
    was_training = backbone.training
    backbone.eval()
    mean, std = model.config.mean, model.config.std
    out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for start in range(0, len(image_paths), cfg.batch_size):
        images = torch.stack([load_square(p, cfg.image_size, mean, std)
                              for p in image_paths[start:start + cfg.batch_size]])  # [B, 3, S, S]
        views = [images, images.flip(-1)] if cfg.flip else [images]
        toks = [_pooled_grid(backbone, v, cfg.grid_pool) for v in views]  # V x [B, hw, Cb]
        out.append(torch.stack(toks, dim=1).to(torch.float16))  # [B, V, hw, Cb]
    backbone.train(was_training)
    tokens = torch.cat(out) if out else torch.zeros(0)
    log.info("cached tokens %s of %d images in %.1fs", tuple(tokens.shape), len(image_paths),
             time.perf_counter() - t0)
    return tokens


def _pooled_grid(backbone, images: torch.Tensor, pool: int) -> torch.Tensor:
    """Backbone tokens ``[B, h*w, Cb]`` after ``pool x pool`` average pooling of the grid."""
    tokens, (h, w) = backbone_tokens(backbone, images)  # [B, hw, Cb]
    if pool <= 1:
        return tokens
    b, _, c = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, c, h, w)
    grid = torch.nn.functional.avg_pool2d(grid, pool, ceil_mode=True)  # [B, Cb, h', w']
    return grid.flatten(2).transpose(1, 2)


def pooled_features(tokens: torch.Tensor) -> np.ndarray:
    """``[N, V, hw, Cb]`` -> mean-pooled backbone features ``[N, V, Cb]`` (float32 numpy)."""
    return tokens.float().mean(2).numpy()


def head_parameters(model) -> list[torch.nn.Parameter]:
    """Trainable parameters of the recognition path on cached tokens (backbone excluded)."""
    skip = {"visual_encoder", "teacher"}
    return [p for n, p in model.named_parameters() if p.requires_grad and not skip & set(n.split("."))]


class TokenTagger(torch.nn.Module):
    """The RAM model on cached backbone tokens, plus (optionally) a mean-token residual.

    Logit of tag c = RAM decoder logit + ``<q_c, A z> / sqrt(d)`` where ``q_c`` is the decoder's own
    query of tag c (``relu(wordvec_proj(label_embed[c]))``, normalised), ``z`` the standardised mean
    backbone feature of the image and ``A`` one linear map ``Cb -> d`` shared by all tags. Why: on
    a hundred photos the cross-attention decoder alone under-fits what a linear probe on the
    mean feature gets; the residual is a low-rank bilinear probe that keeps the model open-set
    (a new tag only needs its text embedding) and, with ``d`` >= the number of tags and linearly
    independent tag embeddings, can represent any linear probe. ``A`` starts at zero, so the
    untrained residual leaves the decoder's logits unchanged."""

    def __init__(self, ram, mean_residual: bool):
        super().__init__()
        self.ram = ram
        cb, d = ram.visual_encoder.num_features, ram.config.decoder_dim
        self.register_buffer("feat_mean", torch.zeros(cb))
        self.register_buffer("feat_std", torch.ones(cb))
        self.residual = torch.nn.Linear(cb, d) if mean_residual else None
        if self.residual is not None:
            torch.nn.init.zeros_(self.residual.weight)
            torch.nn.init.zeros_(self.residual.bias)

    @property
    def num_tags(self) -> int:
        return self.ram.num_tags

    def set_feature_stats(self, tokens: torch.Tensor) -> None:
        """Per-channel mean / std of the mean-pooled features of ``tokens [N, V, hw, Cb]``."""
        feats = tokens.float().mean(2).flatten(0, 1)  # [N*V, Cb]
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp(min=1e-4) if len(feats) > 1 else torch.ones_like(self.feat_std))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Backbone tokens ``[B, hw, Cb]`` -> tag logits ``[B, C]``."""
        logits, _ = self.ram._decode_tags(self.ram.project_tokens(tokens))  # [B, C]
        if self.residual is None:
            return logits
        z = self.residual((tokens.mean(1) - self.feat_mean) / self.feat_std)  # [B, d]
        queries = self.ram._queries(None)  # [C, d]
        return logits + z @ queries.T / queries.shape[-1] ** 0.5


def token_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, hw, Cb]`` -> ``[B, C]`` for a :class:`TokenTagger` or a bare RAM model."""
    if isinstance(model, TokenTagger):
        return model(tokens)
    return model._decode_tags(model.project_tokens(tokens)).logits


def _drop_tokens(tokens: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Keep a random ``1 - rate`` of the grid tokens of each sample: ``[B, hw, C] -> [B, k, C]``."""
    if rate <= 0:
        return tokens
    b, n, c = tokens.shape
    k = max(1, int(round(n * (1 - rate))))
    idx = torch.rand(b, n, generator=gen).argsort(dim=1)[:, :k]  # [B, k]
    return tokens.gather(1, idx.unsqueeze(-1).expand(b, k, c))


def train_head(model, tokens: torch.Tensor, targets: np.ndarray, cfg: HeadTrainConfig,
               weights: np.ndarray | None = None) -> dict[str, Any]:
    """Train ``model``'s decoder on cached ``tokens [N, V, hw, Cb]`` against ``targets [N, C]``.

    Each epoch every image appears once, in a random view, with ``token_dropout`` of its grid
    tokens left out (the mean token is computed from the kept ones). ``weights [N, C]`` (optional)
    scale each entry's loss, e.g. to trust generated labels less than caption labels."""
    c = model.ram.config if isinstance(model, TokenTagger) else model.config
    gamma_neg = c.gamma_neg if cfg.gamma_neg is None else cfg.gamma_neg
    clip = c.asl_clip if cfg.asl_clip is None else cfg.asl_clip
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = head_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, v = tokens.shape[0], tokens.shape[1]
    steps_per_epoch = max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1, anneal_strategy="cos")
    y = torch.as_tensor(targets, dtype=torch.float32)
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            view = torch.randint(0, v, (len(idx),), generator=gen)
            batch = tokens[idx, view].float()  # [B, hw, Cb]
            batch = _drop_tokens(batch, cfg.token_dropout, gen)
            logits = token_logits(model, batch)  # [B, C]
            if w is None:
                loss = asymmetric_loss(logits, y[idx], gamma_neg, c.gamma_pos, clip, c.asl_eps, c.asl_reduction,
                                       reject_negatives=cfg.reject_negatives)
            else:
                loss = _weighted_asl(logits, y[idx], w[idx], gamma_neg, c.gamma_pos, clip, c.asl_eps,
                                     cfg.reject_negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
    model.eval()
    return {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": losses[0] if losses else None,
            "last_epoch_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None}


def _weighted_asl(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, gamma_neg: float,
                  gamma_pos: float, clip: float, eps: float, reject_negatives: float = 0.0) -> torch.Tensor:
    """Asymmetric loss with a weight per entry ``[B, C]``, summed over tags, averaged over images."""
    p = torch.sigmoid(logits)
    p_neg = (1.0 - p + clip).clamp(max=1.0) if clip > 0 else 1.0 - p
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    with torch.no_grad():
        pt = p * targets + p_neg * (1 - targets)
        focus = torch.pow(1 - pt, gamma_pos * targets + gamma_neg * (1 - targets))
    loss = -loss * focus * weights  # [B, C], >= 0
    if reject_negatives > 0:
        loss = loss * large_loss_mask(loss, targets, reject_negatives)
    return loss.sum() / max(logits.shape[0], 1)


@torch.no_grad()
def score_head(model, tokens: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Sigmoid scores ``[N, C]`` averaged over the cached views."""
    model.eval()
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size].float()  # [B, V, hw, Cb]
        b, v = chunk.shape[:2]
        logits = token_logits(model, chunk.flatten(0, 1))  # [B*V, C]
        out.append(torch.sigmoid(logits).view(b, v, -1).mean(1))
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_tags), dtype=np.float32)


def new_head_model(model_name: str, tag_names: Sequence[str], tag_embeddings: torch.Tensor,
                   overrides: dict[str, Any], backbone=None):
    """A fresh RAM model; ``backbone`` (a module) is shared instead of loading the weights again."""
    model = create_model(model_name, pretrained=backbone is None, tag_names=list(tag_names),
                         tag_embeddings=tag_embeddings, **overrides)
    if backbone is not None:
        model.visual_encoder = backbone
    model.visual_encoder.requires_grad_(False)
    return model


def fit_head(model_name: str, tag_names: Sequence[str], tag_embeddings: torch.Tensor, overrides: dict[str, Any],
             backbone, tokens: torch.Tensor, targets: np.ndarray, cfg: HeadTrainConfig,
             weights: np.ndarray | None = None):
    """Build a fresh model around the shared ``backbone`` and train its head; returns (model, stats)."""
    torch.manual_seed(cfg.seed)  # same initial head for the same seed
    model = TokenTagger(new_head_model(model_name, tag_names, tag_embeddings, overrides, backbone),
                        cfg.mean_residual)
    model.set_feature_stats(tokens)
    stats = train_head(model, tokens, targets, cfg, weights)
    return model, stats


# --------------------------------------------------------------------------- linear probe


def linear_probe_scores(train_feats: np.ndarray, targets: np.ndarray, eval_feats: np.ndarray,
                        c: float = 1.0, seed: int = 0) -> np.ndarray:
    """One logistic regression per class on standardised pooled features.

    ``train_feats [N, V, Cb]``: every view is a training sample; ``eval_feats [M, V, Cb]``:
    probabilities are averaged over views. Classes without positives (or without negatives)
    score their training rate. Returns ``[M, C]``."""
    from sklearn.linear_model import LogisticRegression  # lazy: sklearn, only the linear-probe experiment
    from sklearn.preprocessing import StandardScaler  # lazy: sklearn, only the linear-probe experiment

    n, v, d = train_feats.shape
    x = train_feats.reshape(n * v, d)
    scaler = StandardScaler().fit(x)
    x = scaler.transform(x)
    xe = scaler.transform(eval_feats.reshape(-1, d))
    y = np.repeat(np.asarray(targets) > 0.5, v, axis=0)  # [N*V, C]
    out = np.zeros((xe.shape[0], y.shape[1]), dtype=np.float32)
    for k in range(y.shape[1]):
        pos = int(y[:, k].sum())
        if pos == 0 or pos == len(y):
            out[:, k] = pos / len(y)
            continue
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(x, y[:, k])
        out[:, k] = clf.predict_proba(xe)[:, 1]
    return out.reshape(eval_feats.shape[0], eval_feats.shape[1], -1).mean(1)


def kfold_indices(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """``folds`` disjoint index arrays covering ``range(n)`` (a seeded permutation)."""
    if not 2 <= folds <= n:
        raise ValueError(f"need 2 <= folds <= n, got folds={folds}, n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, folds)]
