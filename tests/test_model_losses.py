"""Asymmetric loss vs its formula by hand, large-loss rejection, LM loss padding, RAM's loss rescaling."""

from __future__ import annotations

import math

import pytest
import torch

from ram_model.losses import asymmetric_loss, caption_lm_loss, combine_losses, large_loss_mask


def _asl_by_hand(x: float, y: int, gn=7.0, gp=0.0, clip=0.05, eps=1e-8) -> float:
    p = 1 / (1 + math.exp(-x))
    if y == 1:
        return -((1 - p) ** gp) * math.log(max(p, eps))
    pm = max(p - clip, 0.0)  # shifted probability of negatives
    return -(pm ** gn) * math.log(max(1 - pm, eps))


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
def test_asl_matches_formula(reduction):
    logits = torch.tensor([[2.0, -1.0, 0.3, -3.0], [0.0, 4.0, -0.2, 1.5], [-50.0, 50.0, 0.01, -0.01]])
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]])
    hand = [_asl_by_hand(float(x), int(y)) for x, y in zip(logits.flatten(), targets.flatten())]
    expected = {"sum": sum(hand), "batchmean": sum(hand) / 3, "mean": sum(hand) / 12}[reduction]
    got = asymmetric_loss(logits, targets.float(), 7.0, 0.0, 0.05, 1e-8, reduction)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_asl_negative_below_clip_costs_nothing_and_gamma_pos_used():
    # p = 0.04 < clip: the shifted probability is 0 -> zero loss for a negative
    x = torch.tensor([[math.log(0.04 / 0.96)]])
    assert float(asymmetric_loss(x, torch.zeros(1, 1))) == pytest.approx(0.0, abs=1e-9)
    got = asymmetric_loss(torch.tensor([[0.5]]), torch.ones(1, 1), gamma_pos=2.0, reduction="sum")
    assert float(got) == pytest.approx(_asl_by_hand(0.5, 1, gp=2.0), rel=1e-6)


def test_asl_gradient_pushes_the_right_way():
    logits = torch.zeros(2, 3, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    asymmetric_loss(logits, targets).backward()
    assert (logits.grad[targets == 1] < 0).all() and (logits.grad[targets == 0] > 0).all()


def test_caption_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = (ids != 0).long()
    expected = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, :3], logits[1, :2]]), torch.tensor([1, 2, 3, 4, 5]))
    assert float(caption_lm_loss(logits, ids, mask)) == pytest.approx(float(expected), rel=1e-6)


def test_ram_rescaling_matches_caption_magnitude_and_scales_gradient():
    tag = torch.tensor(40.0, requires_grad=True)
    cap = torch.tensor(2.0, requires_grad=True)
    total = combine_losses(tag, cap, None, rescale="ram")
    assert float(total.detach()) == pytest.approx(4.0)  # tag term == caption loss value
    total.backward()
    assert float(tag.grad) == pytest.approx(2.0 / 40.0)  # gradient scaled by cap / tag
    plain = combine_losses(torch.tensor(40.0), torch.tensor(2.0), torch.tensor(1.0), tag_weight=0.5,
                           distill_weight=3.0, rescale="none")
    assert float(plain) == pytest.approx(20.0 + 2.0 + 3.0)
    assert float(combine_losses(torch.tensor(5.0), rescale="ram")) == pytest.approx(5.0)  # no caption
    with pytest.raises(ValueError):
        combine_losses(torch.tensor(1.0), rescale="bogus")


def test_large_loss_mask_drops_only_the_largest_negative_losses():
    loss = torch.tensor([[0.1, 9.0, 0.3, 5.0], [7.0, 0.2, 4.0, 0.4]])
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 7 negatives
    keep = large_loss_mask(loss, targets, 0.3)  # int(0.3 * 7) = 2 rejected
    # the positive (loss 9.0) stays; the two largest negative losses (7.0, 5.0) go
    assert keep.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert large_loss_mask(loss, targets, 0.1).eq(1).all()  # int(0.7) = 0 rejected
    with pytest.raises(ValueError, match="reject fraction"):
        large_loss_mask(loss, targets, 1.0)


def test_asl_with_rejection_leaves_a_missing_positive_out_of_the_loss_and_gradient():
    # one image whose caption lacked tag 2: the model says 0.99, the label says 0
    logits = torch.tensor([[3.0, -4.0, 4.6, -3.0, -2.5]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    plain = asymmetric_loss(logits, targets, reduction="sum")
    rejected = asymmetric_loss(logits, targets, reduction="sum", reject_negatives=0.25)  # 1 of 4 negatives
    without_tag2 = asymmetric_loss(logits[:, [0, 1, 3, 4]], targets[:, [0, 1, 3, 4]], reduction="sum")
    assert float(rejected) == pytest.approx(float(without_tag2), rel=1e-6) and float(rejected) < float(plain)
    rejected.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[0, 0] < 0  # no push on the missing tag; positives still learn


def test_large_loss_mask_never_drops_negatives_of_completely_labelled_rows():
    loss = torch.tensor([[8.0, 0.1, 0.2, 0.3], [0.5, 6.0, 0.4, 0.6]])
    targets = torch.zeros(2, 4)
    complete = torch.tensor([True, False])  # row 0: a clean-split image, its 8.0 is a real negative
    keep = large_loss_mask(loss, targets, 0.5, complete)  # int(0.5 * 4 noisy negatives) = 2 rejected
    assert keep.tolist() == [[1, 1, 1, 1], [1, 0, 1, 0]]
    logits = torch.tensor([[4.0, -3.0], [4.0, -3.0]], requires_grad=True)
    asymmetric_loss(logits, torch.zeros(2, 2), reduction="sum", reject_negatives=0.5,
                    complete_rows=torch.tensor([True, False])).backward()
    assert logits.grad[0, 0] > 0 and logits.grad[1, 0] == 0  # the clean row is still pushed down
