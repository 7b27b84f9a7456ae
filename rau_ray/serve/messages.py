"""The typed messages that cross deployment boundaries in the serving graph (what a handle call sends and returns).

Frozen dataclasses, pickled by Ray between replicas: numpy arrays travel as themselves (cheap), nothing holds a
tensor or a model. A user's problem comes back as a value, never as a raised or returned exception object, so the
Ingress can tell it from a replica failure (which Ray raises):

- Retriever.retrieve -> ``Retrieved`` (the reference and the seconds it took) or ``NoReference`` (no such bank id,
  nothing similar enough: the user's problem, a 422); ``Retriever.structures`` -> ``BankInfo``.
- Policy.answer takes a ``Question`` and returns an ``Answer`` (with the <Seg> hidden state for ``segment``).
- Segmenter.segment -> ``Segmentation``; Segmenter.prompt and the Ingress's PromptDecoder -> ``Prompted``;
  Segmenter.embedding -> ``Features`` (an image's SAM2 features, for ``prompt_decoding: ingress``); any of them
  ``NotHeld`` when it was sent a digest or a token this replica does not hold (the caller then sends the images).
- Commander.parse -> the operations (a list of dicts, ``rau_ray.commands``' schema) or ``NotUnderstood``.
Use: ``out = await retriever.retrieve.remote(...)``; ``if isinstance(out, NoReference): ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rau_ray.models.reference import Reference

TASKS = ("segment", "label", "all_boxes")


@dataclass(frozen=True, slots=True)
class NotHeld:
    """This replica does not hold what the call named (an image digest, a prepared token): send the images."""

    what: str = "image"


@dataclass(frozen=True, slots=True)
class NoReference:
    """Retriever.retrieve found no reference the user can have (no such id, nothing similar enough): a 422."""

    message: str


@dataclass(frozen=True, slots=True, eq=False)
class Retrieved:
    """Retriever.retrieve's reference (its bank row cut to id and subject) and the seconds retrieval took."""

    reference: Reference
    seconds: float


@dataclass(frozen=True, slots=True)
class BankInfo:
    """What the Retriever's bank knows: structure names, modalities, entries."""

    structures: tuple[str, ...]
    modalities: tuple[str, ...]
    entries: int


@dataclass(frozen=True, slots=True, eq=False)
class Question:
    """One question for Policy.answer: ``task`` segment (a ``structure``), label (a ``region`` box) or all_boxes;
    images (H, W, 3) uint8 as the models see them, ``ref_boxes`` {name: box in reference pixels}."""

    task: str
    ref_image: np.ndarray
    ref_boxes: dict
    target: np.ndarray
    modality: str = "CT"
    structure: str | None = None
    region: list[int] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")


@dataclass(frozen=True, slots=True, eq=False)
class Answer:
    """The Policy's answer: its completion and what parsing it gave (``format_error`` when it did not parse);
    ``seg_hidden`` (1, hidden) float32 for ``segment``; ``boxes`` [(name, box), ...] for ``all_boxes``;
    ``timings`` seconds per stage plus ``batch``, the size of the batch it was generated in."""

    completion: str
    label: str | None
    format_error: str | None
    box: list | None = None
    boxes: list | None = None
    timings: dict = field(default_factory=dict)
    seg_hidden: np.ndarray | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Segmentation:
    """Segmenter.segment: the target's mask (bool (H, W)), SAM2's score, whether the target's embedding was cached,
    seconds per stage."""

    mask: np.ndarray
    score: float
    cached: bool
    timings: dict


@dataclass(frozen=True, slots=True, eq=False)
class Prompted:
    """A point / box prompt's mask (bool (H, W)) and score, from the Segmenter or the Ingress's PromptDecoder."""

    mask: np.ndarray
    score: float
    cached: bool = False
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True, eq=False)
class Features:
    """An image's SAM2 features as arrays (what ``Segmenter.embedding`` ships to an Ingress decoding clicks)."""

    image_embed: np.ndarray
    high_res_feats: tuple[np.ndarray, ...]
    orig_hw: tuple[int, int]
    cached: bool = False
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NotUnderstood:
    """Commander.parse: text that is no command (the parser's, or the language model fallback's, reason)."""

    message: str
