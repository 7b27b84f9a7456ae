"""Focal + Dice loss and the corrective-click sampler of interactive segmentation training."""

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from rau_ray.errors import DataError
from rau_ray.models.losses import dice_loss, focal_dice_loss, sample_corrective_points


def _square(size=32, y0=8, y1=24, x0=8, x1=24):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_focal_dice_is_the_weighted_sum_of_torchvision_focal_and_soft_dice():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, requires_grad=True)
    target = (torch.rand(3, 1, 16, 16) > 0.6).float()
    out = focal_dice_loss(logits, target, focal_weight=2.0, dice_weight=0.5)
    focal = float(sigmoid_focal_loss(logits, target, reduction="mean").detach())
    dice = float(dice_loss(logits, target).detach())
    assert [float(t.detach()) for t in out] == pytest.approx([2.0 * focal + 0.5 * dice, focal, dice])
    out.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    loss, _, d = focal_dice_loss(logits.detach(), target, focal_weight=0.0)  # a tuple; weight 0 drops a term
    assert float(loss) == pytest.approx(float(d))


def test_focal_dice_is_low_when_right_and_high_when_wrong():
    target = torch.as_tensor(_square(), dtype=torch.float32)[None, None]
    right = focal_dice_loss(20 * (2 * target - 1), target)
    wrong = focal_dice_loss(-20 * (2 * target - 1), target)
    assert float(right.loss) < 1e-3 and float(wrong.dice) > 0.99 and float(wrong.loss) > 1


def test_focal_dice_rejects_bad_shapes_and_weights():
    with pytest.raises(ValueError, match="same shape"):
        focal_dice_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="weights"):
        focal_dice_loss(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), focal_weight=0, dice_weight=0)


def test_one_definition_of_dice_loss():
    from rau_ray.models import rau

    assert rau.dice_loss is dice_loss


def test_empty_prediction_gives_a_positive_click_at_the_structure_centre():
    true = _square()
    points, labels = sample_corrective_points(np.zeros_like(true), true, 1, rng=None)
    assert points.shape == (1, 2) and labels.tolist() == [1]
    x, y = points[0]
    assert 14 <= x <= 17 and 14 <= y <= 17  # the most interior pixel of the 16x16 square


def test_false_positive_gives_a_negative_click_inside_it():
    true = _square()
    pred = true.copy()
    pred[0:6, 0:30] = True  # a 6x30 false-positive band above the structure
    points, labels = sample_corrective_points(pred, true, 1)
    x, y = points[0].astype(int)
    assert labels.tolist() == [0] and pred[y, x] and not true[y, x]
    assert 2 <= y <= 3  # in the band's interior, not on its edge


def test_clicks_go_to_the_largest_error_first_then_elsewhere():
    true = _square(48, 4, 24, 4, 24)  # 20x20
    pred = np.zeros_like(true)
    pred[30:42, 30:42] = True  # a 12x12 false positive, away from the missed structure
    points, labels = sample_corrective_points(pred, true, 2)
    # the 400-px miss first; its click explains a disc of radius 10 (~100 px of the miss remain), then the 144-px FP
    assert labels.tolist() == [1, 0]
    (x1, y1), (x2, y2) = points.astype(int)
    assert true[y1, x1] and pred[y2, x2] and not true[y2, x2]


def test_perfect_prediction_gives_no_clicks_and_more_clicks_spread_out():
    true = _square()
    points, labels = sample_corrective_points(true, true, 3)
    assert points.shape == (0, 2) and labels.shape == (0,)
    points, labels = sample_corrective_points(np.zeros_like(true), true, 3)
    assert len(points) == 3 and set(labels.tolist()) == {1}
    assert len({tuple(p) for p in points.tolist()}) == 3  # each click explains a disc: the next goes elsewhere


def test_random_clicks_are_reproducible_interior_and_varied():
    true = _square(64, 8, 56, 8, 56)  # 48x48: the interior half is the central 24x24 or so
    pred = np.zeros_like(true)
    a = sample_corrective_points(pred, true, 1, np.random.default_rng(3))
    b = sample_corrective_points(pred, true, 1, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0])
    seen = set()
    for seed in range(20):
        (x, y), = sample_corrective_points(pred, true, 1, np.random.default_rng(seed))[0].astype(int)
        assert 19 <= x <= 44 and 19 <= y <= 44  # at least half the maximum distance from the edge
        seen.add((x, y))
    assert len(seen) > 5


def test_bad_masks_are_a_clear_error():
    with pytest.raises(DataError, match="same shape"):
        sample_corrective_points(np.zeros((4, 4)), np.zeros((5, 5)), 1)
    with pytest.raises(DataError, match="2D"):
        sample_corrective_points(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), 1)
    with pytest.raises(DataError, match=">= 0"):
        sample_corrective_points(np.zeros((4, 4)), np.zeros((4, 4)), -1)
