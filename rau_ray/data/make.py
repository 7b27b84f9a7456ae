"""Write a phantom dataset to disk: 2D samples + manifest.jsonl, or 3D NIfTI volumes in the nnU-Net v2 layout.

Generation and encoding run as Ray tasks (a few subjects each, one CPU each) and come back as bytes, so this works
on any cluster without a shared filesystem; the driver writes each file atomically (temp + rename) and the manifest
last. Same seed -> byte-identical files. Use: ``rau data make --modality ct-abdomen --n 20 --seed 0 --out data/ct``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rau_ray.atomic import atomic_write_text
from rau_ray.data import formats
from rau_ray.data.manifest import ManifestRow, assign_splits, write_manifest
from rau_ray.data.phantoms import get_phantom
from rau_ray.data.phantoms.common import PhantomSample, subject_id
from rau_ray.data.writer import Encoded, write_all
from rau_ray.errors import DataError


@dataclass(frozen=True)
class MakeConfig:
    modality: str  # phantom name: ct-abdomen | xray-angio | ultrasound | xray-msk
    n: int  # number of subjects (ct-abdomen 2D writes `slices_per_subject` slices of each)
    out: str
    seed: int = 0
    dims: int = 2  # 2: PNG samples + manifest.jsonl; 3: NIfTI volumes + dataset.json (ct-abdomen only)
    size: int = 256  # image side in pixels (the tiny profile uses 112-256)
    slices_per_subject: int = 4  # ct-abdomen 2D: axial slices per subject, one per stratum of the abdomen
    subjects_per_task: int = 0  # Ray task size; 0 lets the writer choose (about 4 tasks per CPU)
    held_out: bool = False  # every subject in the test split: a held-out set, made with a seed no training used

    def validate(self) -> None:
        phantom = get_phantom(self.modality)
        if self.n < 1:
            raise DataError(f"--n must be at least 1, got {self.n}")
        if self.dims not in (2, 3):
            raise DataError(f"--dims must be 2 or 3, got {self.dims}")
        if self.dims == 3 and not phantom.SUPPORTS_3D:
            raise DataError(f"modality {self.modality!r} is 2D only; --dims 3 is available for ct-abdomen")
        if not 32 <= self.size <= 1024:
            raise DataError(f"--size must be between 32 and 1024 pixels, got {self.size}")


def _encode_2d(cfg: MakeConfig, s: PhantomSample, split: str) -> tuple[list[tuple[str, bytes]], ManifestRow]:
    sid = f"{cfg.modality}-{s.subject}" + (f"-z{s.slice:03d}" if s.slice is not None else "")
    image = formats.hu_to_png16(s.image) if s.modality == "CT" else s.image
    files = [(f"images/{sid}.png", formats.encode_png(image)), (f"labels/{sid}.png", formats.encode_png(s.label))]
    row = ManifestRow(id=sid, image=files[0][0], label=files[1][0], labels={str(k): v for k, v in s.labels.items()},
                      modality=s.modality, split=split, spacing=(float(s.spacing[0]), float(s.spacing[1])),
                      source=f"phantom:{cfg.modality}", subject=s.subject, slice=s.slice)
    return files, row


def case_id(modality: str, subject: str) -> str:
    return f"{modality.replace('-', '')}_{subject}"


def make_subject(cfg: MakeConfig, item: tuple[int, str]) -> Encoded:
    """Generate and encode one subject ``item = (index, split)``; runs inside a Ray task or in-process."""
    subject, split = item
    phantom = get_phantom(cfg.modality)
    if cfg.dims == 3:
        vol = phantom.generate_3d(cfg.seed, subject, size=cfg.size)
        case = case_id(cfg.modality, vol.subject)
        return Encoded(files=[(f"imagesTr/{case}_0000.nii.gz", formats.encode_nifti(vol.image, vol.spacing)),
                                  (f"labelsTr/{case}.nii.gz", formats.encode_nifti(vol.label, vol.spacing))], rows=[])
    kwargs = {"slices": cfg.slices_per_subject} if cfg.modality == "ct-abdomen" else {}
    made = Encoded()
    for s in phantom.generate_2d(cfg.seed, subject, size=cfg.size, **kwargs):
        files, row = _encode_2d(cfg, s, split)
        made.files += files
        made.rows.append(row)
    return made


def make_dataset(cfg: MakeConfig, backend: str = "ray", progress: bool = True) -> dict:
    """Generate ``cfg.n`` subjects and write them under ``cfg.out``; returns a summary dict."""
    cfg.validate()
    phantom = get_phantom(cfg.modality)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [subject_id(i) for i in range(cfg.n)]
    all_test = phantom.OUT_OF_DISTRIBUTION or cfg.held_out
    splits = {sid: "test" for sid in ids} if all_test else assign_splits(ids, cfg.seed)
    t0 = time.perf_counter()
    rows, n_files = write_all(partial(make_subject, cfg), [(i, splits[sid]) for i, sid in enumerate(ids)], out,
                              backend=backend, desc=cfg.modality, unit="subject", progress=progress,
                              items_per_task=cfg.subjects_per_task)
    if cfg.dims == 2:
        write_manifest(out / "manifest.jsonl", rows)
    else:
        write_dataset_json(out, phantom, cfg)
    n_samples = len(rows) if cfg.dims == 2 else cfg.n
    seconds = time.perf_counter() - t0
    return {"out": str(out), "modality": cfg.modality, "dims": cfg.dims, "subjects": cfg.n, "samples": n_samples,
            "files": n_files, "seconds": round(seconds, 3), "samples_per_second": round(n_samples / seconds, 2)}


def write_dataset_json(out: Path, phantom, cfg: MakeConfig) -> None:
    """nnU-Net v2 ``dataset.json``: channel names, label name -> value, case files ``imagesTr/<case>_0000``."""
    info = {
        "name": f"RAU phantom {cfg.modality} (seed {cfg.seed})",
        "channel_names": {"0": phantom.MODALITY},
        "labels": {"background": 0, **{name: lab for lab, name in phantom.LABELS.items()}},
        "numTraining": cfg.n,
        "file_ending": ".nii.gz",
    }
    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2) + "\n")
