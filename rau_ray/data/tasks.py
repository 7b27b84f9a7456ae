"""What the models are asked about samples: per-structure boxes from label masks, reference-target task pairs.

Boxes are pixel corners [x1, y1, x2, y2] with x2/y2 exclusive; structures without pixels are left out.
Use: ``label_boxes(label_map, {1: "liver"})`` -> {"liver": [x1, y1, x2, y2]};
``make_pairs(read_manifest("data/ct"), split="train")`` -> reference-target task items for the policy;
``make_pairs(..., retrieve=models.retrieval.reference_picker(model_config.retrieval))`` picks each reference as
inference does: the DINOv2 bank's best hit of the target's modality, its own subject excluded.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def label_boxes(label: np.ndarray, names: dict[int, str]) -> dict[str, list[int]]:
    label = np.asarray(label)
    slices = ndimage.find_objects(label.astype(np.int32))
    boxes = {}
    for value, name in sorted(names.items()):
        if 0 < value <= len(slices) and slices[value - 1] is not None:
            ys, xs = slices[value - 1]
            boxes[name] = [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)]
    return boxes


TASKS = ("label", "ground", "all_boxes", "segment")


def choose_reference(target, candidates: list, rng: np.random.Generator):
    """Same modality, another subject, nearest axial level (what a bank's nearest-pose hit would give)."""
    pool = [c for c in candidates if c.modality == target.modality and c.subject != target.subject]
    if not pool:
        return None
    if target.slice is not None:
        best = min(abs((c.slice or 0) - target.slice) for c in pool)
        pool = [c for c in pool if abs((c.slice or 0) - target.slice) == best]
    return pool[int(rng.integers(len(pool)))]


ABSENT_SHARE = 1.0  # of the ground items whose target lacks a structure the reference shows: asking for it (null).
# Such targets are few (a resected organ, a structure out of the slice): all of them ask, or SFT sees almost none


def make_pairs(manifest, split: str = "train", reference_split: str = "train", tasks: tuple[str, ...] = TASKS,
               seed: int = 0, absent_share: float = ABSENT_SHARE, retrieve=None) -> list[dict]:
    """Reference-target task items for the policy, one per (target, task): plain dicts, so Ray Data can shard them.

    Each item names the manifest, the two row ids, the task and its subject (a structure present in the reference,
    picked at random; ``label`` also gives the structure's box in the target as the region to name). Where the
    reference shows a structure the target lacks (resected, or out of the slice), a ``ground`` item asks for it
    with probability ``absent_share``: its right answer is ``null``. ``retrieve(manifest, targets, candidates)`` ->
    {target id: candidate row}: references as inference retrieves them (``models.retrieval.reference_picker``);
    None: the nearest axial level of another subject (no model run)."""
    if not 0 <= absent_share <= 1:
        raise ValueError(f"absent_share must be in [0, 1], got {absent_share}")
    rng = np.random.default_rng(seed)
    absent_rng = np.random.default_rng([seed, 1])  # its own stream: the other items do not depend on the share
    references = manifest.select(split=reference_split)
    targets = manifest.select(split=split)
    retrieved = retrieve(manifest, targets, references) if retrieve is not None else None
    items = []
    for target in targets:
        ref = retrieved.get(target.id) if retrieved is not None else choose_reference(target, references, rng)
        if ref is None:
            continue
        in_ref = set(label_boxes(manifest.load(ref)[1], ref.label_names))
        _, tgt_label = manifest.load(target)
        in_tgt = label_boxes(tgt_label, target.label_names)
        shared = sorted(in_ref & set(in_tgt))
        if not shared:
            continue
        missing = sorted(in_ref - set(in_tgt))
        for task in tasks:
            structure = shared[int(rng.integers(len(shared)))]
            if task == "ground" and missing and absent_rng.random() < absent_share:
                structure = missing[int(absent_rng.integers(len(missing)))]
            items.append({"manifest": str(manifest.path.resolve()), "reference": ref.id, "target": target.id,
                          "task": task, "structure": structure,
                          "region": in_tgt[structure] if task == "label" else None})
    return items
