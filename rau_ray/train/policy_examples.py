"""Turn reference-target task items (``rau_ray.data.tasks.make_pairs``) into chat messages + target completions.

Boxes are scaled into the processor's resized image, as the policy sees and answers them. Manifests and images are
read once per process. Use: ``messages, completion = PolicyExamples(processor).example(item)``;
``truth(item)`` -> what a right answer holds (label, box, all boxes, the resized image size), for scoring.
"""

from __future__ import annotations

from rau_ray.data.manifest import Manifests
from rau_ray.data.tasks import label_boxes
from rau_ray.models import prompts


class PolicyExamples:
    def __init__(self, processor):
        self.processor = processor
        self.manifests = Manifests()

    def _sample(self, manifest_path: str, row_id: str):
        row, image, label = self.manifests.sample(manifest_path, row_id)
        pil = prompts.to_pil(image, row.modality)
        hw = (pil.height, pil.width)
        resized = prompts.resized_size(*hw, self.processor)
        boxes = {k: prompts.scale_box(b, hw, resized) for k, b in label_boxes(label, row.label_names).items()}
        return row, pil, boxes, resized

    def example(self, item: dict) -> tuple[list[dict], str]:
        ref, ref_pil, ref_boxes, _ = self._sample(item["manifest"], item["reference"])
        tgt, tgt_pil, tgt_boxes, _ = self._sample(item["manifest"], item["target"])
        structure, task = item["structure"], item["task"]
        region = tgt_boxes.get(structure) if task == "label" else None
        messages = prompts.build_messages(task, ref_pil, ref_boxes, tgt_pil, structure=structure, region=region,
                                          modality=tgt.modality)
        think = (f"In the reference the {structure} is at {ref_boxes.get(structure)}; the target shows the same "
                 f"anatomy, so it lies at the matching position relative to its neighbours.")
        completion = prompts.build_answer(task, label=structure, box=tgt_boxes.get(structure), boxes=tgt_boxes,
                                          think=think)
        return messages, completion

    def truth(self, item: dict) -> dict:
        _, _, boxes, (height, width) = self._sample(item["manifest"], item["target"])
        return {"task": item["task"], "label": item["structure"], "box": boxes.get(item["structure"]),
                "boxes": boxes, "image_size": [width, height]}
