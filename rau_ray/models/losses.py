"""Segmentation losses and the interactive-training click sampler, shared by RAU's segmenter and CBAM-LoRA SAM2.

``focal_dice_loss``: torchvision's sigmoid focal loss + soft Dice on mask logits, weighted (1:1 by default, as
SpinalSAM-R1 trains). ``sample_corrective_points``: SAM/SAM2-style corrective clicks from the error between a
prediction and the true mask — a positive click in a false-negative region, a negative click in a false-positive
one, each placed in the interior of the largest remaining error region (distance transform, as RITM and SAM2's
``sample_one_point_from_error_center`` do), sampled among the interior pixels when given a random generator.
Use: ``loss, focal, dice = focal_dice_loss(logits, target)``;
``points, labels = sample_corrective_points(pred > 0, gt, n=1, rng=np.random.default_rng(0))``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import sigmoid_focal_loss

from rau_ray.errors import DataError


class FocalDice(NamedTuple):
    loss: torch.Tensor  # focal_weight * focal + dice_weight * dice: what to backpropagate
    focal: torch.Tensor  # mean sigmoid focal loss
    dice: torch.Tensor  # mean soft Dice loss (1 - soft Dice)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample (flattened from dim 1), averaged over the batch; ``eps`` keeps empty masks finite."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 1.0,
                    dice_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0) -> FocalDice:
    """Focal (torchvision, mean over pixels) + soft Dice on ``logits`` against a 0/1 ``target`` of the same shape
    (B, ...). ``alpha``/``gamma`` are the focal loss's (SAM's values)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if focal_weight < 0 or dice_weight < 0 or focal_weight + dice_weight == 0:
        raise ValueError(f"loss weights must be >= 0 and not both 0, got focal {focal_weight}, dice {dice_weight}")
    target = target.to(logits.dtype)
    focal = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="mean")
    dice = dice_loss(logits, target)
    return FocalDice(focal_weight * focal + dice_weight * dice, focal, dice)


def _interior(region: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``region`` to the nearest pixel outside it (the image border counts as outside)."""
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def sample_corrective_points(pred_mask, true_mask, n: int = 1,
                             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` corrective clicks for a 2D prediction: ``points`` (k, 2) float32 (x, y) pixel indices and
    ``labels`` (k,) int64 (1 positive: add this false-negative region, 0 negative: remove this false positive).

    Each click goes to the largest remaining connected error region (false negatives and false positives compete
    by area): at its most interior pixel when ``rng`` is None (deterministic, for evaluation), else at a random
    pixel of its interior half (distance to the region's edge at least half the region's maximum), for training
    variety. A click is taken to explain a disc around it (radius = its distance to the edge), so further clicks go
    elsewhere. ``k < n`` when the errors run out; a perfect prediction gives no clicks. With an empty prediction the
    first click is a positive one inside the structure: the usual first point prompt.
    """
    pred, true = np.asarray(pred_mask, dtype=bool), np.asarray(true_mask, dtype=bool)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise DataError(f"sample_corrective_points takes two 2D masks of the same shape, got {pred.shape} and "
                        f"{true.shape}")
    if n < 0:
        raise DataError(f"the number of clicks must be >= 0, got {n}")
    errors = {1: true & ~pred, 0: pred & ~true}  # click label -> the error that click corrects
    yy, xx = np.indices(pred.shape)
    points, labels = [], []
    for _ in range(n):
        best = None  # (area, label, component map, component index)
        for label, err in errors.items():
            if not err.any():
                continue
            comps, count = ndimage.label(err)
            areas = np.bincount(comps.ravel(), minlength=count + 1)[1:]
            i = int(areas.argmax())
            if best is None or areas[i] > best[0]:
                best = (int(areas[i]), label, comps, i + 1)
        if best is None:
            break
        _, label, comps, index = best
        dist = _interior(comps == index)
        if rng is None:
            y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        else:
            ys, xs = np.nonzero(dist >= max(dist.max() / 2, 1.0))
            j = int(rng.integers(len(ys)))
            y, x = ys[j], xs[j]
        points.append((float(x), float(y)))
        labels.append(label)
        radius = max(float(dist[y, x]), 1.0)
        errors[label] = errors[label] & ((yy - y) ** 2 + (xx - x) ** 2 >= radius ** 2)
    return np.asarray(points, dtype=np.float32).reshape(-1, 2), np.asarray(labels, dtype=np.int64)
