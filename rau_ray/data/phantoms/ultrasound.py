"""Echocardiography phantom (CAMUS-like, out of distribution): apical view in a fan, speckle, 3 structures.

A sector-shaped field of view with its apex at the top; the left ventricle's blood pool (dark), the myocardium
around it (bright) and the left atrium below; multiplicative Rayleigh speckle and depth attenuation.
Kept out of training: every sample's split is ``test``. Use: ``[sample] = generate_2d(seed=0, subject=3)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rau_ray.data.phantoms.common import PhantomSample, inside_ellipsoid, subject_id, subject_rng, to_uint8

NAME = "ultrasound"
MODALITY = "US"
OUT_OF_DISTRIBUTION = True
SUPPORTS_3D = False
LABELS = {1: "left ventricle", 2: "myocardium", 3: "left atrium"}


def generate_2d(seed: int, subject: int, size: int = 256) -> list[PhantomSample]:
    rng = subject_rng(seed, NAME, subject)
    yy, xx = np.mgrid[0:size, 0:size].astype(float) / size  # unit coordinates
    apex = np.array([0.5, 0.04])
    r = np.hypot(xx - apex[0], yy - apex[1])
    ang = np.arctan2(xx - apex[0], yy - apex[1])
    half_open = np.deg2rad(rng.uniform(35, 40))
    fan = (np.abs(ang) <= half_open) & (r <= 0.92)

    tilt = np.deg2rad(rng.uniform(-10, 10))
    axis = np.array([np.sin(tilt), np.cos(tilt)])  # long axis of the heart, from the apex down
    pts = np.stack([xx, yy], -1)
    lv_c = apex + axis * rng.uniform(0.36, 0.42)
    lv_semi = np.array([rng.uniform(0.10, 0.14), rng.uniform(0.24, 0.30)])  # (short, long)
    wall = rng.uniform(0.035, 0.05)
    la_c = lv_c + axis * (lv_semi[1] + rng.uniform(0.10, 0.14))
    la_semi = np.array([rng.uniform(0.09, 0.12), rng.uniform(0.08, 0.11)])
    lv = inside_ellipsoid(pts, lv_c, lv_semi, -tilt)
    myo = inside_ellipsoid(pts, lv_c, lv_semi + wall, -tilt) & ~lv
    base = np.einsum("...d,d->...", pts - lv_c, axis) > lv_semi[1] * 0.8  # the wall is open at the mitral valve
    myo &= ~base
    la = inside_ellipsoid(pts, la_c, la_semi, -tilt) & ~lv & ~myo

    label = np.zeros((size, size), np.uint8)
    label[lv], label[myo], label[la] = 1, 2, 3
    label[~fan] = 0
    tissue = 0.45 + 0.15 * ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 40)
    echo = np.where(lv | la, 0.06, np.where(myo, 0.85, tissue))
    echo = ndimage.gaussian_filter(echo, 1.0) * np.exp(-1.2 * r)  # depth attenuation
    speckle = rng.rayleigh(1.0, (size, size))
    speckle = ndimage.gaussian_filter(speckle, (1.5, 0.6))  # speckle is elongated across the beam
    image = np.where(fan, 255 * echo * speckle / 1.25, 0)
    return [PhantomSample(to_uint8(image), label, dict(LABELS), (0.6 * 256 / size,) * 2, MODALITY,
                          subject_id(subject))]
