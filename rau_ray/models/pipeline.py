"""The one RAU prompt pipeline: (target, reference, task) -> the policy's messages, and a completion -> an answer in
the target's own pixels, with the ``<Seg>`` hidden state (teacher-forced when the answer is malformed) inside.

The policy sees both images as its processor resizes them (Qwen2.5-VL's ``smart_resize``) and reads and writes boxes
in pixels of those resized images; everything outside this module speaks the images' own pixels. A ``Question``
owns that transform, as SAM2's image predictor owns its resize: the reference's labelled boxes and a label
question's region go in scaled, the answer's boxes come out scaled back. ``RAUModel.predict``, the Serve Policy
deployment, the eval workers and the SFT/GRPO training examples all build their prompts here (nowhere else).
Use: ``q = ask(processor, "segment", target, reference, ref_boxes, structure="liver", modality="CT")``;
``answer = q.parse(policy.generate([q.messages])[0])``; ``q.completion(label=..., box=...)`` is the SFT target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rau_ray.models import prompts


@dataclass
class Question:
    task: str
    messages: list[dict]
    size: tuple[int, int]  # (height, width) of the target as given: the pixels answers are returned in
    frame: tuple[int, int]  # (height, width) the processor resizes the target to: the pixels the policy answers in
    structure: str | None = None
    reference_boxes: dict[str, list[int]] | None = None  # as the prompt gives them (reference frame pixels)

    def to_frame(self, box) -> list[int]:
        return prompts.scale_box(box, self.size, self.frame)

    def from_frame(self, box) -> list[int]:
        return prompts.scale_box(box, self.frame, self.size)

    def parse(self, completion: str, labels: list[str] | None = None) -> prompts.Answer | prompts.FormatError:
        """The strict parse of a completion (never raises), its boxes scaled back into the target's pixels."""
        parsed = prompts.parse_answer(completion, self.task, image_size=(self.frame[1], self.frame[0]), labels=labels)
        if not parsed:
            return parsed
        return replace(parsed, box=None if parsed.box is None else self.from_frame(parsed.box),
                       boxes=[(label, self.from_frame(b)) for label, b in parsed.boxes])

    def completion(self, label: str | None = None, box=None, boxes: dict | None = None, think: str = "") -> str:
        """The answer a perfect policy writes, from the truth in the target's pixels: the SFT target."""
        return prompts.build_answer(self.task, label=label, box=None if box is None else self.to_frame(box),
                                    boxes={k: self.to_frame(b) for k, b in (boxes or {}).items()}, think=think)

    def forced(self, completion: str) -> str:
        """``completion`` if it parses, else the canonical answer naming the structure: what the ``<Seg>`` hidden
        state is read from, so a mask still comes out of a malformed answer (the format error is reported)."""
        return completion if self.parse(completion) else prompts.build_answer(self.task, label=self.structure)


def ask(processor, task: str, target, reference, reference_boxes: dict[str, list], structure: str | None = None,
        region=None, modality: str = "CT", reference_modality: str | None = None) -> Question:
    """The question of ``task`` about ``target`` with ``reference`` and its labelled boxes (both in their images'
    own pixels; ``region``, for ``label``, in the target's). Images: HU / grey arrays (windowed by modality), RGB
    uint8 arrays or PIL images."""
    ref_pil = prompts.to_pil(reference, reference_modality or modality)
    tgt_pil = prompts.to_pil(target, modality)
    ref_size, size = (ref_pil.height, ref_pil.width), (tgt_pil.height, tgt_pil.width)
    ref_frame = prompts.resized_size(*ref_size, processor)
    frame = prompts.resized_size(*size, processor)
    boxes = {k: prompts.scale_box(b, ref_size, ref_frame) for k, b in reference_boxes.items()}
    region_frame = None if region is None else prompts.scale_box(region, size, frame)
    messages = prompts.build_messages(task, ref_pil, boxes, tgt_pil, structure=structure, region=region_frame,
                                      modality=modality)
    return Question(task=task, messages=messages, size=size, frame=frame, structure=structure,
                    reference_boxes=boxes)


def seg_state(policy, question: Question, completion: str):
    """The first ``<Seg>`` hidden state of ``completion`` (teacher-forced by ``Question.forced``): (1, hidden)."""
    with torch.no_grad():
        return policy.seg_hidden_states(question.messages, question.forced(completion))[:1]

