"""Which tag queries a training step runs through the recognition decoder.

The decoder refines every tag query against every image: at batch 32 with 144 tags it is about
half of a training step of ``ram_effnet_lite0`` on the CPU (``bench/bench_train_queries.py``).
Two settings of :class:`~ram_model.trainer.TrainStageConfig` cut that work:

- ``train_tags: observed`` trains only the tags that have a positive label somewhere in the
  stage's training labels. A tag no label ever names (e.g. a COCO-80 seed tag the corpus never
  shows) only ever teaches "absent"; left out, it is still scored at inference like any open-set
  tag, through its text embedding and the shared head.
- ``sampled_negatives: K`` runs, per image, its positive tags plus ``K`` negatives drawn
  uniformly from the trainable tags. Each sampled negative's loss is weighted by
  ``negatives available / negatives drawn`` of its row, so the expected loss equals the loss
  over every tag.

Both keep the model unchanged (same parameters, same inference); they change only which
(image, tag) entries a step computes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class QueryBatch(NamedTuple):
    """The decoder's queries for one micro-batch."""

    tag_ids: torch.Tensor        # [K] shared by every row, or [B, K] per row
    targets: torch.Tensor        # [B, K] multi-hot over tag_ids
    weights: torch.Tensor | None  # [B, K] loss weight per entry (None: all 1)


def observed_tags(label_lists: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """``[C]`` bool: the classes that at least one label list names."""
    seen = torch.zeros(num_classes, dtype=torch.bool)
    for ids in label_lists:
        if len(ids):
            seen[torch.as_tensor(list(ids), dtype=torch.long)] = True
    return seen


def select_queries(targets: torch.Tensor, trainable: torch.Tensor | None, sampled_negatives: int | None,
                   generator: torch.Generator | None = None) -> QueryBatch:
    """Restrict ``targets [B, C]`` to the trainable tags, then optionally sample negatives per row.

    ``trainable [C]`` bool (None: every tag). With ``sampled_negatives=K`` each row keeps all its
    positives among the trainable tags and ``min(K, negatives it has)`` negatives drawn uniformly
    without replacement; rows are padded to a common width with zero-weight entries. A positive
    outside ``trainable`` cannot happen when ``trainable`` comes from the same labels, and is an
    error otherwise (its label would be dropped silently).
    """
    batch, num_classes = targets.shape
    allowed = torch.ones(num_classes, dtype=torch.bool) if trainable is None else trainable.to(torch.bool).cpu()
    if allowed.shape != (num_classes,):
        raise ValueError(f"trainable must be [{num_classes}], got {tuple(allowed.shape)}")
    positive = targets.cpu() > 0.5  # [B, C]
    lost = positive & ~allowed
    if lost.any():
        names = sorted(set(torch.nonzero(lost)[:, 1].tolist()))
        raise ValueError(f"positive labels on tags left out of training: class ids {names[:10]}")
    if sampled_negatives is None:
        ids = torch.nonzero(allowed).squeeze(1)  # [K]
        return QueryBatch(ids, targets[:, ids.to(targets.device)], None)
    if sampled_negatives < 1:
        raise ValueError(f"sampled_negatives must be >= 1, got {sampled_negatives}")
    negative = ~positive & allowed  # [B, C]
    n_pos = positive.sum(1)  # [B]
    n_neg = negative.sum(1)  # [B]
    drawn = n_neg.clamp(max=sampled_negatives)  # [B]
    width = int((n_pos + drawn).max())
    # rank: positives first (2 + u), then negatives in random order (u), then the rest (-1)
    u = torch.rand(batch, num_classes, generator=generator)
    rank = torch.where(positive, 2.0 + u, torch.where(negative, u, torch.full_like(u, -1.0)))
    order = rank.topk(width, dim=1).indices  # [B, W]
    slot = torch.arange(width).expand(batch, width)  # [B, W]
    used = slot < (n_pos + drawn)[:, None]  # [B, W]: real entries (the rest is padding)
    is_neg = used & (slot >= n_pos[:, None])
    neg_weight = n_neg.float() / drawn.clamp(min=1).float()  # [B]
    weights = torch.where(is_neg, neg_weight[:, None], used.float())  # [B, W]
    picked = torch.gather(targets.cpu(), 1, order) * used  # [B, W]
    device = targets.device
    return QueryBatch(order.to(device), picked.to(device, targets.dtype), weights.to(device, targets.dtype))
