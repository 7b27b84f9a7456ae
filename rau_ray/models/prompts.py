"""Prompts and answers for the policy: one builder and one strict parser, used by training, eval and serving alike.

Tasks: ``label`` (which structure is this region of the target?), ``ground`` (box of a named structure, or null if
absent — e.g. resected), ``all_boxes`` (every structure at once, for optimal-transport assignment) and ``segment``
(the answer carries ``<Seg>``, whose hidden state drives SAM2). Answers are
``<think>...</think><answer>{JSON}</answer>``; boxes are ``[x1, y1, x2, y2]`` pixels of the image *as the processor
resizes it* (as Qwen2.5-VL is trained). The parser never raises on model output: it returns ``Answer`` or
``FormatError``. Use: ``msgs = build_messages("ground", ref, ref_boxes, tgt, structure="liver")``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from rau_ray.data import formats

TASKS = ("label", "ground", "all_boxes", "segment")
SEG_TOKEN = "<Seg>"
MAX_ANSWER_CHARS = 20_000  # a longer completion is runaway generation, not an answer
MAX_COORD = 1e6  # pixel coordinates beyond this are garbage (and NaN/inf fail the comparison too)
SYSTEM_PROMPT = (
    "You are a radiologist. You are given an annotated reference image and a target image of the same anatomy. "
    "Compare them and reason about the relative positions of the structures inside <think></think>, then give the "
    "answer as JSON inside <answer></answer>. Boxes are [x1, y1, x2, y2] in pixels of each image.")
QUESTIONS = {
    "label": "Which structure is the region {region} in the target image?",
    "ground": "Where is the {structure} in the target image? Give its box, or null if it is absent.",
    "all_boxes": "Give the box of every structure of the reference that is visible in the target image.",
    "segment": "Segment the {structure} in the target image.",
}


def to_pil(image, modality: str = "CT", window="abdomen") -> Image.Image:
    """An image as the policy sees it: CT in HU is windowed to 8 bits; grey becomes RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if modality == "CT" and arr.dtype != np.uint8:
        arr = formats.apply_window(arr, window)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")


def resized_size(height: int, width: int, processor) -> tuple[int, int]:
    """(height, width) the processor resizes an image to (Qwen2-VL smart_resize)."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    size = getattr(ip, "size", None) or {}
    min_pixels = size.get("shortest_edge", getattr(ip, "min_pixels", None))
    max_pixels = size.get("longest_edge", getattr(ip, "max_pixels", None))
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def scale_box(box, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> list[int]:
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return [int(round(box[0] * sx)), int(round(box[1] * sy)), int(round(box[2] * sx)), int(round(box[3] * sy))]


def build_messages(task: str, reference_image: Image.Image, reference_boxes: dict[str, list],
                   target_image: Image.Image, structure: str | None = None, region: list | None = None,
                   modality: str = "CT") -> list[dict]:
    """Chat messages with the reference (and its labelled boxes as text), the target and the question."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if task in ("ground", "segment") and not structure:
        raise ValueError(f"task {task!r} needs a structure name")
    if task == "label" and region is None:
        raise ValueError("task 'label' needs a region box")
    boxes = json.dumps({k: [int(v) for v in b] for k, b in reference_boxes.items()}, separators=(", ", ": "))
    question = QUESTIONS[task].format(structure=structure, region=[int(v) for v in region] if region else None)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "text", "text": f"Reference {modality} image:"},
            {"type": "image", "image": reference_image},
            {"type": "text", "text": f"Reference structures: {boxes}\nTarget {modality} image:"},
            {"type": "image", "image": target_image},
            {"type": "text", "text": question},
        ]},
    ]


def build_answer(task: str, label: str | None = None, box: list | None = None,
                 boxes: dict[str, list] | None = None, think: str = "") -> str:
    """The completion a perfect policy writes: the SFT target, and the parser's round-trip partner."""
    if task == "label":
        body = {"label": label}
    elif task == "ground":
        body = {"label": label, "box": None if box is None else [int(v) for v in box]}
    elif task == "all_boxes":
        body = {"boxes": [{"label": k, "box": [int(v) for v in b]} for k, b in (boxes or {}).items()]}
    elif task == "segment":
        body = {"label": label, "box": None if box is None else [int(v) for v in box], "mask": SEG_TOKEN}
    else:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    return f"<think>{think}</think><answer>{json.dumps(body, separators=(', ', ': '))}</answer>"


@dataclass
class Answer:
    task: str
    label: str | None = None
    box: list[float] | None = None
    boxes: list[tuple[str, list[float]]] = field(default_factory=list)
    has_seg: bool = False
    think: str = ""


@dataclass
class FormatError:
    reason: str  # machine-readable: structure | json | field | box | label | too_long | task
    message: str

    def __bool__(self) -> bool:  # `if parsed:` reads as "is a valid answer"
        return False


_SHAPE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _check_box(box, image_size) -> str | None:
    if not (isinstance(box, list) and len(box) == 4):
        return f"a box is a list of 4 numbers, got {str(box)[:80]}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return f"box values must be numbers, got {str(box)[:80]}"
    if not all(abs(v) < MAX_COORD for v in box):  # no float(): a 400-digit int would overflow it
        return f"box values must be finite numbers below {MAX_COORD:g}, got {str(box)[:80]}"
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        return f"box must have x1 < x2 and y1 < y2, got {box}"
    if image_size is not None and (x1 < 0 or y1 < 0 or x2 > image_size[0] or y2 > image_size[1]):
        return f"box {box} lies outside the image of size {tuple(image_size)}"
    return None


def parse_answer(text, task: str, image_size: tuple[int, int] | None = None,
                 labels: list[str] | None = None) -> Answer | FormatError:
    """Strictly parse a completion; ``image_size`` is (width, height) of the resized target image."""
    try:
        return _parse(text, task, image_size, labels)
    except Exception as e:  # never raise on model output, whatever it is
        return FormatError("structure", f"unparseable answer ({type(e).__name__})")


def _parse(text, task, image_size, labels) -> Answer | FormatError:
    if task not in TASKS:
        return FormatError("task", f"unknown task {task!r}")
    if not isinstance(text, str):
        return FormatError("structure", f"answer must be text, got {type(text).__name__}")
    if len(text) > MAX_ANSWER_CHARS:
        return FormatError("too_long", f"answer has {len(text)} characters (limit {MAX_ANSWER_CHARS})")
    m = _SHAPE.fullmatch(text)
    if not m or any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return FormatError("structure", "expected exactly <think>...</think><answer>{JSON}</answer>")
    think, body = m.group(1), m.group(2)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        return FormatError("json", f"answer is not valid JSON: {str(e)[:120]}")
    if not isinstance(data, dict):
        return FormatError("json", "answer must be a JSON object")
    out = Answer(task=task, think=think.strip())
    if task == "all_boxes":
        items = data.get("boxes")
        if not isinstance(items, list):
            return FormatError("field", "'boxes' must be a list")
        for item in items:
            if not (isinstance(item, dict) and isinstance(item.get("label"), str) and item["label"]):
                return FormatError("field", "each entry of 'boxes' needs a 'label' string and a 'box'")
            if (err := _check_box(item.get("box"), image_size)) is not None:
                return FormatError("box", err)
            if labels is not None and item["label"] not in labels:
                return FormatError("label", f"unknown label {item['label'][:60]!r}")
            out.boxes.append((item["label"], [float(v) for v in item["box"]]))
        return out
    label = data.get("label")
    if not isinstance(label, str) or not label.strip():
        return FormatError("field", "'label' must be a non-empty string")
    if labels is not None and label not in labels:
        return FormatError("label", f"unknown label {label[:60]!r}")
    out.label = label
    if task in ("ground", "segment"):
        if "box" not in data:
            return FormatError("field", "'box' is missing (use null when the structure is absent)")
        if data["box"] is not None:
            if (err := _check_box(data["box"], image_size)) is not None:
                return FormatError("box", err)
            out.box = [float(v) for v in data["box"]]
    if task == "segment":
        if data.get("mask") != SEG_TOKEN or text.count(SEG_TOKEN) != 1:
            return FormatError("field", f"a segmentation answer has exactly one \"mask\": \"{SEG_TOKEN}\"")
        out.has_seg = True
    return out
