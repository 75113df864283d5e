"""Losses of RAM: asymmetric tagging loss, caption LM loss, distillation, and their combination.

What RAM does (official ``pretrain.py``): ``loss = loss_t2t + loss_tag / (loss_tag / loss_t2t).detach()
+ loss_dis``. Its ASL sums over all tags and images, so it is orders of magnitude larger than the
token-averaged LM loss; dividing by the detached ratio makes the tag term numerically equal to the
caption loss while keeping the ASL gradient direction (its gradient is scaled by
``loss_t2t / loss_tag``). :func:`combine_losses` implements this as ``tag_loss_rescale="ram"``, with
configurable weights on top; with ``"none"`` (or no caption loss) the weighted tag loss is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 7.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    reduction: str = "batchmean",
    focal_grad: bool = False,
    reject_negatives: float = 0.0,
    complete_rows: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) for multi-label logits ``[B, C]``.

    ``p = sigmoid(x)``; negatives use the shifted probability ``p_m = max(p - clip, 0)``;
    ``L = -y (1-p)^g+ log(p) - (1-y) p_m^g- log(1 - p_m)`` with logs clamped at ``eps``.
    The focusing weight is computed without gradient unless ``focal_grad`` (as RAM does).
    ``reject_negatives``: fraction of the batch's negative entries with the largest loss that
    are left out (see :func:`large_loss_mask`); ``complete_rows`` ``[B]`` bool marks images whose
    labels are complete, whose negatives are never left out. ``weights [B, C]`` scales each entry's
loss (sampled negatives, padding at 0; see :mod:`ram_model.query_sampling`). ``reduction``: ``"sum"`` (RAM), ``"batchmean"``
    (sum over tags / B) or ``"mean"`` (over the entries kept).
    """
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    p_neg = 1.0 - p  # prob of "absent"
    if clip > 0:
        p_neg = (p_neg + clip).clamp(max=1.0)  # = 1 - max(p - clip, 0)
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(focal_grad and torch.is_grad_enabled()):
            pt = p * targets + p_neg * (1 - targets)
            gamma = gamma_pos * targets + gamma_neg * (1 - targets)
            weight = torch.pow(1 - pt, gamma)
        loss = loss * weight
    loss = -loss  # [B, C]
    keep = None
    if reject_negatives > 0:
        keep = large_loss_mask(loss, targets, reject_negatives, complete_rows, weights)  # [B, C], 0 = left out
        loss = loss * keep
    if weights is not None:
        weights = weights.to(loss.dtype)
        loss = loss * weights
        keep = weights if keep is None else keep * weights  # what each entry counts for in "mean"
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / max(logits.shape[0], 1)
    if reduction == "mean":
        return loss.mean() if keep is None else loss.sum() / keep.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def large_loss_mask(loss: torch.Tensor, targets: torch.Tensor, fraction: float,
                    complete_rows: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` mask (1 = keep) that drops the ``fraction`` of negative entries with the largest loss.

    Captions leave tags out, so a parsed label set is missing positives, and training on it
    pushes present tags down. Once the model has learnt the typical images, the negatives it
    is most sure are present (the largest negative losses) are mostly such missing positives:
    rejecting them each batch is "LL-R" of Kim et al., "Large Loss Matters in Weakly Supervised
    Multi-Label Classification" (CVPR 2022). Positives are always kept, and so are the negatives
    of ``complete_rows`` (``[B]`` bool: images with complete labels, e.g. the clean split mixed
    into training); ``fraction`` is then a fraction of the other rows' negatives. Entries of
    ``weights`` 0 (padding) are not negatives; with sampled negatives the fraction is of those drawn.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"reject fraction must be in [0, 1), got {fraction}")
    keep = torch.ones_like(loss)
    negative = targets <= 0  # [B, C]
    if complete_rows is not None:
        negative = negative & ~complete_rows.to(torch.bool)[:, None]
    if weights is not None:
        negative = negative & (weights > 0)
    k = int(fraction * int(negative.sum()))
    if k == 0:
        return keep
    scores = loss.detach().masked_fill(~negative, float("-inf")).flatten()  # [B*C], positives never picked
    keep.view(-1)[scores.topk(k).indices] = 0.0
    return keep


def caption_lm_loss(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy ``logits [B, L, V]`` vs ``target_ids [B, L]``, padding (mask 0) ignored."""
    targets = target_ids.masked_fill(target_mask == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L1 between projected student and teacher image embeddings ``[B, D]`` (RAM's ``loss_dis``)."""
    return F.l1_loss(student, teacher.to(student.dtype))


def combine_losses(
    loss_tag: torch.Tensor,
    loss_caption: torch.Tensor | None = None,
    loss_distill: torch.Tensor | None = None,
    tag_weight: float = 1.0,
    caption_weight: float = 1.0,
    distill_weight: float = 1.0,
    rescale: str = "ram",
) -> torch.Tensor:
    """Total loss; with ``rescale="ram"`` the tag term is rescaled to the caption loss' value."""
    if rescale not in ("ram", "none"):
        raise ValueError(f"unknown tag_loss_rescale {rescale!r}")
    tag_term = loss_tag
    if rescale == "ram" and loss_caption is not None:
        tag_term = loss_tag / (loss_tag / loss_caption).detach().clamp(min=1e-12)
    total = tag_weight * tag_term
    if loss_caption is not None:
        total = total + caption_weight * loss_caption
    if loss_distill is not None:
        total = total + distill_weight * loss_distill
    return total
