"""Import a real 3D dataset (Medical Segmentation Decathlon or nnU-Net v2 ``dataset.json``) as 2D samples.

Volumes are reoriented to RAS+, cut into axial slices shown radiologically (rows anterior -> posterior, columns
patient-right -> patient-left), and slices where structures appear are written as PNG image + PNG label map with a
``manifest.jsonl``. CT stays in HU (16-bit PNG, HU + 1024); other modalities are scaled per volume to 8 bits.
Cases are split train/val/test per subject. Works unchanged on AMOS, RAOS, TotalSegmentator (nnU-Net exports).
Use: ``rau data import --dataset-json /data/Task03_Liver/dataset.json --out data/liver2d``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from rau_ray.data import formats
from rau_ray.data.manifest import ManifestRow, assign_splits, check_label_map, resolve_inside, write_manifest
from rau_ray.data.writer import Encoded, write_all
from rau_ray.errors import DataError

MR_NAMES = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "T1GD", "T1W", "T2W")


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    label: Path
    split: str


@dataclass(frozen=True)
class DatasetSpec:
    root: Path
    name: str
    modality: str  # CT, MR, ...
    labels: dict[int, str]  # value -> structure name, background excluded
    cases: list[Case]


@dataclass(frozen=True)
class ImportConfig:
    dataset_json: str
    out: str
    min_pixels: int = 20  # keep a slice when at least this many pixels are labelled (any structure)
    every: int = 1  # keep every k-th of the kept slices (neighbouring slices are near-duplicates)


def normalise_modality(name: str) -> str:
    up = str(name).strip().upper()
    return "MR" if up in MR_NAMES or up.startswith("MR") else up


def read_dataset_json(path: str | Path) -> DatasetSpec:
    """Parse MSD (``labels`` {"1": name}, ``modality``, ``training`` list) or nnU-Net v2 (``labels`` {name: 1},
    ``channel_names``, ``file_ending``, files ``imagesTr/<case>_0000<ending>``) into one spec."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset.json not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "labels" not in d:
        raise DataError(f"{path}: not a dataset.json (no 'labels' field)")
    root = path.parent
    v2 = "channel_names" in d or "file_ending" in d
    channels = d.get("channel_names" if v2 else "modality") or {}
    if "0" not in channels:
        raise DataError(f"{path}: field '{'channel_names' if v2 else 'modality'}' must name channel \"0\"")
    labels: dict[int, str] = {}
    for k, v in d["labels"].items():
        value, name = (v, k) if v2 else (k, v)
        if isinstance(value, list):
            raise DataError(f"{path}: region-based label {name!r} (a list of values) is not supported")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}: label {name!r} has a non-integer value {value!r}") from None
        if value > 0:
            labels[value] = str(name)
    if not labels:
        raise DataError(f"{path}: 'labels' names no structure besides background")
    if v2:
        ending = d.get("file_ending", ".nii.gz")
        label_dir = root / "labelsTr"
        if not label_dir.is_dir():
            raise DataError(f"{path}: folder labelsTr/ not found next to it")
        pairs = []
        for lab in sorted(label_dir.glob(f"*{ending}")):
            case = lab.name[: -len(ending)]
            pairs.append((case, f"imagesTr/{case}_0000{ending}", f"labelsTr/{lab.name}"))
    else:
        training = d.get("training")
        if not isinstance(training, list) or not training:
            raise DataError(f"{path}: MSD dataset.json needs a non-empty 'training' list")
        pairs = []
        for i, t in enumerate(training):
            if not isinstance(t, dict) or "image" not in t or "label" not in t:
                raise DataError(f"{path}: training[{i}] needs 'image' and 'label'")
            case = Path(t["label"]).name.split(".")[0]
            pairs.append((case, t["image"], t["label"]))
    if not pairs:
        raise DataError(f"{path}: no training cases found")
    splits = assign_splits([c for c, _, _ in pairs])
    cases = [Case(c, resolve_inside(root, str(Path(img)), f"{path}: case {c} image"),
                  resolve_inside(root, str(Path(lab)), f"{path}: case {c} label"), splits[c]) for c, img, lab in pairs]
    for c in cases:
        for p in (c.image, c.label):
            if not p.is_file():
                raise DataError(f"{path}: case {c.id}: file not found: {p}")
    return DatasetSpec(root=root, name=str(d.get("name") or root.name), modality=normalise_modality(channels["0"]),
                       labels=labels, cases=cases)


def axial_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice k of a RAS+ volume as a radiological 2D image: rows anterior -> posterior, columns right -> left."""
    return volume[::-1, ::-1, k].T


def to_display(volume: np.ndarray, modality: str) -> np.ndarray:
    """CT -> uint16 HU + 1024; anything else -> uint8 scaled between the volume's 0.5 and 99.5 percentiles."""
    if modality == "CT":
        return formats.hu_to_png16(volume)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    return np.clip((volume - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)


def convert_case(spec: DatasetSpec, cfg: ImportConfig, case: Case) -> Encoded:
    """Read one case's image and label volumes and encode the kept axial slices (runs in a Ray task)."""
    image, spacing, _ = formats.read_nifti(case.image)
    label = formats.read_nifti_label(case.label)
    if image.ndim == 4:  # MSD multi-channel: keep channel 0, as channel_names / modality "0" describes
        image = image[..., 0]
    if image.shape != label.shape:
        raise DataError(f"case {case.id}: image {case.image} has shape {image.shape} but label {case.label} "
                        f"has {label.shape}")
    check_label_map(label, spec.labels, str(case.label))
    display = to_display(image, spec.modality)
    counts = (label > 0).reshape(-1, label.shape[2]).sum(0)
    kept = [k for k in range(label.shape[2]) if counts[k] >= cfg.min_pixels][:: max(1, cfg.every)]
    names = {str(k): v for k, v in spec.labels.items()}
    enc = Encoded()
    for k in kept:
        sid = f"{case.id}-z{k:03d}"
        img_rel, lab_rel = f"images/{sid}.png", f"labels/{sid}.png"
        enc.files += [(img_rel, formats.encode_png(axial_slice(display, k))),
                      (lab_rel, formats.encode_png(axial_slice(label, k).astype(np.uint8 if label.max() < 256
                                                                                   else np.uint16)))]
        enc.rows.append(ManifestRow(id=sid, image=img_rel, label=lab_rel, labels=names, modality=spec.modality,
                                    split=case.split, spacing=(float(spacing[0]), float(spacing[1])),
                                    source=spec.name, subject=case.id, slice=k))
    return enc


def import_dataset(cfg: ImportConfig, backend: str = "ray", progress: bool = True) -> dict:
    spec = read_dataset_json(cfg.dataset_json)
    out = Path(cfg.out)
    if out.resolve() == spec.root.resolve():
        raise DataError(f"--out {out} is the dataset folder itself; choose a new folder")
    t0 = time.perf_counter()
    rows, n_files = write_all(partial(convert_case, spec, cfg), spec.cases, out, backend=backend, desc=spec.name,
                              unit="case", progress=progress)
    if not rows:
        raise DataError(f"{cfg.dataset_json}: no slice has {cfg.min_pixels} or more labelled pixels")
    write_manifest(out / "manifest.jsonl", rows)
    seconds = time.perf_counter() - t0
    return {"out": str(out), "dataset": spec.name, "modality": spec.modality, "cases": len(spec.cases),
            "samples": len(rows), "files": n_files, "seconds": round(seconds, 3)}
