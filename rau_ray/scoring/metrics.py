"""Segmentation, box and labeling metrics, defined the way MONAI and the referring-segmentation papers define them.

Pure numpy/scipy: every mask argument accepts anything ``np.asarray`` takes (lists, numpy arrays, CPU torch
tensors); any nonzero value is foreground. Empty-mask cases follow MONAI (see each function); ``nan`` means
"undefined, leave out of the mean" (use ``np.nanmean``).
Use: ``dice(pred_mask, gt_mask)``, ``hd95(pred_mask, gt_mask, spacing=(2.0, 0.8, 0.8))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

__all__ = [
    "dice",
    "iou",
    "giou",
    "ciou",
    "hd95",
    "box_iou",
    "mask_to_box",
    "labeling_accuracy",
    "per_label_dice",
]


def _as_bool(mask: ArrayLike) -> np.ndarray:
    return np.asarray(mask) != 0


def _pair(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Binarize ``pred`` and ``gt``; ValueError naming both shapes if they differ."""
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {p.shape} and gt {g.shape}")
    return p, g


def _empty_gt_score(pred_empty: bool, ignore_empty: bool) -> float:
    # MONAI DiceMetric/MeanIoU: empty gt -> nan when ignore_empty, else 1 if pred is empty too, else 0.
    if ignore_empty:
        return math.nan
    return 1.0 if pred_empty else 0.0


def dice(pred: ArrayLike, gt: ArrayLike, ignore_empty: bool = True) -> float:
    """Dice coefficient 2|P∩G| / (|P|+|G|) of two binary masks of the same shape.

    Empty ground truth (as MONAI ``DiceMetric``): ``nan`` if ``ignore_empty``, else 1.0 when ``pred`` is empty
    too and 0.0 when it is not.
    """
    p, g = _pair(pred, gt)
    n_g = int(g.sum())
    n_p = int(p.sum())
    if n_g == 0:
        return _empty_gt_score(n_p == 0, ignore_empty)
    inter = int(np.logical_and(p, g).sum())
    return 2.0 * inter / (n_p + n_g)


def iou(pred: ArrayLike, gt: ArrayLike, ignore_empty: bool = True) -> float:
    """Intersection over union |P∩G| / |P∪G| of two binary masks; empty-gt rules as :func:`dice`."""
    p, g = _pair(pred, gt)
    if not g.any():
        return _empty_gt_score(not p.any(), ignore_empty)
    inter = int(np.logical_and(p, g).sum())
    union = int(np.logical_or(p, g).sum())
    return inter / union


def _inter_union_per_image(preds: Iterable[ArrayLike], gts: Iterable[ArrayLike]) -> list[tuple[int, int]]:
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts must have the same length, got {len(preds)} and {len(gts)}")
    out = []
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        p, g = _as_bool(pred), _as_bool(gt)
        if p.shape != g.shape:
            raise ValueError(f"image {i}: pred and gt must have the same shape, got pred {p.shape} and gt {g.shape}")
        out.append((int(np.logical_and(p, g).sum()), int(np.logical_or(p, g).sum())))
    return out


def giou(preds: Iterable[ArrayLike], gts: Iterable[ArrayLike]) -> float:
    """"Generalized IoU" of referring segmentation (LISA, RAU): the mean over images of per-image IoU.

    An image whose gt AND pred are both empty counts as IoU 1.0 (correctly predicted "no object"); an empty gt
    with a non-empty pred counts as 0.0. ``preds[i]`` and ``gts[i]`` must have the same shape (images may
    differ). No images -> ``nan``. Not the box-regression GIoU of Rezatofighi et al.
    """
    pairs = _inter_union_per_image(preds, gts)
    if not pairs:
        return math.nan
    return float(np.mean([1.0 if u == 0 else i / u for i, u in pairs]))


def ciou(preds: Iterable[ArrayLike], gts: Iterable[ArrayLike]) -> float:
    """Cumulative IoU: sum of intersections / sum of unions over all images (big objects weigh more).

    A total union of 0 (every pred and gt empty, or no images) -> ``nan``.
    """
    pairs = _inter_union_per_image(preds, gts)
    total_union = sum(u for _, u in pairs)
    if total_union == 0:
        return math.nan
    return sum(i for i, _ in pairs) / total_union


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = np.atleast_1d(np.asarray(spacing, dtype=float))
    if sp.ndim != 1 or sp.size not in (1, ndim):
        raise ValueError(f"spacing must be a number or have one value per axis ({ndim}), got {spacing!r}")
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing values must be positive and finite, got {spacing!r}")
    return tuple(float(s) for s in sp)


def _surface(mask: np.ndarray) -> np.ndarray:
    # MONAI get_mask_edges: mask XOR binary_erosion(mask); scipy's default border_value=0 makes voxels on the
    # array border surface voxels.
    return mask ^ ndimage.binary_erosion(mask)


def hd95(pred: ArrayLike, gt: ArrayLike, spacing: float | Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between two 2D or 3D masks, in physical units.

    As MONAI ``compute_hausdorff_distance(percentile=95)``: surfaces are ``mask XOR binary_erosion(mask)``; for
    each surface voxel of one mask, the distance to the nearest surface voxel of the other
    (``distance_transform_edt`` with ``sampling=spacing``); the 95th percentile (``np.percentile``, linear) of
    each directed set; the max of the two. ``spacing`` is per axis in array-axis order (a number applies to
    all axes; default 1.0).

    Empty masks: both empty -> ``nan`` (undefined, leave out of means); exactly one empty -> ``inf`` (MONAI gives
    inf/nan with a warning here; we return these values silently).
    """
    p, g = _pair(pred, gt)
    if p.ndim not in (2, 3):
        raise ValueError(f"hd95 takes 2D or 3D masks, got shape {p.shape}")
    sampling = _spacing(spacing, p.ndim)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return math.nan
    if not p_any or not g_any:
        return math.inf
    # Crop to the union's bounding box (distances between voxels inside it are unchanged), pad by one so that
    # the erosion sees background around the box, exactly as it would with the uncropped array.
    idx = np.nonzero(p | g)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    p = np.pad(p[box], 1)
    g = np.pad(g[box], 1)
    sp, sg = _surface(p), _surface(g)
    dist_to_g = ndimage.distance_transform_edt(~sg, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    d_pg = np.percentile(dist_to_g[sp], 95)
    d_gp = np.percentile(dist_to_p[sg], 95)
    return float(max(d_pg, d_gp))


def _boxes(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(
            f"{name} must be a box [x1, y1, x2, y2] or an (N, 4) array of boxes, got shape {np.shape(x)}"
        )
    if np.any((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])):
        raise ValueError(f"{name}: boxes must be [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1, got {arr.tolist()}")
    return arr


def box_iou(a: ArrayLike, b: ArrayLike) -> float | np.ndarray:
    """IoU of boxes ``[x1, y1, x2, y2]`` (continuous pixel coordinates, area ``(x2-x1)*(y2-y1)``).

    Two single boxes -> a float; ``(N, 4)`` and ``(M, 4)`` arrays (a single box counts as ``(1, 4)``) -> the
    ``(N, M)`` pairwise matrix. Boxes with zero area have IoU 0 with everything, each other included (not nan).
    ValueError for other shapes or for x2 < x1 / y2 < y1.
    """
    single = np.ndim(a) == 1 and np.ndim(b) == 1
    A, B = _boxes(a, "a"), _boxes(b, "b")
    area_a = (A[:, 2] - A[:, 0]) * (A[:, 3] - A[:, 1])
    area_b = (B[:, 2] - B[:, 0]) * (B[:, 3] - B[:, 1])
    w = np.minimum(A[:, None, 2], B[None, :, 2]) - np.maximum(A[:, None, 0], B[None, :, 0])
    h = np.minimum(A[:, None, 3], B[None, :, 3]) - np.maximum(A[:, None, 1], B[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(out[0, 0]) if single else out


def mask_to_box(mask: ArrayLike) -> list[int] | None:
    """Tight box ``[x1, y1, x2 + 1, y2 + 1]`` (x = column, y = row) of the nonzero pixels of a 2D mask.

    The ``+1`` makes the box cover whole pixels, so its area is the pixel count of a filled rectangle.
    Empty mask -> ``None``.
    """
    m = _as_bool(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_to_box takes a 2D mask, got shape {m.shape}")
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        return None
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def labeling_accuracy(predicted_labels: Sequence[str], true_labels: Sequence[str]) -> float:
    """Fraction of positions where the predicted label equals the true one; no labels -> ``nan``."""
    pred, true = list(predicted_labels), list(true_labels)
    if len(pred) != len(true):
        raise ValueError(
            f"predicted_labels and true_labels must have the same length, got {len(pred)} and {len(true)}"
        )
    if not true:
        return math.nan
    return sum(1 for p, t in zip(pred, true) if p == t) / len(true)


def per_label_dice(
    pred_labelmap: ArrayLike, gt_labelmap: ArrayLike, label_ids: Iterable[int], ignore_empty: bool = True
) -> dict[int, float]:
    """``{id: dice(pred == id, gt == id)}`` for each id in ``label_ids``; a label absent from gt follows
    :func:`dice`'s ``ignore_empty`` rule."""
    p, g = np.asarray(pred_labelmap), np.asarray(gt_labelmap)
    if p.shape != g.shape:
        raise ValueError(
            f"pred_labelmap and gt_labelmap must have the same shape, got pred {p.shape} and gt {g.shape}"
        )
    return {int(i): dice(p == i, g == i, ignore_empty=ignore_empty) for i in label_ids}


def grouped_bootstrap(values: Sequence[float], groups: Sequence, n: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the mean of ``values``, resampling whole groups (subjects: the items of
    one subject move together, so a subject's many slices do not narrow the interval). None without values."""
    values, groups = np.asarray(values, float), np.asarray(groups)
    if len(values) == 0:
        return None
    ids = np.unique(groups)
    sums = np.array([values[groups == g].sum() for g in ids])
    counts = np.array([(groups == g).sum() for g in ids], float)
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]
