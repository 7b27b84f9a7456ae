"""DICOM series -> one 3D volume: files grouped by SeriesInstanceUID, ordered by geometry, modality LUT applied.

highdicom builds the volume (``get_volume_from_series``: slices sorted along the slice normal, regular spacing and one
orientation checked, the modality LUT applied, so CT comes out in HU); this module reads the files, groups them,
and turns what highdicom refuses (a missing slice, two slices at one position, mixed orientations or sizes) into a
``DataError`` that says which files and why. The volume's slices run along the normal (row x column direction
cosines), so an axial series goes feet -> head, as ``read_dicom_series`` always returned it.
Use: ``series = read_dicom_series("ct_folder/"); series.volume.shape, series.spacing, series.instance_uids``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from rau_ray.errors import DataError

PathLike = str | os.PathLike
POSITION_TOL_MM = 0.01  # two slices closer than this along the normal sit at one position


@dataclass(frozen=True)
class DicomSeries:
    """One series as a volume. ``volume``: (slices, rows, columns) float32 after the modality LUT (HU for CT);
    ``spacing``: (column, row, slice) mm, the (x, y, z) order of the project's readers; ``affine``: 4x4 from
    (slice, row, column) indices to patient coordinates (LPS, mm); ``sources``: the datasets in volume order (what a
    DICOM-SEG of this volume references), ``instance_uids`` their SOPInstanceUIDs."""

    volume: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    study_uid: str
    series_uid: str
    description: str
    sources: tuple[Dataset, ...]

    @property
    def instance_uids(self) -> tuple[str, ...]:
        return tuple(str(ds.SOPInstanceUID) for ds in self.sources)


def read_datasets(files: Iterable[tuple[str, bytes | PathLike]]) -> list[Dataset]:
    """(name, bytes or path) pairs -> datasets; a file that is not DICOM -> ``DataError`` naming it."""
    out = []
    for name, data in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)
            ds.pixel_array  # noqa: B018 (decodes now: a truncated file fails here, naming itself)
        except Exception as e:
            raise DataError(f"{name}: not a readable DICOM image ({type(e).__name__}: {e})") from e
        ds.filename = name
        out.append(ds)
    return out


def group_by_series(datasets: Sequence[Dataset]) -> dict[str, list[Dataset]]:
    """SeriesInstanceUID -> its datasets, in the order given; a dataset without the UID -> ``DataError``."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise DataError(f"{_name(ds)}: has no SeriesInstanceUID, so it belongs to no series")
        groups.setdefault(str(uid), []).append(ds)
    return groups


def series_volume(datasets: Sequence[Dataset], where: str = "series") -> DicomSeries:
    """The datasets of one series -> ``DicomSeries``. ``where`` names the source in errors."""
    if not datasets:
        raise DataError(f"{where}: holds no DICOM images")
    if len(group_by_series(datasets)) > 1:
        raise DataError(f"{where}: {_describe_series(datasets)}; upload one series at a time")
    _check_geometry(datasets, where)
    try:
        vol = hd.get_volume_from_series(list(datasets), dtype=np.float32)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DataError(f"{where}: cannot build a volume from this series ({e})") from e
    normal = np.cross(*_cosines(datasets[0]))
    if float(np.dot(vol.affine[:3, 0], normal)) < 0:  # highdicom may stack head -> feet; ours run along the normal
        vol = vol.flip_spatial(0)
    by_position = sorted(datasets, key=lambda ds: float(np.dot(_position(ds), normal)))
    sz, sy, sx = (float(v) for v in vol.spacing)
    ds0 = datasets[0]
    return DicomSeries(volume=np.ascontiguousarray(vol.array, dtype=np.float32), spacing=(sx, sy, sz),
                       affine=np.asarray(vol.affine, dtype=np.float64), modality=str(ds0.get("Modality", "")),
                       study_uid=str(ds0.get("StudyInstanceUID", "")), series_uid=str(ds0.SeriesInstanceUID),
                       description=str(ds0.get("SeriesDescription", "")), sources=tuple(by_position))


def read_dicom_series(source: PathLike | Sequence[PathLike]) -> DicomSeries:
    """A folder (every non-hidden file in it) or a list of files holding exactly one series -> ``DicomSeries``."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"DICOM series folder not found: {folder}")
        paths = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        where = str(folder)
    else:
        paths, where = [Path(p) for p in source], "DICOM files"
    if not paths:
        raise DataError(f"{where}: holds no DICOM files")
    for p in paths:
        if not p.is_file():
            raise DataError(f"DICOM file not found: {p}")
    return series_volume(read_datasets((str(p), p) for p in paths), where)


# ------------------------------------------------------------------------------------------------ what is refused
def _name(ds: Dataset) -> str:
    return Path(str(getattr(ds, "filename", "") or "a dataset")).name


def _describe_series(datasets: Sequence[Dataset]) -> str:
    groups = group_by_series(datasets)
    parts = []
    for uid, dss in groups.items():
        about = f", {str(dss[0].SeriesDescription)!r}" if dss[0].get("SeriesDescription") else ""
        parts.append(f"{uid} ({len(dss)} files{about})")
    return f"{len(groups)} series in one upload: " + ", ".join(parts)


def _cosines(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        raise DataError(f"{_name(ds)}: has no ImageOrientationPatient, so its slice cannot be placed in a volume")
    v = np.asarray([float(x) for x in iop])
    return v[:3], v[3:]


def _position(ds: Dataset) -> np.ndarray:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        raise DataError(f"{_name(ds)}: has no ImagePositionPatient, so its slice cannot be placed in a volume")
    return np.asarray([float(x) for x in ipp])


def _check_geometry(datasets: Sequence[Dataset], where: str) -> None:
    """One size and orientation, distinct positions, no gap: what a volume needs, each refusal naming files."""
    first = datasets[0]
    row0, col0 = _cosines(first)
    for ds in datasets[1:]:
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DataError(f"{where}: slices differ in size: {_name(first)} is {first.Rows}x{first.Columns}, "
                            f"{_name(ds)} is {ds.Rows}x{ds.Columns}")
        row, col = _cosines(ds)
        if not (np.allclose(row, row0, atol=1e-3) and np.allclose(col, col0, atol=1e-3)):
            raise DataError(f"{where}: slices differ in orientation: {_name(first)} and {_name(ds)} "
                            "(ImageOrientationPatient)")
    normal = np.cross(row0, col0)
    placed = sorted((float(np.dot(_position(ds), normal)), _name(ds)) for ds in datasets)
    if len(placed) < 2:
        return
    at = np.array([d for d, _ in placed])
    gaps = np.diff(at)
    same = np.flatnonzero(gaps < POSITION_TOL_MM)
    if same.size:
        i = int(same[0])
        raise DataError(f"{where}: two slices at one position ({at[i]:.2f} mm along the normal): {placed[i][1]} "
                        f"and {placed[i + 1][1]}")
    step = float(np.min(gaps))
    wide = np.flatnonzero(gaps > 1.5 * step)
    if wide.size:
        i = int(wide[0])
        missing = round(float(gaps[i]) / step) - 1
        raise DataError(f"{where}: a gap in the series: {missing} slice(s) missing between {placed[i][1]} "
                        f"({at[i]:.2f} mm) and {placed[i + 1][1]} ({at[i + 1]:.2f} mm); slices are {step:.2f} mm "
                        "apart elsewhere")
