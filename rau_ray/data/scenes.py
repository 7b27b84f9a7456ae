"""Generic procedural scenes for pretraining the tiny backbones: shapes, textures and noise, not anatomy.

A scene is a list of shapes (kind, tone, centre, size, angle) painted in order on a textured background, so later
shapes may hide parts of earlier ones; the label map holds each shape's visible pixels (1..n) and every shape
knows its visible box. ``render(spec, affine)`` paints the same shapes moved by an affine map, which gives pairs
of related images (SAM2's memory clips, the VLM's "where does this box of image 1 fall in image 2"). Same
(seed, index) -> the same scene on every worker.
Use: ``scene = make_scene(seed=0, index=3, size=128)``; ``moved = render(scene.spec, size=128, affine=random_affine(rng))``.
"""  # noqa: E501

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

KINDS = ("circle", "ellipse", "square", "rectangle", "triangle", "diamond", "ring", "blob")
TONES = {"dark": (40, 80), "grey": (110, 150), "bright": (190, 240)}  # mean grey value ranges, far apart
MIN_VISIBLE = 40  # a shape shown with fewer visible pixels (at size 128) is dropped from the scene


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    tone: str
    grey: float  # mean grey value
    centre: tuple[float, float]  # (x, y) in [0, 1] of the image side
    radius: tuple[float, float]  # semi-axes in [0, 1] of the image side
    angle: float  # radians
    texture: float  # amplitude of the shape's own texture (grey levels)
    seed: int  # texture and blob outline


@dataclass
class Shape:
    """A shape as drawn: what the VLM names and grounds, what SAM2 segments."""

    kind: str
    tone: str
    label: int  # its value in the label map
    box: tuple[int, int, int, int]  # visible pixels' (x0, y0, x1, y1), x1/y1 inclusive
    area: int  # visible pixels

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def name(self) -> str:
        return f"{self.tone} {self.kind}"


@dataclass
class Scene:
    image: np.ndarray  # (size, size) uint8
    label: np.ndarray  # (size, size) uint8: 0 background, i for shapes[i - 1]
    shapes: list[Shape]
    spec: dict = field(default_factory=dict)  # what ``render`` needs to paint the scene again (moved)


def scene_rng(seed: int, index: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(b"scene"), index, *extra])


def random_spec(rng: np.random.Generator, n_shapes: tuple[int, int] = (1, 5)) -> dict:
    """Shapes, background and noise of one scene, as plain numbers (no pixels)."""
    shapes = []
    for _ in range(int(rng.integers(n_shapes[0], n_shapes[1] + 1))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        tone = list(TONES)[int(rng.integers(len(TONES)))]
        r = rng.uniform(0.06, 0.22)
        aspect = 1.0 if kind in ("circle", "square", "ring") else rng.uniform(0.45, 0.8)
        shapes.append(ShapeSpec(kind=kind, tone=tone, grey=float(rng.uniform(*TONES[tone])),
                                centre=(float(rng.uniform(0.18, 0.82)), float(rng.uniform(0.18, 0.82))),
                                radius=(float(r), float(r * aspect)), angle=float(rng.uniform(0, np.pi)),
                                texture=float(rng.uniform(0, 18)), seed=int(rng.integers(2**31))))
    return {"shapes": shapes, "background": float(rng.uniform(70, 170)), "gradient": rng.uniform(-40, 40, 2).tolist(),
            "bg_texture": float(rng.uniform(0, 25)), "noise": float(rng.uniform(2, 14)),
            "blur": float(rng.uniform(0, 1.2)), "seed": int(rng.integers(2**31))}


def random_affine(rng: np.random.Generator, shift: float = 0.12, scale: tuple[float, float] = (0.85, 1.15),
                  rotate: float = 0.25) -> np.ndarray:
    """A 2x3 map of normalised (x, y) about the image centre: moved = A @ [x - .5, y - .5] + .5 + t."""
    s, th = rng.uniform(*scale), rng.uniform(-rotate, rotate)
    c, si = np.cos(th) * s, np.sin(th) * s
    return np.array([[c, -si, rng.uniform(-shift, shift)], [si, c, rng.uniform(-shift, shift)]])


def _inside(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shape membership in its own frame, u and v in units of its semi-axes."""
    if kind in ("circle", "ellipse"):
        return u * u + v * v <= 1
    if kind in ("square", "rectangle"):
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if kind == "triangle":
        return (v >= -0.9) & (v <= 0.9) & (np.abs(u) <= (v + 0.9) / 1.8)  # apex up, base down
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if kind == "ring":
        rr = u * u + v * v
        return (rr <= 1) & (rr >= 0.36)
    # blob: a circle whose radius wobbles with the angle
    ang = np.arctan2(v, u)
    wobble = 1 + sum(a * np.cos(k * ang + p) for k, a, p in
                     zip((2, 3, 5), rng.uniform(0.05, 0.2, 3), rng.uniform(0, 2 * np.pi, 3)))
    return np.sqrt(u * u + v * v) <= 0.85 * wobble


def _texture(rng: np.random.Generator, size: int, amplitude: float, sigma: float) -> np.ndarray:
    if amplitude <= 0:
        return np.zeros((size, size), np.float32)
    t = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma)
    return (amplitude * t / (t.std() + 1e-6)).astype(np.float32)


def render(spec: dict, size: int = 128, affine: np.ndarray | None = None) -> Scene:
    """Paint ``spec`` at ``size`` px, moved by ``affine`` (2x3 on normalised coordinates) when given."""
    a = np.eye(2, 3) if affine is None else np.asarray(affine, float)
    rng = np.random.default_rng(spec["seed"])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    xn, yn = (xs + 0.5) / size, (ys + 0.5) / size
    gx, gy = spec["gradient"]
    image = spec["background"] + gx * (xn - 0.5) + gy * (yn - 0.5) + _texture(rng, size, spec["bg_texture"], size / 24)
    label = np.zeros((size, size), np.uint8)
    inv = np.linalg.inv(a[:, :2])
    for i, s in enumerate(spec["shapes"], start=1):
        srng = np.random.default_rng(s.seed)
        # pixel -> the unmoved scene's normalised coordinates -> the shape's frame
        q = inv @ np.stack([xn.ravel() - 0.5 - a[0, 2], yn.ravel() - 0.5 - a[1, 2]])
        dx, dy = q[0] + 0.5 - s.centre[0], q[1] + 0.5 - s.centre[1]
        c, si = np.cos(s.angle), np.sin(s.angle)
        u = ((c * dx + si * dy) / s.radius[0]).reshape(size, size)
        v = ((-si * dx + c * dy) / s.radius[1]).reshape(size, size)
        inside = _inside(s.kind, u, v, srng)
        image = np.where(inside, s.grey + _texture(srng, size, s.texture, max(1.0, size / 64)), image)
        label[inside] = i
    if spec["blur"] > 0:
        image = ndimage.gaussian_filter(image, spec["blur"] * size / 128)
    image = image + rng.normal(0, spec["noise"], image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    shapes, out = [], np.zeros_like(label)
    min_area = MIN_VISIBLE * (size / 128) ** 2
    for i, s in enumerate(spec["shapes"], start=1):
        m = label == i
        if m.sum() < min_area:
            continue
        rows, cols = np.nonzero(m)
        out[m] = len(shapes) + 1
        shapes.append(Shape(kind=s.kind, tone=s.tone, label=len(shapes) + 1,
                            box=(int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())), area=int(m.sum())))  # noqa: E501
    return Scene(image=image, label=out, shapes=shapes, spec=spec)


def make_scene(seed: int, index: int, size: int = 128, n_shapes: tuple[int, int] = (1, 5)) -> Scene:
    """Scene ``index`` of the stream ``seed``; at least one shape survives occlusion."""
    attempt = 0
    while True:
        scene = render(random_spec(scene_rng(seed, index, attempt), n_shapes), size)
        if scene.shapes:
            return scene
        attempt += 1
