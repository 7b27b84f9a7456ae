"""Evaluate the policy's generated answers on task items: format validity and task accuracy, per task.

Scoring is ``rau_ray.eval.scoring`` (the one definition, shared with the GRPO rewards); ``score_answer`` is
re-exported here. Use: ``evaluate_policy(policy, examples, items)`` -> sums per task, ``means(totals)`` -> rates
{"format", "accuracy", "<task>_format", "<task>_accuracy"}.
"""

from __future__ import annotations

from rau_ray.eval.scoring import score_answer

__all__ = ["evaluate_policy", "means", "score_answer"]


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
