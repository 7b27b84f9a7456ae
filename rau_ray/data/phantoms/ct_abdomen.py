"""CT abdomen phantom: 11 labelled organs in Hounsfield units, axial slices or whole volumes.

Organs are ellipsoids and tubes in anatomical coordinates (x: towards the patient's left, y: posterior,
d: depth below the diaphragm, mm), moved per subject by a global affine, a smooth elastic field and per-organ size
changes; some subjects lack an organ (as after a resection). Liver, spleen, kidneys, pancreas and the great vessels
share soft-tissue HU on purpose: appearance alone cannot tell them apart, relative position must.
Images are shown radiologically: rows run anterior -> posterior, columns patient-right -> patient-left.

Use: ``samples = generate_2d(seed=0, subject=3, size=256)`` or ``volume = generate_3d(seed=0, subject=3)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rau_ray.data.phantoms.common import (
    PhantomSample,
    SmoothField,
    inside_ellipsoid,
    pixel_grid,
    rotation_2d,
    subject_id,
    subject_rng,
)

NAME = "ct-abdomen"
MODALITY = "CT"
OUT_OF_DISTRIBUTION = False
SUPPORTS_3D = True
LABELS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney", 5: "stomach", 6: "pancreas",
          7: "gallbladder", 8: "aorta", 9: "inferior vena cava", 10: "vertebrae", 11: "urinary bladder"}
RESECTABLE = (2, 3, 4, 7)  # organs a subject may lack (splenectomy, nephrectomy, cholecystectomy)
P_MISSING = 0.2

FOV_MM = 360.0  # in-plane field of view; spacing = FOV_MM / size
TOP_MM, BOTTOM_MM = -20.0, 300.0  # depth range covered by a volume (diaphragm dome at 0, bladder near 290)
DEPTH = 64  # axial slices of a full volume; a 2D slice index refers to this grid

# label: (parts as (centre x, y, d), (semi-axes), in-plane angle in degrees), mean HU. Painted in this order.
ORGANS = {
    1: ([((-65, -5, 70), (78, 72, 72), 15), ((-5, -38, 45), (45, 28, 36), 0)], 60),
    5: ([((55, -32, 62), (45, 32, 46), -35)], 32),
    2: ([((88, 42, 66), (28, 46, 48), -30)], 56),
    3: ([((-60, 55, 150), (25, 21, 50), 20)], 55),
    4: ([((60, 55, 142), (25, 21, 50), -20)], 55),
    6: ([((8, 16, 118), (66, 12, 16), -15)], 48),
    7: ([((-46, -44, 126), (14, 19, 27), 0)], 12),
    11: ([((0, -22, 292), (48, 36, 36), 0)], 10),
}
# tubes along d: label: (centre x, y), (semi-axes x, y), (d from, d to), HU
TUBES = {8: ((14, 40), (11, 11), (-40, 255), 45), 9: ((-20, 38), (14, 10), (-40, 245), 42)}
VERTEBRA = {"body": ((0, 76), (23, 21)), "process": ((0, 110), (6, 16)), "hu": 420, "disc_hu": 80,
            "period_mm": 32.0, "disc_mm": 6.0}


def draw_subject(seed: int, subject: int) -> dict:
    """All random choices for one subject: affine, elastic field, organ sizes, a missing organ, body shape."""
    rng = subject_rng(seed, NAME, subject)
    return {
        "theta": np.deg2rad(rng.uniform(-6, 6)),
        "scale": rng.uniform(0.9, 1.1, size=2),
        "scale_d": rng.uniform(0.92, 1.08),
        "shift": rng.uniform(-10, 10, size=2),
        "shift_d": rng.uniform(-15, 15),
        "elastic": SmoothField.random(rng, dims=3, amplitude_mm=6.0, wavelength_mm=(90.0, 220.0)),
        "organ_scale": {lab: rng.uniform(0.85, 1.15, size=3) for lab in ORGANS},
        "organ_shift": {lab: rng.normal(0, 4, size=3) for lab in ORGANS},
        "body": rng.uniform([140, 98], [165, 118]),
        "missing": int(rng.choice(RESECTABLE)) if rng.random() < P_MISSING else None,
        "noise_hu": rng.uniform(8, 20),
    }


def slice_depth(k: int, depth: int = DEPTH) -> float:
    """Depth (mm below the diaphragm) of axial index k; k grows towards the head, as NIfTI's S axis does."""
    step = (BOTTOM_MM - TOP_MM) / depth
    return TOP_MM + (depth - 1 - k) * step


def render_slice(p: dict, seed: int, subject: int, k: int, size: int, depth: int = DEPTH) -> tuple[np.ndarray, np.ndarray]:  # noqa: E501
    """One axial slice: (HU int16 (size, size), label uint8 (size, size))."""
    spacing = FOV_MM / size
    world_xy = pixel_grid(size, size, (spacing, spacing))
    d = slice_depth(k, depth)
    world = np.concatenate([world_xy, np.full(world_xy.shape[:2] + (1,), d)], axis=-1)
    # world -> anatomical coordinates: undo shift, rotation and scale, then the elastic field
    xy = (world[..., :2] - p["shift"]) @ rotation_2d(p["theta"]) / p["scale"]
    dd = (world[..., 2:] - p["shift_d"]) / p["scale_d"]
    anat = np.concatenate([xy, dd], axis=-1)
    anat = anat - p["elastic"](anat)

    rng = subject_rng(seed, NAME, subject, k)
    hu = np.full((size, size), -1000.0)
    label = np.zeros((size, size), np.uint8)
    body = p["body"]
    hu[inside_ellipsoid(anat[..., :2], (0, 0), body)] = -100  # subcutaneous fat
    hu[inside_ellipsoid(anat[..., :2], (0, 2), body * 0.86)] = -45  # visceral fat and bowel
    for sx in (-45, 45):  # paraspinal muscles: soft tissue HU, unlabelled
        hu[inside_ellipsoid(anat[..., :2], (sx, 82), (24, 19))] = 50

    def paint(mask: np.ndarray, lab: int, value: float) -> None:
        hu[mask] = value
        if lab:
            label[mask] = lab

    for lab, (parts, value) in ORGANS.items():
        if lab == p["missing"]:
            continue
        mask = np.zeros((size, size), bool)
        for centre, semi, angle in parts:
            c = np.asarray(centre, float) + p["organ_shift"][lab]
            mask |= inside_ellipsoid(anat, c, np.asarray(semi, float) * p["organ_scale"][lab], np.deg2rad(angle))
        paint(mask, lab, value)
    for lab, (centre, semi, (d0, d1), value) in TUBES.items():
        if d0 <= anat[..., 2].mean() <= d1:
            paint(inside_ellipsoid(anat[..., :2], centre, semi), lab, value)
    v = VERTEBRA
    bone = inside_ellipsoid(anat[..., :2], *v["body"]) | inside_ellipsoid(anat[..., :2], *v["process"])
    in_disc = np.abs(np.mod(anat[..., 2], v["period_mm"]) - v["period_mm"] / 2) > (v["period_mm"] - v["disc_mm"]) / 2
    paint(bone & ~in_disc, 10, v["hu"])
    paint(bone & in_disc, 0, v["disc_hu"])

    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2.0) * 25
    hu = hu + texture + rng.normal(0, p["noise_hu"], (size, size))
    hu = ndimage.gaussian_filter(hu, 0.6)  # scanner point-spread
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def axial_range(depth: int = DEPTH) -> tuple[int, int]:
    """Slice indices that cross the abdomen (kidneys to liver dome): where 2D samples are taken."""
    ks = [k for k in range(depth) if 0 <= slice_depth(k, depth) <= 270]
    return min(ks), max(ks)


def generate_2d(seed: int, subject: int, size: int = 256, slices: int = 4, depth: int = DEPTH) -> list[PhantomSample]:
    """``slices`` axial slices of one subject, one drawn from each equal stratum of the abdomen."""
    p = draw_subject(seed, subject)
    lo, hi = axial_range(depth)
    edges = np.linspace(lo, hi + 1, slices + 1)
    rng = subject_rng(seed, NAME + "/slice-choice", subject)
    ks = sorted({int(rng.integers(int(a), max(int(a) + 1, int(b)))) for a, b in zip(edges[:-1], edges[1:])})
    out = []
    for k in ks:
        hu, label = render_slice(p, seed, subject, k, size, depth)
        out.append(PhantomSample(hu, label, dict(LABELS), (FOV_MM / size,) * 2, MODALITY, subject_id(subject),
                                 slice=k, meta={"missing": LABELS.get(p["missing"])}))
    return out


def generate_3d(seed: int, subject: int, size: int = 128, depth: int = DEPTH) -> PhantomSample:
    """The whole volume, array axes (x, y, z) = (patient left, posterior, superior): NIfTI's LPS storage."""
    p = draw_subject(seed, subject)
    hu = np.empty((size, size, depth), np.int16)
    label = np.empty((size, size, depth), np.uint8)
    for k in range(depth):
        s_hu, s_lab = render_slice(p, seed, subject, k, size, depth)
        hu[:, :, k], label[:, :, k] = s_hu.T, s_lab.T
    spacing = (FOV_MM / size, FOV_MM / size, (BOTTOM_MM - TOP_MM) / depth)
    return PhantomSample(hu, label, dict(LABELS), spacing, MODALITY, subject_id(subject),
                         meta={"missing": LABELS.get(p["missing"])})
