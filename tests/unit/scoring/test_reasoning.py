"""The reasoning check on known true and false statements, and the SFT targets' statements are true."""

import pytest

from rau_ray.scoring import reasoning
from rau_ray.scoring.reasoning import check, holds, relative_statement

# image coordinates: x grows to the right, y downwards
BOXES = {"liver": [10, 20, 50, 70], "stomach": [60, 20, 80, 40], "right kidney": [20, 80, 30, 95]}
REF = {"liver": [70, 20, 90, 40], "stomach": [10, 20, 30, 40]}  # the reference shows them the other way round


def test_known_true_and_false_statements():
    think = ("The liver is left of the stomach; the stomach lies above the right kidney. "
             "The Liver is smaller than the stomach. the right kidney is to the right of the liver.")
    c = check(think, BOXES)
    assert [(s.subject, s.relation, s.other, s.true) for s in c.statements] == [
        ("liver", "left of", "stomach", True), ("stomach", "above", "right kidney", True),
        ("liver", "smaller than", "stomach", False), ("right kidney", "right of", "liver", False)]
    assert c.true == 2 and c.share == 0.5


def test_the_reference_clause_is_checked_against_the_reference():
    c = check("In the reference the liver is right of the stomach; in the target the liver is left of the stomach.",
              BOXES, REF)
    assert [(s.image, s.true) for s in c.statements] == [("reference", True), ("target", True)]
    wrong = check("in the target the liver is right of the stomach.", BOXES, REF)
    assert [(s.image, s.true) for s in wrong.statements] == [("target", False)]


def test_a_structure_the_image_lacks_makes_the_statement_false_and_prose_has_none():
    c = check("the spleen is above the liver", BOXES, names=["spleen", "liver"])
    assert len(c.statements) == 1 and not c.statements[0].true
    assert check("it looks like the liver, bright and large", BOXES).share is None
    assert check("", BOXES).statements == []


@pytest.mark.parametrize("structure", sorted(BOXES))
def test_the_sft_targets_statement_is_true(structure):
    said = relative_statement(structure, BOXES)
    assert said.startswith(f"the {structure} is ")
    assert check(f"in the target {said}.", BOXES).share == 1.0
    assert relative_statement("spleen", BOXES) == "" and relative_statement("liver", {"liver": [0, 0, 1, 1]}) == ""
    assert holds("above", BOXES["stomach"], BOXES["right kidney"]) and set(reasoning.RELATIONS) >= {"left of"}
