"""GRPO rewards for the policy, in trl's reward-function signature: ``fn(prompts, completions, **kwargs) -> list``.

``completions`` may be plain strings or conversational lists (``[{"role": "assistant", "content": ...}]``); the
other dataset columns arrive as keyword lists, one value per completion:

- ``task``: label | ground | all_boxes | segment;
- ``solution``: the reference completion (``prompts.build_answer``: the SFT target), which holds the true label,
  box or boxes in pixels of the target *as the processor resizes it*;
- ``image_size``: ``[width, height]`` of that resized target (valid coordinates lie inside it);
- for ``MaskDiceReward`` also ``manifest``, ``reference``, ``target`` (manifest row ids) and ``structure``.

Rewards (each in [0, 1]; a completion that is garbage in any way scores 0, nothing here raises on model output).
Format and accuracy are ``rau_ray.scoring.answers``'s, the same definitions eval reports:

- ``format_reward``: ``answers.format_credit``: strict ``<think>...</think><answer>{JSON}</answer>`` with the task's
  fields and coordinates inside the image is worth 1; partial credit on the way there (right tags 0.25, + valid
  JSON 0.5, + the task's fields 0.75) gives a random policy a slope to climb.
- ``accuracy_reward``: ``answers.answer_accuracy`` against the parsed ``solution``: label right (1/0); ground /
  segment: box IoU if the answer names the asked structure (a correct ``null`` for an absent one is 1); all_boxes:
  IoU after optimal-transport matching of predicted to true boxes, over max(#predicted, #true).
- ``MaskDiceReward`` (optional): for segment answers the ``<Seg>`` hidden state goes through the RAU segmenter
  (SAM2 built once, by whoever constructs the object) and the mask's Dice with the true mask is the reward;
  ``None`` (left out of trl's means) for other tasks.

trl decodes completions with ``skip_special_tokens=True``, which drops ``<Seg>``; ``with_decoder`` re-decodes from
``completion_ids`` with the policy's own decoder so segment answers keep their token.
Use: ``GRPOTrainer(..., reward_funcs=[with_decoder(format_reward, policy.decode_completion, "format"), ...])``.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rau_ray.data.manifest import Manifests
from rau_ray.errors import ConfigError
from rau_ray.models.prompts import parse_answer, to_pil
from rau_ray.scoring import answers
from rau_ray.scoring.metrics import dice


def completion_text(completion: Any) -> str | None:
    """A completion as text: a string as is, a conversational list -> its assistant text; anything else -> None."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, (list, tuple)):
        return None
    parts = []
    for message in completion:
        if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, (list, tuple)):
            parts += [c["text"] for c in content if isinstance(c, dict) and isinstance(c.get("text"), str)]
    return "".join(parts) if parts else None


def _column(values, name: str, n: int, optional: bool = False) -> list:
    """A dataset column as trl passes it: one value per completion (a missing optional one -> all None)."""
    if values is None and optional:
        return [None] * n
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ConfigError(f"reward needs the dataset column {name!r} with one value per completion ({n}), got "
                          f"{type(values).__name__}")
    return list(values)


_size = answers.image_size


def _safe(fn: Callable[[], float]) -> float:
    try:
        value = float(fn())
    except Exception:  # garbage scores 0, whatever it is
        return 0.0
    return value if math.isfinite(value) else 0.0


def format_score(text, task: str, image_size=None) -> float:
    """Format credit of one completion (``answers.format_credit``)."""
    return answers.format_credit(text, task, image_size)


def format_reward(prompts, completions, task=None, image_size=None, **kwargs) -> list[float]:
    n = len(completions)
    tasks, sizes = _column(task, "task", n), _column(image_size, "image_size", n, optional=True)
    return [_safe(lambda c=c, t=t, s=s: format_score(completion_text(c), t, s))
            for c, t, s in zip(completions, tasks, sizes)]


def accuracy_score(text, task: str, solution, image_size=None) -> float:
    """Accuracy of one completion against the reference completion ``solution`` (``answers.score_answer``)."""
    truth = parse_answer(solution, task)
    if not truth:
        return 0.0
    return answers.score_answer(text, truth, image_size)["accuracy"]


def accuracy_reward(prompts, completions, task=None, solution=None, image_size=None, **kwargs) -> list[float]:
    n = len(completions)
    tasks, solutions = _column(task, "task", n), _column(solution, "solution", n)
    sizes = _column(image_size, "image_size", n, optional=True)
    return [_safe(lambda c=c, t=t, s=s, z=z: accuracy_score(completion_text(c), t, s, z))
            for c, t, s, z in zip(completions, tasks, solutions, sizes)]


def with_decoder(reward: Callable, decode: Callable[[list[int]], str] | None, name: str | None = None) -> Callable:
    """``reward`` with completions re-decoded from trl's ``completion_ids`` by ``decode`` (ids -> text), e.g.
    ``Policy.decode_completion``, which keeps ``<Seg>``. ``name`` (default: the reward's) is what trl calls it in
    its metrics: ``rewards/<name>/mean``."""

    @functools.wraps(reward)
    def wrapped(prompts, completions, completion_ids=None, **kwargs):
        if decode is not None and completion_ids is not None and len(completion_ids) == len(completions):
            completions = [_safe_decode(decode, ids) for ids in completion_ids]
        return reward(prompts, completions, **kwargs)

    wrapped.__name__ = name or getattr(reward, "__name__", type(reward).__name__)
    return wrapped


def _safe_decode(decode, ids) -> str | None:
    try:
        return decode(list(ids))
    except Exception:
        return None


class MaskDiceReward:
    """Dice of the mask the RAU segmenter decodes from a segment answer's ``<Seg>`` state (SAM2 in the loop).

    Build it once per worker with the policy being trained and a ``RAUSegmenter`` (its SAM2 inside): each call only
    runs the policy forward for the ``<Seg>`` state and SAM2's decoder; image embeddings and reference memories are
    cached by manifest row (the completions of a GRPO group share them).
    """

    __name__ = "mask_dice"  # trl's metric key: rewards/mask_dice/mean

    def __init__(self, policy, segmenter, cache_size: int = 16):
        self.policy, self.segmenter, self.cache_size = policy, segmenter, cache_size
        self._manifests = Manifests()
        self._cache: OrderedDict = OrderedDict()

    def _remember(self, key, make):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = make()
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def _sample(self, manifest_path: str, row_id: str):
        def load():
            row, image, label = self._manifests.sample(manifest_path, row_id)
            return row, np.asarray(to_pil(image, row.modality)), label

        return self._remember(("sample", manifest_path, row_id), load)

    def _embedding(self, manifest_path: str, row_id: str):
        return self._remember(("embed", manifest_path, row_id),
                              lambda: self.segmenter.set_image(self._sample(manifest_path, row_id)[1]))

    @staticmethod
    def _mask(row, label, structure: str) -> np.ndarray | None:
        values = [v for v, name in row.label_names.items() if name == structure]
        return (np.asarray(label) == values[0]) if values else None

    def score(self, messages, text, manifest_path, reference, target, structure, image_size=None) -> float:
        if not parse_answer(text, "segment", image_size=_size(image_size)):
            return 0.0
        ref_row, _, ref_label = self._sample(manifest_path, reference)
        tgt_row, _, tgt_label = self._sample(manifest_path, target)
        ref_mask, tgt_mask = self._mask(ref_row, ref_label, structure), self._mask(tgt_row, tgt_label, structure)
        if ref_mask is None or tgt_mask is None or not ref_mask.any():
            return 0.0
        memory = self._remember(("memory", manifest_path, reference, structure), lambda: self.segmenter.
                                encode_reference(self._embedding(manifest_path, reference), ref_mask))
        model = self.policy.model
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                hidden = self.policy.seg_hidden_states(messages, text)[:1]
        finally:
            model.train(training)
        if hidden.shape[0] == 0:
            return 0.0
        logits, _, _ = self.segmenter.predict(self._embedding(manifest_path, target), hidden.float(), memory)
        return dice(logits.cpu().numpy() > 0, tgt_mask, ignore_empty=False)

    def __call__(self, prompts, completions, task=None, manifest=None, reference=None, target=None, structure=None,
                 image_size=None, **kwargs) -> list[float | None]:
        n = len(completions)
        cols = {k: _column(v, k, n) for k, v in (("task", task), ("manifest", manifest), ("reference", reference),
                                                  ("target", target), ("structure", structure))}
        sizes = _column(image_size, "image_size", n, optional=True)
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            if cols["task"][i] != "segment":
                out.append(None)  # not applicable: trl leaves it out of the mean
                continue
            out.append(_safe(lambda i=i, c=completion: self.score(
                prompts[i], completion_text(c), cols["manifest"][i], cols["reference"][i], cols["target"][i],
                cols["structure"][i], sizes[i])))
        return out
