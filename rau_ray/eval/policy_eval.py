"""Score the policy's generated answers against the truth of task items: format validity and task accuracy.

Accuracy is the field's: labeling -> the label is right; grounding / segmentation -> IoU of the answered box with
the true one; all boxes -> mean IoU over the true structures, each answered label's box compared with its truth.
Use: ``score_answer(text, truth)`` -> {"format": 0|1, "accuracy": float};
``evaluate_policy(policy, examples, items)`` -> {"format": rate, "accuracy": mean, "label_accuracy": ...}.
"""

from __future__ import annotations

import numpy as np

from rau_ray.eval.metrics import box_iou
from rau_ray.models import prompts


def score_answer(text: str, truth: dict) -> dict[str, float]:
    """``truth`` as ``PolicyExamples.truth`` gives it. Malformed answers score 0 on both."""
    parsed = prompts.parse_answer(text, truth["task"], image_size=truth.get("image_size"))
    if not parsed:
        return {"format": 0.0, "accuracy": 0.0}
    task = truth["task"]
    if task == "label":
        accuracy = float(parsed.label == truth["label"])
    elif task in ("ground", "segment"):
        accuracy = float(box_iou(parsed.box, truth["box"])) if parsed.box and truth["box"] else 0.0
    else:  # all_boxes
        answered = dict(parsed.boxes)
        accuracy = float(np.mean([box_iou(answered[name], box) if name in answered else 0.0
                                  for name, box in truth["boxes"].items()])) if truth["boxes"] else 0.0
    return {"format": 1.0, "accuracy": accuracy}


def evaluate_policy(policy, examples, items: list[dict], max_new_tokens: int = 128,
                    synced_gpus: bool = False) -> dict[str, float]:
    """Greedy answers for ``items`` (one at a time), scored; sums and counts per task, so ranks can add them.
    ``synced_gpus`` when the policy is ZeRO-3-sharded over ranks (each rank then passes as many items)."""
    totals: dict[str, float] = {}
    for item in items:
        messages, _ = examples.example(item)
        text = policy.generate([messages], max_new_tokens=max_new_tokens, synced_gpus=synced_gpus)[0]
        score = score_answer(text, examples.truth(item))
        for key in ("format", "accuracy"):
            totals[key] = totals.get(key, 0.0) + score[key]
            totals[f"{item['task']}_{key}"] = totals.get(f"{item['task']}_{key}", 0.0) + score[key]
        totals["n"] = totals.get("n", 0) + 1
        totals[f"{item['task']}_n"] = totals.get(f"{item['task']}_n", 0) + 1
    return totals


def means(totals: dict[str, float]) -> dict[str, float]:
    """Sums from ``evaluate_policy`` (possibly added over ranks) -> rates: format, accuracy, <task>_accuracy..."""
    out = {}
    for key, value in totals.items():
        if key.endswith("_n") or key == "n":
            continue
        task = key.rsplit("_", 1)[0] if key not in ("format", "accuracy") else None
        n = totals.get(f"{task}_n" if task else "n", 0)
        out[key] = value / n if n else float("nan")
    return out
