"""The manifest: one JSON object per 2D sample, one per line, paths relative to the manifest's folder.

Every later layer (retrieval, training, eval, serve) reads datasets only through this module.

    {"id": "ct-abdomen-s0003-z041", "image": "images/ct-abdomen-s0003-z041.png",
     "label": "labels/ct-abdomen-s0003-z041.png", "labels": {"1": "liver", "2": "spleen"},
     "modality": "CT", "split": "train", "spacing": [1.25, 1.25], "source": "phantom:ct-abdomen",
     "subject": "s0003", "slice": 41}

- ``image``: PNG. For ``modality == "CT"`` a 16-bit PNG holding HU + 1024 (so any HU window can be applied
  later); for other modalities an 8-bit grayscale PNG.
- ``label``: PNG integer label map; 0 is background; every other value must be a key of ``labels``.
- ``spacing``: [x, y] millimetres per pixel (column, row). ``slice``: index in the source volume or null.
- ``subject``: the patient/phantom a sample comes from, so splits and held-out sets never share a subject.

Use: ``manifest = read_manifest("data/ct/manifest.jsonl"); image, label = manifest.load(manifest.rows[0])``.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rau_ray.atomic import atomic_write_text
from rau_ray.data import formats
from rau_ray.errors import DataError

SPLITS = ("train", "val", "test")
REQUIRED_FIELDS = ("id", "image", "label", "labels", "modality", "split", "spacing", "source")


@dataclass(frozen=True)
class ManifestRow:
    id: str
    image: str  # path relative to the manifest folder
    label: str  # path relative to the manifest folder
    labels: dict[str, str]  # label value (as a string, JSON keys are strings) -> structure name
    modality: str  # DICOM-style code: CT, MR, XA (angiography), US, DX (radiograph)
    split: str  # train | val | test
    spacing: tuple[float, float]  # mm per pixel, (x, y)
    source: str  # where it came from: "phantom:ct-abdomen", or the dataset name of an import
    subject: str = ""  # patient / phantom id; splits are made per subject
    slice: int | None = None  # axial index in the source volume, None for native 2D images

    def to_json(self) -> str:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        return json.dumps(d, sort_keys=False, separators=(", ", ": "))

    @property
    def label_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.labels.items()}


def row_from_dict(d: object, where: str) -> ManifestRow:
    """Validate one decoded JSON object; ``where`` (e.g. "manifest.jsonl:12") prefixes every error."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in d]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - set(ManifestRow.__dataclass_fields__))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for key in ("id", "image", "label", "modality", "source"):
        if not isinstance(d[key], str) or not d[key]:
            raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if d["split"] not in SPLITS:
        raise DataError(f"{where}: field 'split' is {d['split']!r}; expected one of {', '.join(SPLITS)}")
    labels = d["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: field 'labels' must be a non-empty object like {{\"1\": \"liver\"}}")
    for k, v in labels.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) > 0):
            raise DataError(f"{where}: label key {k!r} must be a positive integer written as a string")
        if not isinstance(v, str) or not v:
            raise DataError(f"{where}: label {k} must have a non-empty name")
    spacing = d["spacing"]
    if not (isinstance(spacing, list) and len(spacing) == 2
            and all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in spacing)):
        raise DataError(f"{where}: field 'spacing' must be [sx, sy] with two positive numbers, got {spacing!r}")
    sl = d.get("slice")
    if sl is not None and not (isinstance(sl, int) and sl >= 0):
        raise DataError(f"{where}: field 'slice' must be a non-negative integer or null, got {sl!r}")
    subject = d.get("subject", "")
    if not isinstance(subject, str):
        raise DataError(f"{where}: field 'subject' must be a string")
    for key in ("image", "label"):
        check_relative_path(d[key], f"{where}: field '{key}'")
    return ManifestRow(id=d["id"], image=d["image"], label=d["label"], labels=dict(labels),
                       modality=d["modality"], split=d["split"], spacing=(float(spacing[0]), float(spacing[1])),
                       source=d["source"], subject=subject, slice=sl)


def assign_splits(subjects: list[str], seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, str]:
    """Split subjects (never samples) into train / val / test: a seeded shuffle, then the first 80% train, 10% val,
    the rest test; with three or more subjects, val and test get at least one each. Deterministic in its inputs."""
    order = sorted(subjects, key=lambda s: (zlib.crc32(f"{seed}/{s}".encode()), s))
    n = len(order)
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    if n >= 3:
        n_val = max(1, n_val)
        n_train = min(n_train, n - n_val - 1)
    return {s: ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, s in enumerate(order)}


def check_relative_path(rel: str, what: str) -> None:
    """A manifest path must be relative and stay inside the dataset folder (no '..', no absolute path)."""
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{what}: path {rel!r} is absolute; manifest paths must be relative to the manifest")
    if ".." in p.parts:
        raise DataError(f"{what}: path {rel!r} escapes the dataset root")


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """Join ``rel`` to ``root`` and refuse the result if it (or a symlink on the way) leaves ``root``."""
    check_relative_path(rel, what)
    real_root = root.resolve()
    target = (root / rel).resolve()
    if target != real_root and real_root not in target.parents:
        raise DataError(f"{what}: path {rel!r} resolves outside the dataset root {root}")
    return target


@dataclass
class Manifest:
    path: Path
    rows: list[ManifestRow] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, row: ManifestRow) -> Path:
        return resolve_inside(self.root, row.image, f"{self.path} [{row.id}] image")

    def label_path(self, row: ManifestRow) -> Path:
        return resolve_inside(self.root, row.label, f"{self.path} [{row.id}] label")

    def load(self, row: ManifestRow) -> tuple[np.ndarray, np.ndarray]:
        """Read one sample: (image, label map). CT images come back in HU (float32), others as stored."""
        image = load_image(self.image_path(row), row.modality)
        label = formats.read_png_label(self.label_path(row))
        check_label_map(label, row.label_names, f"{self.label_path(row)}")
        if image.shape[:2] != label.shape:
            raise DataError(f"{self.image_path(row)}: image shape {image.shape} does not match label map "
                            f"{label.shape} ({self.label_path(row)})")
        return image, label

    def select(self, split: str | None = None, modality: str | None = None) -> list[ManifestRow]:
        return [r for r in self.rows if (split is None or r.split == split)
                and (modality is None or r.modality == modality)]


class Manifests:
    """Manifests read once per process and their rows by id, for code that meets samples by (manifest, row id):
    ``Manifests().sample(path, row_id)`` -> (row, image as stored (CT in HU), label map)."""

    def __init__(self):
        self._read: dict[str, tuple[Manifest, dict[str, ManifestRow]]] = {}

    def row(self, path: str | os.PathLike, row_id: str) -> ManifestRow:
        path = str(path)
        if path not in self._read:
            m = read_manifest(path)
            self._read[path] = (m, {r.id: r for r in m.rows})
        rows = self._read[path][1]
        if row_id not in rows:
            raise DataError(f"{path}: no row {row_id!r}")
        return rows[row_id]

    def sample(self, path: str | os.PathLike, row_id: str) -> tuple[ManifestRow, np.ndarray, np.ndarray]:
        row = self.row(path, row_id)
        return (row, *self._read[str(path)][0].load(row))


def load_image(path: Path, modality: str) -> np.ndarray:
    if path.suffix.lower() != ".png":
        raise DataError(f"{path}: unsupported image format '{path.suffix}' in a manifest; manifest images are PNG "
                        f"(convert volumes and DICOM with `rau data import`)")
    arr = formats.read_png_image(path)
    if modality == "CT":
        if arr.dtype != np.uint16:
            raise DataError(f"{path}: CT images must be 16-bit PNGs holding HU + {formats.CT_PNG_OFFSET}, "
                            f"got {arr.dtype}")
        return formats.png16_to_hu(arr)
    return arr


def check_label_map(label: np.ndarray, names: dict[int, str], where: str) -> None:
    present = np.unique(label)
    unknown = sorted(int(v) for v in present if v != 0 and int(v) not in names)
    if unknown:
        raise DataError(f"{where}: label map has value(s) {unknown} that are not in the label names "
                        f"{dict(sorted(names.items()))}")


def read_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            row = row_from_dict(d, where)
            if row.id in seen:
                raise DataError(f"{where}: duplicate id {row.id!r}")
            seen.add(row.id)
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: manifest has no samples")
    return Manifest(path=path, rows=rows)


def write_manifest(path: str | os.PathLike, rows: list[ManifestRow]) -> Path:
    """Write rows (sorted by id, so the file is deterministic) atomically."""
    path = Path(path)
    text = "".join(r.to_json() + "\n" for r in sorted(rows, key=lambda r: r.id))
    atomic_write_text(path, text)
    return path
