"""Import a folder of DICOM studies with their DICOM-SEG annotations as 2D samples (``rau data import --dicom``).

Every file under the folder is read once for its header: image series are grouped by SeriesInstanceUID, each DICOM-SEG
(Modality SEG) is paired with the series it references (Referenced Series Sequence); a case is one series with its
SEG, a subject one PatientID (splits are per subject, so a patient's series never straddle train and test). A case's
series becomes a volume through ``dicom_series`` (geometry order, modality LUT), its SEG a label map through
highdicom (frames matched to the series' instances by SOP Instance UID; segment number = label value, SegmentLabel
= structure name), and the slices where structures appear are written as the NIfTI importer writes them (CT in HU as
16-bit PNG, other modalities scaled to 8 bits). A series without a SEG is skipped and counted; a SEG that references
a series not in the folder, or instances not in its series, is refused naming both.
Use: ``rau data import --dicom /data/ct_studies --out data/ct2d``.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from rau_ray.data import formats
from rau_ray.data.dicom_series import read_dicom_series
from rau_ray.data.importers import normalise_modality, to_display
from rau_ray.data.manifest import ManifestRow, assign_splits, check_label_map, write_manifest
from rau_ray.data.writer import Encoded, write_all
from rau_ray.errors import DataError


@dataclass(frozen=True)
class DicomCase:
    id: str  # <PatientID>-<SeriesNumber or UID tail>, safe as a file name
    subject: str  # PatientID
    files: tuple[Path, ...]  # the series' image files
    seg: Path  # its DICOM-SEG
    split: str


@dataclass(frozen=True)
class DicomImportConfig:
    folder: str
    out: str
    min_pixels: int = 20  # keep a slice when at least this many pixels are labelled (any structure)
    every: int = 1  # keep every k-th of the kept slices


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def scan_folder(folder: str | Path) -> tuple[list[DicomCase], int]:
    """(cases, series without a SEG) of every DICOM file under ``folder``; files that are not DICOM are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"DICOM folder not found: {root}")
    series: dict[str, list[Path]] = defaultdict(list)
    patient: dict[str, str] = {}
    number: dict[str, str] = {}
    segs: list[tuple[Path, str]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM (a README, a DICOMDIR's sidecar): not part of any series
            continue
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            continue
        if ds.get("Modality") == "SEG":
            refs = ds.get("ReferencedSeriesSequence") or []
            if len(refs) != 1:
                raise DataError(f"{path}: a DICOM-SEG must reference exactly one series, this one references "
                                f"{len(refs)}")
            segs.append((path, str(refs[0].SeriesInstanceUID)))
            continue
        uid = str(ds.SeriesInstanceUID)
        series[uid].append(path)
        patient[uid] = str(ds.get("PatientID", "") or "anonymous")
        number[uid] = str(ds.get("SeriesNumber", "") or uid[-8:])
    if not series:
        raise DataError(f"{root}: no DICOM image series found")
    paired: dict[str, Path] = {}
    for path, uid in segs:
        if uid not in series:
            raise DataError(f"{path}: the DICOM-SEG references series {uid}, which is not in {root}")
        if uid in paired:
            raise DataError(f"series {uid} has two DICOM-SEGs: {paired[uid]} and {path}; keep one")
        paired[uid] = path
    if not paired:
        raise DataError(f"{root}: no DICOM-SEG found: {len(series)} series, none annotated")
    subjects = sorted({patient[uid] for uid in paired})
    splits = assign_splits(subjects)
    cases = [DicomCase(id=_safe(f"{patient[uid]}-{number[uid]}"), subject=patient[uid], files=tuple(series[uid]),
                       seg=seg, split=splits[patient[uid]]) for uid, seg in sorted(paired.items())]
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):  # two series of one patient share a SeriesNumber: fall back to UID tails
        cases = [DicomCase(id=_safe(f"{c.subject}-{str(uid)[-12:]}"), subject=c.subject, files=c.files, seg=c.seg,
                           split=c.split) for c, uid in zip(cases, sorted(paired))]
    return cases, len(series) - len(paired)


def read_seg_labels(seg_path: Path, instance_uids: tuple[str, ...]) -> tuple[np.ndarray, dict[int, str]]:
    """(label map (slices, rows, columns) uint8/uint16 in the series' order, {segment number: SegmentLabel})."""
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as e:
        raise DataError(f"{seg_path}: not a readable DICOM-SEG ({type(e).__name__}: {e})") from e
    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment {s.SegmentNumber}"))
             for s in seg.SegmentSequence}
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    unknown = referenced - set(instance_uids)
    if unknown:
        raise DataError(f"{seg_path}: references {len(unknown)} instance(s) that are not in its series "
                        f"(e.g. {sorted(unknown)[0]})")
    try:
        labels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(instance_uids), segment_numbers=sorted(names), combine_segments=True,
            skip_overlap_checks=True, dtype=np.uint16)
    except (ValueError, RuntimeError, KeyError) as e:
        raise DataError(f"{seg_path}: its frames do not map onto the series' slices ({e})") from e
    labels = np.asarray(labels)
    return labels.astype(np.uint8) if labels.max(initial=0) < 256 else labels, names


def convert_dicom_case(cfg: DicomImportConfig, source: str, case: DicomCase) -> Encoded:
    """Read one case's series and SEG and encode the kept slices (runs in a Ray task)."""
    series = read_dicom_series(case.files)
    label, names = read_seg_labels(case.seg, series.instance_uids)
    if label.shape != series.volume.shape:
        raise DataError(f"case {case.id}: the series is {series.volume.shape} but {case.seg} gives {label.shape}")
    check_label_map(label, names, str(case.seg))
    modality = normalise_modality(series.modality or "CT")
    display = to_display(series.volume, modality)
    counts = (label > 0).reshape(label.shape[0], -1).sum(1)
    kept = [k for k in range(label.shape[0]) if counts[k] >= cfg.min_pixels][:: max(1, cfg.every)]
    sx, sy, _ = series.spacing
    enc = Encoded()
    for k in kept:
        sid = f"{case.id}-z{k:03d}"
        img_rel, lab_rel = f"images/{sid}.png", f"labels/{sid}.png"
        enc.files += [(img_rel, formats.encode_png(display[k])), (lab_rel, formats.encode_png(label[k]))]
        enc.rows.append(ManifestRow(id=sid, image=img_rel, label=lab_rel, labels={str(v): n for v, n in names.items()},
                                    modality=modality, split=case.split, spacing=(sx, sy), source=source,
                                    subject=case.subject, slice=k))
    return enc


def import_dicom_folder(cfg: DicomImportConfig, backend: str = "ray", progress: bool = True) -> dict:
    cases, unannotated = scan_folder(cfg.folder)
    out, root = Path(cfg.out), Path(cfg.folder)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise DataError(f"--out {out} is inside the DICOM folder {root}; choose a folder outside it")
    t0 = time.perf_counter()
    source = root.resolve().name
    rows, n_files = write_all(partial(convert_dicom_case, cfg, source), cases, out, backend=backend, desc=source,
                              unit="series", progress=progress)
    if not rows:
        raise DataError(f"{root}: no slice has {cfg.min_pixels} or more labelled pixels")
    write_manifest(out / "manifest.jsonl", rows)
    return {"out": str(out), "dataset": source, "modality": sorted({r.modality for r in rows}), "cases": len(cases),
            "series_without_seg": unannotated, "samples": len(rows), "files": n_files,
            "seconds": round(time.perf_counter() - t0, 3)}
