"""The one scoring of a policy answer against its truth: format (valid or not, or graded credit) and task accuracy.

Eval reports it (``evaluate_policy`` below, used by SFT) and the GRPO rewards train on it (``rau_ray.train.rewards``),
so both mean the same. Use: ``score_answer(text, truth)`` -> {"format": 0|1, "accuracy": float}, ``truth`` as
``PolicyExamples.truth`` gives it or a parsed reference ``Answer``; ``format_credit(text, task, image_size)`` ->
graded format in [0, 1]; ``evaluate_policy(policy, examples, items)`` -> sums per task, ``means(totals)`` -> rates
{"format", "accuracy", "<task>_format", "<task>_accuracy"}.

Accuracy (in [0, 1]; an invalid answer scores 0):

- label: the named structure is right (case and surrounding blanks ignored);
- ground / segment: the answer must name the asked structure; then box IoU with the true box, and a correct
  ``null`` for an absent structure is 1 (a box for an absent one, or ``null`` for a present one, is 0);
- all_boxes: predicted boxes are assigned to the true ones by optimal transport (``matching.assign``, EMD, the
  answered names only earn a bonus) and the IoUs of the pairs are summed over max(#predicted, #true), so a missing
  box and a surplus box both cost. Needs the image size (the transport cost is in fractions of the image).
"""

from __future__ import annotations

import math

from rau_ray.models.prompts import Answer, parse_answer
from rau_ray.scoring.matching import MatchConfig, assign
from rau_ray.scoring.metrics import box_iou

# graded format: credit for a completion that got this far before the parser stopped it (``FormatError.reason``);
# a valid answer is worth 1. The slope gives a random GRPO policy something to climb
FORMAT_CREDIT = {"structure": 0.0, "too_long": 0.0, "task": 0.0, "json": 0.25, "field": 0.5, "box": 0.75}
MATCH = MatchConfig(method="emd")  # exact transport: the all_boxes score must not depend on a solver's tolerance


def image_size(value) -> tuple[float, float] | None:
    """``[width, height]`` (any numbers) -> a positive (w, h) tuple, anything else -> None."""
    try:
        w, h = (float(v) for v in value)
        return (w, h) if w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h) else None
    except (TypeError, ValueError):
        return None


def format_credit(text, task: str, size=None) -> float:
    """1 for a valid answer of ``task`` (coordinates inside ``size`` = [w, h]), partial credit on the way there."""
    parsed = parse_answer(text, task, image_size=image_size(size))
    return 1.0 if parsed else FORMAT_CREDIT.get(parsed.reason, 0.0)


def _norm(label) -> str:
    return label.strip().casefold() if isinstance(label, str) else ""


def matched_mean_iou(pred: list[tuple[str, list[float]]], truth: list[tuple[str, list[float]]],
                     size: tuple[float, float], cfg: MatchConfig = MATCH) -> float:
    """Mean IoU of predicted boxes with the true boxes that optimal transport assigns them (the true boxes are the
    prototypes, the predicted labels earn the label bonus), over max(#pred, #true): a miss or a surplus box is 0."""
    if not truth:
        return float(not pred)
    if not pred:
        return 0.0
    truth_boxes = dict(truth)
    result = assign([b for _, b in pred], size, truth_boxes, size, cfg, predicted_labels=[label for label, _ in pred])
    total = sum(float(box_iou(box, truth_boxes[name])) for (_, box), name in zip(pred, result.labels)
                if name is not None)
    return total / max(len(pred), len(truth_boxes))


def answer_accuracy(pred: Answer, truth: Answer, size=None) -> float:
    """Accuracy of a parsed answer against the parsed truth of the same task (see module doc)."""
    task = truth.task
    if pred.task != task:
        return 0.0
    if task == "label":
        return float(_norm(pred.label) == _norm(truth.label))
    if task in ("ground", "segment"):
        if _norm(pred.label) != _norm(truth.label):
            return 0.0
        if truth.box is None or pred.box is None:
            return float(truth.box is None and pred.box is None)  # a right "absent" is full marks
        return float(box_iou(pred.box, truth.box))
    size = image_size(size)
    return 0.0 if size is None else matched_mean_iou(pred.boxes, truth.boxes, size)


def truth_answer(truth: dict | Answer) -> Answer:
    """``PolicyExamples.truth`` ({"task", "label", "box", "boxes": {name: box}, ...}) as an ``Answer``."""
    if isinstance(truth, Answer):
        return truth
    return Answer(task=truth["task"], label=truth.get("label"), box=truth.get("box"),
                  boxes=list((truth.get("boxes") or {}).items()))


def score_answer(text, truth: dict | Answer, size=None) -> dict[str, float]:
    """{"format": 1 if valid else 0, "accuracy": ...} of one completion. ``size`` ([w, h] of the target as the
    policy saw it) defaults to ``truth["image_size"]``; answers are checked against it."""
    if size is None and isinstance(truth, dict):
        size = truth.get("image_size")
    truth = truth_answer(truth)
    parsed = parse_answer(text, truth.task, image_size=image_size(size))
    if not parsed:
        return {"format": 0.0, "accuracy": 0.0}
    return {"format": 1.0, "accuracy": answer_accuracy(parsed, truth, size)}


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
