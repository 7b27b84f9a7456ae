"""X-ray coronary angiography phantom (ARCADE-like): a 2D projection of a branching vessel tree, 12 segments.

The left coronary tree is a template of named segments (each a curved, tapering tube that starts at its parent's
end or part-way along it); each subject perturbs angles, lengths and curvature and applies a global rotation,
scale and shift. Vessels are thin, elongated and dark on a bright, textured background, as contrast-filled
arteries are. Use: ``[sample] = generate_2d(seed=0, subject=3, size=256)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from rau_ray.data.phantoms.common import PhantomSample, subject_id, subject_rng, to_uint8

NAME = "xray-angio"
MODALITY = "XA"
OUT_OF_DISTRIBUTION = False
SUPPORTS_3D = False
LABELS = {1: "left main", 2: "LAD proximal", 3: "LAD mid", 4: "LAD distal", 5: "first diagonal",
          6: "second diagonal", 7: "first septal", 8: "LCx proximal", 9: "LCx distal",
          10: "first obtuse marginal", 11: "second obtuse marginal", 12: "posterolateral branch"}
# label: (parent label or 0, where on the parent it starts (0..1), angle relative to the parent's end direction
# in degrees, length as a fraction of the image side, width in px at 256 px, curvature in degrees per step)
TREE = {
    1: (0, 1.0, 0, 0.10, 7.0, 0.0),
    2: (1, 1.0, -25, 0.16, 6.0, 1.0),
    3: (2, 1.0, 0, 0.18, 5.0, 1.0),
    4: (3, 1.0, 5, 0.18, 3.5, 1.5),
    5: (2, 0.9, -40, 0.20, 3.5, 1.0),
    6: (3, 0.8, -40, 0.18, 3.0, 1.0),
    7: (2, 0.6, 55, 0.11, 2.5, 0.0),
    8: (1, 1.0, 55, 0.14, 5.5, -1.0),
    9: (8, 1.0, 5, 0.16, 4.0, -1.5),
    10: (8, 0.9, -45, 0.18, 3.5, 1.0),
    11: (9, 0.7, -45, 0.16, 3.0, 1.0),
    12: (9, 1.0, 10, 0.12, 2.5, -1.0),
}
STEPS = 12  # polyline points per segment


def _grow_tree(rng: np.random.Generator, size: int) -> dict[int, np.ndarray]:
    """Polylines (STEPS+1, 2) in pixel (x, y) coordinates for every segment."""
    start = np.array([0.50, 0.12]) * size + rng.normal(0, 0.03 * size, 2)
    heading0 = np.deg2rad(rng.uniform(80, 100))  # left main points down (angles grow clockwise: image y is down)
    scale = rng.uniform(0.85, 1.15)
    lines: dict[int, np.ndarray] = {}
    for lab, (parent, at, angle, length, _w, curve) in TREE.items():
        if parent == 0:
            origin, heading = start, heading0
        else:
            pl = lines[parent]
            idx = int(round(at * STEPS))
            origin = pl[idx]
            seg = pl[min(idx, STEPS)] - pl[max(idx - 1, 0)]
            heading = np.arctan2(seg[1], seg[0])
        heading += np.deg2rad(angle + rng.normal(0, 8))
        step = length * size * scale * rng.uniform(0.8, 1.2) / STEPS
        turn = np.deg2rad(curve + rng.normal(0, 1))
        pts = [origin]
        for _ in range(STEPS):
            heading += turn + rng.normal(0, 0.04)
            pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        lines[lab] = np.array(pts)
    return lines


def generate_2d(seed: int, subject: int, size: int = 256) -> list[PhantomSample]:
    rng = subject_rng(seed, NAME, subject)
    lines = _grow_tree(rng, size)
    label_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label_img)
    width_scale = size / 256 * rng.uniform(0.85, 1.15)
    for lab, (_p, _a, _ang, _len, width, _c) in TREE.items():
        pts = lines[lab]
        n = len(pts) - 1
        for i in range(n):  # taper: width shrinks by 30% along the segment
            w = max(1, int(round(width * width_scale * (1 - 0.3 * i / n))))
            draw.line([tuple(pts[i]), tuple(pts[i + 1])], fill=lab, width=w, joint="curve")
    label = np.asarray(label_img, np.uint8).copy()

    yy, xx = np.mgrid[0:size, 0:size] / size
    background = 170 + 30 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * xx + rng.uniform(0, 1))) * yy
    background += ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 24) * 120  # ribs, diaphragm
    vessels = ndimage.gaussian_filter((label > 0).astype(float), 0.8)
    image = background - rng.uniform(70, 110) * vessels + rng.normal(0, 6, (size, size))
    return [PhantomSample(to_uint8(image), label, dict(LABELS), (0.3 * 256 / size,) * 2, MODALITY,
                          subject_id(subject))]
