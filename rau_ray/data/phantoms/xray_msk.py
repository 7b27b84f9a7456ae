"""Knee radiograph phantom (LERA-like, out of distribution): femur, tibia, fibula, patella in an AP view.

Bones are unions of rounded shapes with a bright cortical rim, inside a soft-tissue silhouette; each subject
varies bone sizes, the joint space, a small rotation and the exposure. Kept out of training (split ``test``).
Use: ``[sample] = generate_2d(seed=0, subject=3, size=256)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rau_ray.data.phantoms.common import PhantomSample, inside_ellipsoid, subject_id, subject_rng, to_uint8

NAME = "xray-msk"
MODALITY = "DX"
OUT_OF_DISTRIBUTION = True
SUPPORTS_3D = False
LABELS = {1: "femur", 2: "tibia", 3: "fibula", 4: "patella"}


def _rect(pts: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return (pts[..., 0] >= x0) & (pts[..., 0] <= x1) & (pts[..., 1] >= y0) & (pts[..., 1] <= y1)


def generate_2d(seed: int, subject: int, size: int = 256) -> list[PhantomSample]:
    rng = subject_rng(seed, NAME, subject)
    yy, xx = np.mgrid[0:size, 0:size].astype(float) / size
    theta = np.deg2rad(rng.uniform(-8, 8))
    c, s = np.cos(theta), np.sin(theta)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.05, 0.05)
    pts = np.stack([c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)], -1)  # centred on the joint

    k = rng.uniform(0.9, 1.1)  # bone size
    gap = rng.uniform(0.02, 0.04)  # joint space
    shaft = 0.075 * k
    femur = _rect(pts, -shaft, shaft, -0.6, -0.12 * k) | inside_ellipsoid(pts, (0, -0.08 * k - gap / 2),
                                                                            (0.17 * k, 0.08 * k))
    tibia = (inside_ellipsoid(pts, (0, 0.06 * k + gap / 2), (0.16 * k, 0.055 * k))
             | _rect(pts, -0.065 * k, 0.065 * k, 0.06 * k, 0.6))
    fib_x = 0.11 * k + rng.uniform(0, 0.01)
    fibula = (inside_ellipsoid(pts, (fib_x, 0.12 * k + gap), (0.035 * k, 0.03 * k))
              | _rect(pts, fib_x - 0.018 * k, fib_x + 0.018 * k, 0.12 * k + gap, 0.6)) & ~tibia
    patella = inside_ellipsoid(pts, (rng.uniform(-0.02, 0.02), -0.12 * k + rng.uniform(-0.03, 0.01)),
                               (0.07 * k, 0.085 * k))
    leg = (np.abs(pts[..., 0]) <= 0.27 * k + 0.02 * np.sin(6 * pts[..., 1])) & (np.abs(pts[..., 1]) < 0.7)

    label = np.zeros((size, size), np.uint8)
    for lab, mask in ((1, femur), (2, tibia), (3, fibula), (4, patella)):  # the patella projects over the femur
        label[mask] = lab
    density = 0.25 * leg.astype(float)
    for mask in (femur, tibia, fibula, patella):
        rim = mask & ~ndimage.binary_erosion(mask, iterations=max(1, size // 64))
        density += 0.35 * mask + 0.25 * rim
    exposure = rng.uniform(0.8, 1.1)
    image = 20 + 200 * exposure * ndimage.gaussian_filter(density, 1.0)
    image += ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 3) * 8 + rng.normal(0, 4, (size, size))
    return [PhantomSample(to_uint8(image), label, dict(LABELS), (0.5 * 256 / size,) * 2, MODALITY,
                          subject_id(subject))]
