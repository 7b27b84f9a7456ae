"""One prompt builder and one strict answer parser: well-formed, truncated and hostile outputs."""

import numpy as np
import pytest
from PIL import Image

from rau_ray.models.prompts import (
    TASKS,
    Answer,
    FormatError,
    build_answer,
    build_messages,
    parse_answer,
    scale_box,
    to_pil,
)

IMG = Image.new("RGB", (64, 48))


@pytest.mark.parametrize("task", TASKS)
def test_build_then_parse_round_trip(task):
    text = build_answer(task, label="liver", box=[1, 2, 30, 40], boxes={"liver": [1, 2, 30, 40],
                                                                        "spleen": [40, 2, 60, 20]}, think="why")
    a = parse_answer(text, task, image_size=(64, 48), labels=["liver", "spleen"])
    assert isinstance(a, Answer) and a.think == "why"
    if task == "all_boxes":
        assert a.boxes == [("liver", [1, 2, 30, 40]), ("spleen", [40, 2, 60, 20])]
    else:
        assert a.label == "liver"
    assert a.has_seg == (task == "segment")


def test_absent_structure_is_a_null_box():
    a = parse_answer(build_answer("ground", label="spleen", box=None), "ground")
    assert isinstance(a, Answer) and a.box is None


def test_every_truncation_is_a_format_error():
    text = build_answer("segment", label="liver", box=[1, 2, 30, 40], think="the liver is left")
    for i in range(len(text)):
        assert isinstance(parse_answer(text[:i], "segment"), FormatError), text[:i]


HOSTILE = [
    None, 42, b"bytes", "", "no tags at all", "<answer>{}</answer>",
    "<think>a</think><answer>{\"label\": \"liver\"}</answer><answer>{}</answer>",
    "<think><think>a</think></think><answer>{\"label\": \"liver\"}</answer>",
    "<think>x</think><answer>[1, 2]</answer>", "<think>x</think><answer>\"liver\"</answer>",
    "<think>x</think><answer>{\"label\": NaN}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, Infinity, 5]}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 1e400, 5]}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [5, 5, 1, 1]}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 999, 5]}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [true, 0, 3, 5]}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": \"0 0 3 5\"}</answer>",
    "<think>x</think><answer>{\"label\": 7, \"box\": [0, 0, 3, 5]}</answer>",
    "<think>x</think><answer>{\"label\": \"kidney\", \"box\": [0, 0, 3, 5]}</answer>",
    "<think>x</think><answer>" + "[" * 5000 + "]" * 5000 + "</answer>",
    "<think>" + "a" * 1_000_000 + "</think><answer>{}</answer>",
    "<think>\u202e\u0000</think><answer>{\"label\": \"\u00e9\"}</answer> trailing",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 5], \"mask\": \"<Seg><Seg>\"}</answer>",
    "<think>x</think></think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 5], \"mask\": \"<Seg>\"}</answer>",
    "<think><Seg></think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 5], \"mask\": \"<Seg>\"}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 1" + "0" * 400
    + "], \"mask\": \"<Seg>\"}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 1" + "0" * 5000 + "]}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3], \"mask\": \"<Seg>\"}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 5], \"mask\": \"<Seg>\"",
    "<think>x</think>\n<answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 5], \"mask\": null}</answer>",
    "x<think>x</think><answer>{\"label\": \"liver\", \"box\": [0, 0, 3, 5], \"mask\": \"<Seg>\"}</answer>",
    "<think>x</think><answer>{\"label\": \"liver\", \"label\": [1]}</answer>",
    "<think>x</think><answer>" + "{\"a\": " * 100_000 + "</answer>",
    "\ud800<think>x</think><answer>{}</answer>",
    "x" * 1_000_000,
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_outputs_never_raise(text):
    result = parse_answer(text, "segment", image_size=(64, 48), labels=["liver"])
    assert isinstance(result, FormatError) and not result and result.reason
    for task in TASKS:  # whatever the task, an Answer or a FormatError, never an exception
        assert isinstance(parse_answer(text, task), (Answer, FormatError))


def test_whitespace_around_the_tags_is_allowed_and_reasons_are_specific():
    ok = "\n <think> a </think>\n<answer> {\"label\": \"liver\"} </answer>\n"
    assert parse_answer(ok, "label").think == "a"
    body = "<think>x</think><answer>{}</answer>"
    assert parse_answer(body.replace("{}", '{"label": "liver", "box": [0, 0, 99, 5]}'), "ground",
                        image_size=(64, 48)).reason == "box"
    assert parse_answer(body.replace("{}", "[]"), "label").reason == "json"
    assert parse_answer(body.replace("{}", '{"label": "x"}'), "label", labels=["liver"]).reason == "label"
    assert parse_answer(body, "label").reason == "field"
    assert parse_answer(body + body, "label").reason == "structure"
    assert parse_answer("a" * 30_000, "label").reason == "too_long"


def test_builder_puts_reference_target_and_question_in_order():
    msgs = build_messages("label", IMG, {"liver": [1, 2, 3, 4]}, IMG, region=[5, 6, 7, 8], modality="CT")
    content = msgs[1]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert '"liver": [1, 2, 3, 4]' in content[2]["text"] and "[5, 6, 7, 8]" in content[4]["text"]
    with pytest.raises(ValueError, match="needs a structure"):
        build_messages("ground", IMG, {}, IMG)


def test_scale_box_and_to_pil():
    assert scale_box([10, 20, 30, 40], (100, 200), (50, 100)) == [5, 10, 15, 20]
    hu = np.array([[-1000.0, 40.0, 1000.0]])
    assert np.asarray(to_pil(hu, "CT"))[0, :, 0].tolist() == [0, 128, 255]
