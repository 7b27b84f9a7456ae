"""Optimal-transport label assignment on hand-made cases whose right answer is known."""

import math

import numpy as np
import pytest

from rau_ray.eval.matching import MatchConfig, assign, box_features

SIZE = (100, 100)


def box(cx, cy, w=10, h=10):
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_box_features_normalise_centre_and_size():
    f = box_features(np.array([box(50, 20, 20, 10)]), (200, 100), size_weight=0.5)
    assert np.allclose(f, [[0.25, 0.2, 0.05, 0.05]])


def test_transport_fixes_what_independent_argmax_gets_wrong():
    """Both boxes are nearest to A; the plan gives A to the first and B to the second (cost .02+.09 < .06+.13)."""
    protos = {"A": box(30, 50), "B": box(45, 50)}
    boxes = [box(32, 50), box(36, 50)]
    assert assign(boxes, SIZE, protos, SIZE, MatchConfig(method="independent")).labels == ["A", "A"]
    result = assign(boxes, SIZE, protos, SIZE, MatchConfig(method="emd"))
    assert result.labels == ["A", "B"]
    assert result.costs == pytest.approx([0.02, 0.09])
    assert assign(boxes, SIZE, protos, SIZE, MatchConfig(method="sinkhorn")).labels == ["A", "B"]


def test_missing_organ_stays_unassigned():
    """Three labels, two boxes: the resected organ's label is left out, no box is forced onto it."""
    protos = {"liver": box(30, 40), "spleen": box(75, 40), "gallbladder": box(40, 60)}
    boxes = [box(31, 41), box(74, 42)]
    result = assign(boxes, SIZE, protos, SIZE)
    assert result.labels == ["liver", "spleen"]
    assert result.plan[:, 2].sum() == 0


def test_far_box_is_not_forced_onto_a_label():
    protos = {"liver": box(30, 40)}
    result = assign([box(31, 40), box(90, 90)], SIZE, protos, SIZE)
    assert result.labels == ["liver", None] and math.isnan(result.costs[1])


def test_policy_label_bonus_breaks_ties():
    protos = {"left kidney": box(60, 70), "right kidney": box(40, 70)}
    boxes = [box(50, 70)]  # exactly between the two prototypes
    labels = assign(boxes, SIZE, protos, SIZE, predicted_labels=["left kidney"]).labels
    assert labels == ["left kidney"]


def test_image_sizes_are_normalised():
    protos = {"A": box(30, 50), "B": box(70, 50)}
    boxes = np.array([box(140, 100, 20, 20), box(60, 100, 20, 20)])  # a 200x200 target, same layout reversed
    assert assign(boxes, (200, 200), protos, SIZE).labels == ["B", "A"]


def test_empty_inputs_and_bad_method():
    assert assign(np.zeros((0, 4)), SIZE, {"A": box(1, 1)}, SIZE).labels == []
    assert assign([box(5, 5)], SIZE, {}, SIZE).labels == [None]
    with pytest.raises(ValueError, match="method must be one of"):
        assign([box(5, 5)], SIZE, {"A": box(5, 5)}, SIZE, MatchConfig(method="hungarian"))
