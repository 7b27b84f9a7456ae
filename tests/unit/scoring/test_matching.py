"""Optimal-transport label assignment on hand-made cases whose right answer is known."""

import math

import numpy as np
import ot
import pytest

from rau_ray.scoring.matching import MatchConfig, assign, assign_with_fallback, box_features, cost_matrix

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


@pytest.mark.parametrize("method", ["emd", "sinkhorn", "fgw"])
def test_resected_organ_stays_unassigned_instead_of_taking_a_wrong_box(method):
    """The gallbladder is resected and the policy added a stray box (a false positive in a corner). Balanced
    transport must give the stray box the gallbladder; partial transport leaves both out."""
    protos = {"liver": box(30, 40), "spleen": box(75, 40), "gallbladder": box(40, 60)}
    boxes = [box(31, 41), box(74, 42), box(95, 95)]
    cost, names = cost_matrix(np.array(boxes), SIZE, protos, SIZE, MatchConfig())
    forced = ot.emd(np.ones(3), np.ones(3), cost)  # no dummy nodes: every label must take a box
    assert names[int(forced[2].argmax())] == "gallbladder"
    result = assign(boxes, SIZE, protos, SIZE, MatchConfig(method=method))
    assert result.labels == ["liver", "spleen", None]
    assert math.isnan(result.costs[2])
    # no mass on the gallbladder's column (Sinkhorn's plan is blurred: less there than on either kept pair)
    assert result.plan[:, 2].max() < min(result.plan[0, 0], result.plan[1, 1])
    assert method == "sinkhorn" or result.plan[:, 2].sum() < 1e-9


def test_dummy_nodes_are_exactly_partial_transport():
    """The dummy-node plan is the partial-OT plan (ot.partial) for the mass it chose to move: here 2 of 3."""
    protos = {"liver": box(30, 40), "spleen": box(75, 40), "gallbladder": box(40, 60)}
    boxes = np.array([box(31, 41), box(74, 42), box(95, 95)])
    result = assign(boxes, SIZE, protos, SIZE)
    assert result.plan.sum() == pytest.approx(2.0)
    cost, _ = cost_matrix(boxes, SIZE, protos, SIZE, MatchConfig())
    partial = ot.partial.partial_wasserstein(np.ones(3), np.ones(3), cost, m=2.0)
    assert np.allclose(result.plan, partial, atol=1e-9)


def test_layout_fgw_fixes_a_shifted_field_that_feature_emd_gets_wrong():
    """The target's field of view moved: every organ sits 15 px right of the reference's, and the spleen is out of
    field. The stomach's box then lies nearer the spleen's prototype (0.141 vs 0.15), so position-only EMD calls it
    the spleen; the distances between the boxes match the liver-stomach-kidney layout, and FGW gets it right."""
    protos = {"liver": box(25, 35), "stomach": box(60, 35), "spleen": box(65, 25), "kidney": box(55, 60)}
    boxes = [box(40, 35), box(75, 35), box(70, 60)]
    assert assign(boxes, SIZE, protos, SIZE, MatchConfig(method="emd")).labels == ["liver", "spleen", "kidney"]
    for alpha in (0.3, 0.5, 0.8):
        result = assign(boxes, SIZE, protos, SIZE, MatchConfig(method="fgw", alpha=alpha))
        assert result.labels == ["liver", "stomach", "kidney"], alpha
    # the fused cost of the right pairs is below the plain position cost: the layout agrees, the shift is discounted
    result = assign(boxes, SIZE, protos, SIZE, MatchConfig(method="fgw"))
    assert all(c < 0.15 - 1e-6 for c in result.costs)
    # alpha = 0 is plain EMD
    assert assign(boxes, SIZE, protos, SIZE, MatchConfig(method="fgw", alpha=0.0)).labels == [
        "liver", "spleen", "kidney"]


def test_fgw_keeps_position_where_the_layout_is_symmetric():
    """Left and right kidney are mirror images: same distances to the aorta. Position decides, as in EMD."""
    protos = {"right kidney": box(35, 60), "aorta": box(50, 55), "left kidney": box(65, 60)}
    boxes = [box(64, 61), box(36, 59), box(50, 56)]
    assert assign(boxes, SIZE, protos, SIZE, MatchConfig(method="fgw")).labels == ["left kidney", "right kidney",
                                                                                   "aorta"]


def test_sinkhorn_agrees_with_emd_on_a_clear_case():
    rng = np.random.default_rng(0)
    centres = [(25, 35), (60, 35), (80, 30), (55, 60), (35, 60), (50, 80)]
    protos = {f"organ{i}": box(x, y, 12, 10) for i, (x, y) in enumerate(centres)}
    order = rng.permutation(len(centres))
    boxes = [box(centres[i][0] + rng.normal(0, 1), centres[i][1] + rng.normal(0, 1), 12, 10) for i in order]
    emd = assign(boxes, SIZE, protos, SIZE, MatchConfig(method="emd"))
    sinkhorn = assign(boxes, SIZE, protos, SIZE, MatchConfig(method="sinkhorn", sinkhorn_reg=0.01))
    assert emd.labels == [f"organ{i}" for i in order]
    assert sinkhorn.labels == emd.labels
    assert np.allclose(sinkhorn.plan, emd.plan, atol=0.05)


def test_fallback_re_asks_the_policy_for_unassigned_and_doubtful_labels():
    """Liver matched well; the spleen's box is doubtful (cost between max_cost and 2 tau); the gallbladder has no box
    and the kidney none either. The policy, re-asked label by label, finds the spleen and the gallbladder and says
    the kidney is absent."""
    protos = {"liver": box(30, 40), "spleen": box(75, 40), "gallbladder": box(40, 60), "kidney": box(55, 85)}
    boxes = [box(31, 41), box(75, 60)]  # the second is 0.2 from the spleen's prototype
    answers = {"spleen": box(74, 41), "gallbladder": box(42, 61), "kidney": None}
    asked = []

    def reask(label):
        asked.append(label)
        return answers[label]

    out = assign_with_fallback(boxes, SIZE, protos, SIZE, reask, MatchConfig(method="emd"), max_cost=0.1)
    assert out.assignment.labels == ["liver", "spleen"]
    assert asked == ["spleen", "gallbladder", "kidney"]  # prototype order, the liver not asked
    assert out.fallback == ["spleen", "gallbladder"]
    assert out.absent == ["kidney"]
    assert out.boxes == {"liver": box(31, 41), "spleen": box(74, 41), "gallbladder": box(42, 61)}
    assert out.unassigned_boxes == [1]
    # with a looser threshold the spleen's transport box is kept and only the missing labels are asked
    asked.clear()
    out = assign_with_fallback(boxes, SIZE, protos, SIZE, reask, max_cost=0.3)
    assert asked == ["gallbladder", "kidney"] and out.boxes["spleen"] == box(75, 60)
    # a re-ask answer that is not a box counts as absent
    out = assign_with_fallback(boxes, SIZE, protos, SIZE, lambda label: [5, 5, 1, 1], max_cost=0.3)
    assert out.fallback == [] and out.absent == ["gallbladder", "kidney"]


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
    assert assign([box(5, 5)], SIZE, {"A": box(5, 5)}, SIZE, MatchConfig(method="fgw")).labels == ["A"]
    with pytest.raises(ValueError, match="method must be one of"):
        assign([box(5, 5)], SIZE, {"A": box(5, 5)}, SIZE, MatchConfig(method="hungarian"))


@pytest.mark.parametrize("field,value", [("unmatched_cost", 0.0), ("unmatched_cost", float("nan")),
                                         ("size_weight", -0.1), ("label_bonus", -1), ("sinkhorn_reg", 0),
                                         ("alpha", 1.5), ("alpha", -0.1), ("alpha", True), ("alpha", "0.5")])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MatchConfig.{field} must be"):
        MatchConfig(**{field: value})


def test_fallback_rejects_a_negative_threshold():
    with pytest.raises(ValueError, match="max_cost"):
        assign_with_fallback([box(5, 5)], SIZE, {"A": box(5, 5)}, SIZE, lambda label: None, max_cost=-1)
