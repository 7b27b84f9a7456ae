"""rau_ray.data.dicom_import on real DICOM files: CT series (copies of pydicom's CT_small along the normal) with
DICOM-SEGs written by highdicom, imported as 2D samples whose label PNGs equal the SEG's masks slice by slice."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_files import save, slices, write_seg
from PIL import Image

from rau_ray.data.dicom_import import DicomImportConfig, import_dicom_folder, read_seg_labels, scan_folder
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import DataError


def study(root, patient: str, positions, boxes: dict[str, tuple[slice, slice, slice]]):
    """A series of ``patient`` under ``root/patient`` and its SEG; returns (datasets ordered along the normal, masks
    (slices, rows, columns) per structure in that order)."""
    datasets = slices(positions)
    for ds in datasets:
        ds.PatientID, ds.SeriesNumber = patient, 3
    folder = save(root / patient / "ct", datasets)
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    masks = {}
    for name, box in boxes.items():
        m = np.zeros((len(ordered), 128, 128), bool)
        m[box] = True
        masks[name] = m
    sources = [pydicom.dcmread(folder / ds.filename) for ds in ordered]
    write_seg(root / patient / "seg.dcm", sources, masks)
    return ordered, masks


def test_folder_of_studies_imports_as_slices_whose_labels_equal_the_seg(tmp_path):
    root = tmp_path / "pacs_export"
    ordered, masks = study(root, "P1", [5.0, 0.0, 2.5, 7.5],
                           {"liver": np.s_[1:3, 20:60, 10:50], "spleen": np.s_[2:4, 70:90, 80:120]})
    study(root, "P2", [0.0, 2.5], {"liver": np.s_[0:2, 30:70, 30:70]})
    save(root / "P3" / "ct", slices([0.0, 2.5]))  # no SEG: skipped, counted
    (root / "README.txt").write_text("not DICOM")

    out = tmp_path / "ct2d"
    summary = import_dicom_folder(DicomImportConfig(folder=str(root), out=str(out)), backend="local", progress=False)
    assert summary["cases"] == 2 and summary["series_without_seg"] == 1 and summary["modality"] == ["CT"]
    manifest = read_manifest(out)
    rows = {r.id: r for r in manifest.rows}
    assert sorted(rows) == ["P1-3-z001", "P1-3-z002", "P1-3-z003", "P2-3-z000", "P2-3-z001"]  # labelled slices
    assert {r.split for r in rows.values() if r.subject == "P1"} | {r.split for r in rows.values() if
                                                                   r.subject == "P2"} <= {"train", "val", "test"}
    assert len({r.split for r in rows.values() if r.subject == "P1"}) == 1  # one subject, one split
    for k in (1, 2, 3):
        row = rows[f"P1-3-z{k:03d}"]
        assert row.labels == {"1": "liver", "2": "spleen"} and row.slice == k and row.modality == "CT"
        assert row.spacing == pytest.approx((0.661468, 0.661468))
        label = np.asarray(Image.open(out / row.label))
        expected = np.where(masks["spleen"][k], 2, np.where(masks["liver"][k], 1, 0))
        np.testing.assert_array_equal(label, expected)
        image = np.asarray(Image.open(out / row.image)).astype(np.int32) - 1024  # CT PNG: HU + 1024
        src = ordered[k]
        np.testing.assert_array_equal(image, src.pixel_array.astype(np.int32) + int(src.RescaleIntercept))


def test_seg_that_references_a_missing_series_or_other_instances_is_refused(tmp_path):
    root = tmp_path / "export"
    ordered, _ = study(root, "P1", [0.0, 2.5], {"liver": np.s_[0:1, 0:10, 0:10]})
    other = slices([0.0, 2.5])  # a series that is not in the folder
    write_seg(root / "P1" / "stray.dcm", other, {"liver": np.ones((2, 128, 128), bool)})
    with pytest.raises(DataError, match=r"stray.dcm: the DICOM-SEG references series .*, which is not in"):
        scan_folder(root)
    with pytest.raises(DataError, match="references 2 instance"):
        read_seg_labels(root / "P1" / "stray.dcm", tuple(ds.SOPInstanceUID for ds in ordered))
    empty = tmp_path / "empty"
    save(empty / "ct", slices([0.0]))
    with pytest.raises(DataError, match="no DICOM-SEG found: 1 series, none annotated"):
        scan_folder(empty)
    with pytest.raises(DataError, match="DICOM folder not found"):
        scan_folder(tmp_path / "nowhere")
