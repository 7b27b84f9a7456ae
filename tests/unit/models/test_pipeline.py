"""The one prompt pipeline: boxes into the processor's frame and back, SFT targets, teacher forcing, one owner."""

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rau_ray.data.phantoms import get_phantom
from rau_ray.data.tasks import label_boxes
from rau_ray.models import pipeline, prompts
from rau_ray.models.policy import TINY, _load_base

PACKAGE = Path(pipeline.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processor():
    return _load_base(replace(TINY, init="random"))[1]


@pytest.fixture(scope="module")
def pair():
    ref, tgt = get_phantom("ct-abdomen").generate_2d(0, 1, size=192, slices=2)
    return ref, tgt


def test_boxes_go_into_the_frame_and_answers_come_back_in_the_targets_pixels(processor, pair):
    ref, tgt = pair
    ref_boxes, tgt_boxes = label_boxes(ref.label, ref.labels), label_boxes(tgt.label, tgt.labels)
    q = pipeline.ask(processor, "all_boxes", tgt.image, ref.image, ref_boxes)
    assert q.size == (192, 192) and q.frame == prompts.resized_size(192, 192, processor) != q.size
    text = "".join(c.get("text", "") for c in q.messages[1]["content"])
    for box in ref_boxes.values():  # the prompt holds the reference's boxes in the policy's frame
        assert str(prompts.scale_box(box, (192, 192), q.frame)) in text
    answer = q.parse(q.completion(boxes=tgt_boxes))
    assert answer and [label for label, _ in answer.boxes] == list(tgt_boxes)
    scale = 192 / q.frame[0]
    for (_label, got), want in zip(answer.boxes, tgt_boxes.values()):  # back in pixels, within the frame's rounding
        assert np.abs(np.subtract(got, want)).max() <= scale


def test_a_label_question_scales_its_region_and_a_malformed_answer_is_teacher_forced(processor, pair):
    ref, tgt = pair
    region = label_boxes(tgt.label, tgt.labels)["liver"]
    q = pipeline.ask(processor, "label", tgt.image, ref.image, label_boxes(ref.label, ref.labels), region=region)
    assert str(q.to_frame(region)) in q.messages[1]["content"][-1]["text"]
    seg = pipeline.ask(processor, "segment", tgt.image, ref.image, {}, structure="liver")
    assert seg.forced("no answer") == prompts.build_answer("segment", label="liver")
    good = seg.completion(label="liver", box=region, think="left of the stomach")
    assert seg.forced(good) == good and seg.parse(good).has_seg
    assert not seg.parse("<think></think><answer>{}</answer>")


def test_prompts_are_built_only_by_the_pipeline():
    """Training examples, eval, serving and RAUModel.predict all go through models/pipeline.py: no other module
    builds the RAU messages or answers (the generic-scene pretraining has its own tasks)."""
    owners = {PACKAGE / "models" / "prompts.py", PACKAGE / "models" / "pipeline.py"}
    # policy.py: the tiny tokenizer learns its merges from example answers; seg.py: the segmenter's canonical answers
    allowed = {"build_messages": set(),
               "build_answer": {PACKAGE / "models" / "policy.py", PACKAGE / "train" / "seg.py"}}
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in allowed and path not in allowed[node.attr]:
                found.setdefault(node.attr, []).append(str(path.relative_to(PACKAGE)))
    assert not found, found
