"""Hand-computed checks for rau_ray.scoring.metrics (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from rau_ray.scoring.metrics import (
    box_iou,
    ciou,
    dice,
    giou,
    hd95,
    iou,
    labeling_accuracy,
    mask_to_box,
    per_label_dice,
)


def mask(shape, pixels):
    m = np.zeros(shape, dtype=np.uint8)
    for p in pixels:
        m[p] = 1
    return m


# ----------------------------------------------------------------------------------------------- dice / iou

# P = {(0,0),(0,1),(1,0)}, G = {(0,0),(0,1),(1,1)}: |P|=3, |G|=3, |P∩G|=2, |P∪G|=4
P = mask((4, 4), [(0, 0), (0, 1), (1, 0)])
G = mask((4, 4), [(0, 0), (0, 1), (1, 1)])


def test_dice_and_iou_partial_overlap():
    assert dice(P, G) == pytest.approx(2 * 2 / (3 + 3))  # 2/3
    assert iou(P, G) == pytest.approx(2 / 4)  # 0.5


def test_any_nonzero_is_foreground_and_lists_accepted():
    # same pixels as P/G, but with values 255 / 0.3 / -1 and as nested lists
    p = (P * 255).tolist()
    g = np.where(G > 0, 0.3, 0.0)
    g[1, 1] = -1.0
    assert dice(p, g) == pytest.approx(2 / 3)
    assert iou(p, g) == pytest.approx(0.5)


def test_dice_iou_identical_and_disjoint():
    assert dice(P, P) == 1.0 and iou(P, P) == 1.0
    Q = mask((4, 4), [(3, 3)])
    assert dice(P, Q) == 0.0 and iou(P, Q) == 0.0


@pytest.mark.parametrize("metric", [dice, iou])
def test_empty_mask_rules(metric):
    empty = np.zeros((4, 4))
    # empty gt, empty pred: nan (ignored) / 1.0 (counted as right)
    assert math.isnan(metric(empty, empty))
    assert metric(empty, empty, ignore_empty=False) == 1.0
    # empty gt, non-empty pred: nan / 0.0
    assert math.isnan(metric(P, empty))
    assert metric(P, empty, ignore_empty=False) == 0.0
    # non-empty gt, empty pred: 0.0 either way
    assert metric(empty, G) == 0.0
    assert metric(empty, G, ignore_empty=False) == 0.0


@pytest.mark.parametrize("metric", [dice, iou, hd95])
def test_shape_mismatch_names_both_shapes(metric):
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        metric(np.zeros((4, 4)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------------------------- giou / ciou


def _two_images():
    # image A: gt 2x2 block (4 px), pred identical -> I=4, U=4, IoU 1.0
    ga = np.zeros((10, 10)); ga[0:2, 0:2] = 1
    pa = ga.copy()
    # image B: gt 8x8 block (64 px), pred its left half 8x4 (32 px) -> I=32, U=64, IoU 0.5
    gb = np.zeros((10, 10)); gb[0:8, 0:8] = 1
    pb = np.zeros((10, 10)); pb[0:8, 0:4] = 1
    return [pa, pb], [ga, gb]


def test_giou_and_ciou_differ():
    preds, gts = _two_images()
    assert giou(preds, gts) == pytest.approx((1.0 + 0.5) / 2)  # 0.75: every image weighs the same
    assert ciou(preds, gts) == pytest.approx((4 + 32) / (4 + 64))  # 36/68 = 0.5294: big objects weigh more


def test_giou_ciou_empty_images():
    preds, gts = _two_images()
    empty = np.zeros((10, 10))
    # + an image with empty gt and empty pred: giou term 1.0; adds 0 to both ciou sums
    assert giou(preds + [empty], gts + [empty]) == pytest.approx((1.0 + 0.5 + 1.0) / 3)  # 0.8333
    assert ciou(preds + [empty], gts + [empty]) == pytest.approx(36 / 68)
    # + an image with empty gt but 3 predicted px: giou term 0.0; ciou union +3
    fp = mask((10, 10), [(9, 7), (9, 8), (9, 9)])
    assert giou(preds + [fp], gts + [empty]) == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # 0.5
    assert ciou(preds + [fp], gts + [empty]) == pytest.approx(36 / 71)
    # nothing anywhere
    assert giou([empty], [empty]) == 1.0
    assert math.isnan(ciou([empty], [empty]))
    assert math.isnan(ciou([], []))
    assert math.isnan(giou([], []))


def test_giou_ciou_errors():
    with pytest.raises(ValueError, match="same length"):
        giou([P], [G, G])
    with pytest.raises(ValueError, match="same length"):
        ciou([P, P], [G])
    with pytest.raises(ValueError, match=r"image 1.*\(4, 4\).*\(3, 3\)"):
        ciou([P, P], [G, np.zeros((3, 3))])


# ----------------------------------------------------------------------------------------------- hd95


def test_hd95_single_pixels_anisotropic():
    # shift 3 px along axis 0 with spacing 2.0 -> 3*2.0 = 6.0; along axis 1 (spacing 1.0) -> 3.0
    assert hd95(mask((10, 10), [(2, 5)]), mask((10, 10), [(5, 5)]), spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert hd95(mask((10, 10), [(5, 2)]), mask((10, 10), [(5, 5)]), spacing=(2.0, 1.0)) == pytest.approx(3.0)


def test_hd95_shifted_lines_anisotropic():
    # 1-px-thick lines rows 2 and 5, cols 1..8: each voxel is surface; nearest is straight across,
    # 3 rows * 2.0 = 6.0 (any other voxel: sqrt(6^2 + k^2) > 6). Isotropic: 3.0; swapped spacing: 3*1.0 = 3.0.
    g = np.zeros((10, 10)); g[2, 1:9] = 1
    p = np.zeros((10, 10)); p[5, 1:9] = 1
    assert hd95(p, g, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert hd95(p, g) == pytest.approx(3.0)
    assert hd95(p, g, spacing=(1.0, 2.0)) == pytest.approx(3.0)
    assert hd95(p, g, spacing=2.0) == pytest.approx(6.0)  # a number applies to every axis


def test_hd95_is_a_percentile_not_the_max():
    # gt: line row 5, cols 0..9 (10 surface px). pred: same line + an outlier px at (15, 0), 10 px from (5, 0).
    # pred->gt: [0]*10 + [10]; np.percentile 95 on 11 values: position 0.95*10 = 9.5 -> (0 + 10)/2 = 5.0.
    # gt->pred: all 0. hd95 = 5.0 (the plain Hausdorff distance would be 10).
    g = np.zeros((20, 12)); g[5, 0:10] = 1
    p = g.copy(); p[15, 0] = 1
    assert hd95(p, g) == pytest.approx(5.0)
    # with 20 line px: position 0.95*20 = 19 -> sorted[19] = 0 -> the outlier is ignored entirely
    g2 = np.zeros((20, 22)); g2[5, 0:20] = 1
    p2 = g2.copy(); p2[15, 0] = 1
    assert hd95(p2, g2) == pytest.approx(0.0)


def test_hd95_concentric_filled_squares():
    # gt 7x7 filled (surface: ring of 24 at Chebyshev radius 3), pred 3x3 filled (ring of 8 at radius 1).
    # pred->gt: every ring px is 2 from the outer ring.
    # gt->pred: 12 px at 2, 8 px at sqrt(2^2+1) = sqrt5, 4 corners at sqrt(2^2+2^2) = sqrt8;
    # position 0.95*23 = 21.85 lies in the last four (20..23) -> sqrt8.  hd95 = max(2, sqrt8) = 2.828
    g = np.zeros((11, 11)); g[2:9, 2:9] = 1
    p = np.zeros((11, 11)); p[4:7, 4:7] = 1
    assert hd95(p, g) == pytest.approx(math.sqrt(8))
    assert hd95(g, p) == pytest.approx(math.sqrt(8))  # symmetric


def test_hd95_uses_surfaces_not_whole_masks():
    # pred: filled 5x5 (surface = outer ring of 16). gt: the same with the centre px removed: its surface is
    # the outer ring + the hole's 4 edge-neighbours (20 px). pred->gt: all 0.
    # gt->pred: 16 zeros + 4 at distance 1 (to the outer ring); position 0.95*19 = 18.05 -> 1.0.
    # (Distances between whole masks would give 0.)
    p = np.zeros((7, 7)); p[1:6, 1:6] = 1
    g = p.copy(); g[3, 3] = 0
    assert hd95(p, g) == pytest.approx(1.0)


def test_hd95_mask_on_array_border():
    # masks touching the array border are surface there (erosion sees background outside)
    g = np.zeros((4, 4)); g[0, :] = 1
    p = np.zeros((4, 4)); p[3, :] = 1
    assert hd95(p, g) == pytest.approx(3.0)
    full = np.ones((4, 4))
    assert hd95(full, full) == 0.0


def test_hd95_3d():
    # 1-voxel-thick 3x3 plates at axis-2 index 1 and 3, spacing 2.5 on axis 2: 2 * 2.5 = 5.0
    g = np.zeros((5, 5, 5)); g[1:4, 1:4, 1] = 1
    p = np.zeros((5, 5, 5)); p[1:4, 1:4, 3] = 1
    assert hd95(p, g, spacing=(1.0, 1.0, 2.5)) == pytest.approx(5.0)
    # gt: filled 3x3x3 cube, surface = 26 voxels around the centre; pred: the centre voxel.
    # pred->gt: 1. gt->pred: 6 faces at 1, 12 edges at sqrt2, 8 corners at sqrt3;
    # position 0.95*25 = 23.75 lies in the last eight (18..25) -> sqrt3.
    cube = np.zeros((5, 5, 5)); cube[1:4, 1:4, 1:4] = 1
    centre = mask((5, 5, 5), [(2, 2, 2)])
    assert hd95(centre, cube) == pytest.approx(math.sqrt(3))


def test_hd95_identical_and_empty():
    assert hd95(P, P) == 0.0
    empty = np.zeros((4, 4))
    assert math.isnan(hd95(empty, empty))
    assert hd95(P, empty) == math.inf
    assert hd95(empty, G) == math.inf


def test_hd95_bad_input():
    with pytest.raises(ValueError, match="2D or 3D"):
        hd95(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="spacing"):
        hd95(P, G, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(P, G, spacing=(1.0, 0.0))


# ----------------------------------------------------------------------------------------------- boxes


def test_box_iou_hand_computed():
    # [0,0,2,2] and [1,1,3,3]: areas 4 and 4, intersection [1,1,2,2] = 1, union 4+4-1 = 7
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    # contained: [1,1,3,3] (4) in [0,0,4,4] (16) -> 4/16
    assert box_iou([0, 0, 4, 4], [1, 1, 3, 3]) == pytest.approx(0.25)
    # wide vs tall, overlap [0,0,1,1]: areas 4*1 = 4 and 1*4 = 4 -> 1/7
    assert box_iou([0, 0, 4, 1], [0, 0, 1, 4]) == pytest.approx(1 / 7)
    # continuous coords: [0,0,1.5,1] (1.5) vs [0.5,0,2,1] (1.5): inter 1.0 -> 1/2
    assert box_iou([0, 0, 1.5, 1], [0.5, 0, 2, 1]) == pytest.approx(0.5)
    # touching edges / disjoint -> 0
    assert box_iou([0, 0, 2, 2], [2, 0, 4, 2]) == 0.0
    assert box_iou([0, 0, 2, 2], [5, 5, 6, 6]) == 0.0
    assert isinstance(box_iou([0, 0, 2, 2], [1, 1, 3, 3]), float)


def test_box_iou_pairwise():
    a = np.array([[0, 0, 2, 2], [0, 0, 4, 4]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [10, 10, 11, 11]])
    m = box_iou(a, b)
    assert m.shape == (2, 3)
    # row 0: 1/7 (above), identical 1, disjoint 0; row 1: 4/16, 4/16, 0
    np.testing.assert_allclose(m, [[1 / 7, 1.0, 0.0], [0.25, 0.25, 0.0]])
    assert box_iou([0, 0, 2, 2], b).shape == (1, 3)


def test_box_iou_degenerate():
    assert box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # 0/0 -> 0, not nan
    assert box_iou([1, 0, 1, 3], [0, 0, 2, 2]) == 0.0  # zero width
    m = box_iou([[1, 1, 1, 1], [0, 0, 2, 2]], [[1, 1, 1, 1]])
    assert not np.isnan(m).any()
    np.testing.assert_array_equal(m, [[0.0], [0.0]])


def test_box_iou_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        box_iou([0, 0, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        box_iou([[0, 0, 1, 1]], np.zeros((2, 5)))
    with pytest.raises(ValueError, match="x2 >= x1"):
        box_iou([2, 0, 1, 1], [0, 0, 1, 1])


def test_mask_to_box():
    m = np.zeros((6, 8))  # H=6, W=8
    m[1:3, 3:6] = 1  # rows 1..2, cols 3..5 -> [x1=3, y1=1, x2=5+1, y2=2+1]
    assert mask_to_box(m) == [3, 1, 6, 3]
    # area (6-3)*(3-1) = 6 = pixel count of the filled rectangle
    # scattered pixels (row 4, col 0) and (row 1, col 7): cols 0..7, rows 1..4 -> [0, 1, 8, 5]
    assert mask_to_box(mask((6, 8), [(4, 0), (1, 7)])) == [0, 1, 8, 5]
    assert mask_to_box(np.zeros((6, 8))) is None
    with pytest.raises(ValueError, match="2D"):
        mask_to_box(np.ones((2, 2, 2)))


def test_mask_to_box_roundtrip_with_box_iou():
    # the box of a filled rectangle has IoU 1 with the rectangle's own box
    m = np.zeros((6, 8)); m[1:3, 3:6] = 1
    assert box_iou(mask_to_box(m), [3, 1, 6, 3]) == 1.0


# ----------------------------------------------------------------------------------------------- labels


def test_labeling_accuracy():
    # 3 of 4 agree
    assert labeling_accuracy(["L1", "L2", "L3", "L4"], ["L1", "L3", "L3", "L4"]) == pytest.approx(0.75)
    assert labeling_accuracy(("C7",), ("C7",)) == 1.0
    assert math.isnan(labeling_accuracy([], []))
    with pytest.raises(ValueError, match="same length"):
        labeling_accuracy(["L1"], ["L1", "L2"])


def test_per_label_dice():
    pred = np.array([[1, 1, 2], [0, 2, 2]])
    gt = np.array([[1, 1, 2], [0, 2, 0]])
    # label 1: pred {(0,0),(0,1)}, gt same -> 1.0
    # label 2: pred {(0,2),(1,1),(1,2)} (3), gt {(0,2),(1,1)} (2), overlap 2 -> 2*2/(3+2) = 0.8
    # label 3: absent from both -> nan (ignored) / 1.0 with ignore_empty=False
    out = per_label_dice(pred, gt, [1, 2, 3])
    assert set(out) == {1, 2, 3}
    assert out[1] == pytest.approx(1.0)
    assert out[2] == pytest.approx(0.8)
    assert math.isnan(out[3])
    assert per_label_dice(pred, gt, [3], ignore_empty=False) == {3: 1.0}
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        per_label_dice(pred, gt.T, [1])
