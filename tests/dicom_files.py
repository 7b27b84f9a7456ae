"""DICOM test files made from pydicom's CT_small (a real CT slice): series placed along any slice normal, saved to a
folder, and DICOM-SEGs written by highdicom. Tests import it as ``dicom_files`` (tests/ is on sys.path)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

CT_SMALL = get_testdata_file("CT_small.dcm")
RAW = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.float64)


def slices(positions, *, orientation=(1, 0, 0, 0, 1, 0), series_uid=None, description="axial"):
    """Copies of CT_small at ``positions`` (offsets along the slice normal, mm); slice i has RescaleIntercept
    -1024 + 100 * i, so its pixels say which file it was."""
    series_uid = series_uid or generate_uid()
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    out = []
    for i, d in enumerate(positions):
        ds = pydicom.dcmread(CT_SMALL)
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in np.array([-158.1, -179.0, 0.0]) + d * normal]
        ds.RescaleIntercept = -1024 + 100 * i
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.SeriesDescription, ds.InstanceNumber = description, i + 1
        ds.filename = f"s{i}.dcm"
        out.append(ds)
    return out


def save(folder, datasets):
    folder.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        ds.save_as(folder / ds.filename)
    return folder


def write_seg(path, sources, masks: dict[str, np.ndarray]):
    """A binary DICOM-SEG of ``sources`` with one segment per name (numbered in order)."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name, segmented_property_category=codes.cid7150.AnatomicalStructure,
        segmented_property_type=codes.cid7150.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i, name in enumerate(masks, 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(list(masks.values()), axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(path)
