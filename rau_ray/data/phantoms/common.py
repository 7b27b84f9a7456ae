"""Shared pieces of the procedural phantoms: the sample record, seeded RNGs, smooth deformation, shapes.

Every phantom is an analytic function of position, evaluated on the pixel grid asked for, so a 2D slice and the
same slice of a 3D volume are identical. Use: ``rng = subject_rng(seed, "ct-abdomen", 3)``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PhantomSample:
    image: np.ndarray  # CT: int16 HU; other modalities: uint8 grey values. 2D (rows, cols) or 3D (x, y, z)
    label: np.ndarray  # uint8 label map, 0 = background, same shape as image
    labels: dict[int, str]  # every structure of the phantom (a missing organ keeps its name, has no pixels)
    spacing: tuple[float, ...]  # mm per pixel: (x=col, y=row) in 2D, (x, y, z) in 3D
    modality: str  # CT | XA | US | DX
    subject: str  # e.g. "s0007"
    slice: int | None = None  # axial index in the subject's volume (ct-abdomen), None for native 2D images
    meta: dict = field(default_factory=dict)  # e.g. {"missing": "spleen"}


def subject_rng(seed: int, phantom: str, subject: int, *extra: int) -> np.random.Generator:
    """An RNG that depends only on (seed, phantom, subject, extra...): reproducible whatever the worker."""
    return np.random.default_rng([seed, zlib.crc32(phantom.encode()), subject, *extra])


def subject_id(index: int) -> str:
    return f"s{index:04d}"


def rotation_2d(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


@dataclass
class SmoothField:
    """A smooth random displacement field: a sum of a few random plane waves per output component.

    Evaluated analytically at any points, so a slice of it equals the same slice of the 3D field.
    """

    freqs: np.ndarray  # (components, waves, dims) cycles per mm
    phases: np.ndarray  # (components, waves)
    amps: np.ndarray  # (components, waves) mm

    @classmethod
    def random(cls, rng: np.random.Generator, dims: int, amplitude_mm: float, wavelength_mm: tuple[float, float],
               waves: int = 3) -> SmoothField:
        direction = rng.normal(size=(dims, waves, dims))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=(dims, waves, 1))
        return cls(freqs=direction / wavelength, phases=rng.uniform(0, 2 * np.pi, size=(dims, waves)),
                   amps=rng.uniform(0.5, 1.0, size=(dims, waves)) * amplitude_mm / np.sqrt(waves))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points (..., dims) in mm -> displacement (..., dims) in mm."""
        arg = 2 * np.pi * np.einsum("...d,cwd->...cw", points, self.freqs) + self.phases
        return np.einsum("...cw,cw->...c", np.sin(arg), self.amps)


def inside_ellipsoid(points: np.ndarray, center, semi_axes, theta: float = 0.0) -> np.ndarray:
    """Boolean mask of points (..., 2 or 3) inside an ellipse/ellipsoid rotated by theta in the first two axes."""
    q = points - np.asarray(center, dtype=points.dtype)
    if theta:
        c, s = np.cos(theta), np.sin(theta)
        q0 = c * q[..., 0] + s * q[..., 1]
        q1 = -s * q[..., 0] + c * q[..., 1]
        q = np.stack([q0, q1, *[q[..., i] for i in range(2, q.shape[-1])]], axis=-1)
    return (np.square(q / np.asarray(semi_axes, dtype=points.dtype))).sum(-1) <= 1.0


def pixel_grid(rows: int, cols: int, spacing: tuple[float, float]) -> np.ndarray:
    """(rows, cols, 2) array of (x, y) mm coordinates of pixel centres, origin at the image centre."""
    x = (np.arange(cols) - (cols - 1) / 2) * spacing[0]
    y = (np.arange(rows) - (rows - 1) / 2) * spacing[1]
    xx, yy = np.meshgrid(x, y)
    return np.stack([xx, yy], axis=-1)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
