"""One scoring for eval and rewards: the same answer scores the same whichever side asks."""

import pytest

from rau_ray.models.prompts import build_answer, parse_answer
from rau_ray.scoring.answers import FORMAT_CREDIT, format_credit, score_answer
from rau_ray.train.rewards import accuracy_score, format_score

SIZE = [112, 112]
BOXES = {"liver": [10, 20, 50, 70], "spleen": [70, 20, 100, 60], "aorta": [50, 60, 60, 70]}


def truth(task, structure="liver", boxes=BOXES):
    return {"task": task, "label": structure, "box": boxes.get(structure), "boxes": boxes, "image_size": SIZE}


@pytest.mark.parametrize("task,answer,expected", [
    ("label", build_answer("label", label=" Liver "), 1.0),
    ("label", build_answer("label", label="spleen"), 0.0),
    ("ground", build_answer("ground", label="liver", box=[10, 20, 30, 70]), 0.5),
    ("ground", build_answer("ground", label="spleen", box=BOXES["liver"]), 0.0),  # right box, wrong structure
    ("all_boxes", build_answer("all_boxes", boxes={"liver": BOXES["spleen"], "spleen": BOXES["liver"],
                                                   "aorta": BOXES["aorta"]}), 1.0),  # transport, not names
    ("all_boxes", build_answer("all_boxes", boxes={k: BOXES[k] for k in ("liver", "spleen")}), 2 / 3),
])
def test_eval_and_reward_accuracy_agree(task, answer, expected):
    t = truth(task)
    scored = score_answer(answer, t)
    assert scored == {"format": 1.0, "accuracy": pytest.approx(expected)}
    solution = build_answer(task, label="liver", box=BOXES["liver"], boxes=BOXES)
    assert accuracy_score(answer, task, solution, SIZE) == pytest.approx(expected)
    assert score_answer(answer, parse_answer(solution, task), SIZE)["accuracy"] == pytest.approx(expected)


def test_absent_structure_and_malformed_answers():
    absent = truth("ground", structure="gallbladder")
    assert score_answer(build_answer("ground", label="gallbladder", box=None), absent)["accuracy"] == 1.0
    assert score_answer(build_answer("ground", label="gallbladder", box=[1, 1, 9, 9]), absent)["accuracy"] == 0.0
    assert score_answer("no tags", truth("label")) == {"format": 0.0, "accuracy": 0.0}
    outside = build_answer("ground", label="liver", box=[10, 20, 500, 70])  # beyond the 112 px image
    assert score_answer(outside, truth("ground"))["format"] == 0.0


def test_format_credit_is_graded_and_shared_with_the_reward():
    half = "<think>a</think><answer>{}</answer>"
    assert format_credit(half, "ground", SIZE) == FORMAT_CREDIT["field"] == format_score(half, "ground", SIZE)
    assert format_credit(build_answer("label", label="liver"), "label") == 1.0
