"""Turn reference-target task items (``rau_ray.data.tasks.make_pairs``) into chat messages + target completions.

The prompts and answers are the pipeline's (``rau_ray.models.pipeline``): boxes in the processor's resized image, as
the policy sees and answers them. The ``<think>`` text places the structure in the reference (its box) and in the
target relative to its nearest neighbour (``scoring.reasoning.relative_statement``: true by construction, what the
reasoning check reads back). Manifests and images are read once per process.
Use: ``messages, completion = PolicyExamples(processor).example(item)``;
``truth(item)`` -> what a right answer holds (label, box, all boxes, the resized image size), for scoring.
"""

from __future__ import annotations

from rau_ray.data.manifest import Manifests
from rau_ray.data.tasks import label_boxes
from rau_ray.models import pipeline
from rau_ray.scoring.reasoning import relative_statement


class PolicyExamples:
    def __init__(self, processor):
        self.processor = processor
        self.manifests = Manifests()

    def question(self, item: dict):
        """The pipeline's question for a task item, and the target's labelled boxes (its own pixels)."""
        ref, ref_image, ref_label = self.manifests.sample(item["manifest"], item["reference"])
        tgt, image, label = self.manifests.sample(item["manifest"], item["target"])
        boxes = label_boxes(label, tgt.label_names)
        structure, task = item["structure"], item["task"]
        question = pipeline.ask(self.processor, task, image, ref_image, label_boxes(ref_label, ref.label_names),
                                structure=structure, region=boxes.get(structure) if task == "label" else None,
                                modality=tgt.modality, reference_modality=ref.modality)
        return question, boxes

    def example(self, item: dict) -> tuple[list[dict], str]:
        question, boxes = self.question(item)
        structure = item["structure"]
        if structure not in boxes:
            placed = f"there is no {structure}"
        else:  # a true relative-position claim about the target
            placed = relative_statement(structure, boxes) or f"the {structure} is alone"
        think = (f"In the reference the {structure} is at {question.reference_boxes.get(structure)}; "
                 f"in the target {placed}.")
        return question.messages, question.completion(label=structure, box=boxes.get(structure), boxes=boxes,
                                                      think=think)

    def truth(self, item: dict) -> dict:
        question, boxes = self.question(item)
        frame = {k: question.to_frame(b) for k, b in boxes.items()}
        return {"task": item["task"], "label": item["structure"], "box": frame.get(item["structure"]),
                "boxes": frame, "image_size": [question.frame[1], question.frame[0]]}
