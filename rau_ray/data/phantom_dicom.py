"""A CT abdomen phantom volume as a DICOM CT series: what the PACS tests and benchmark upload to a DICOMweb server.

``phantom_ct_series(subject, slices=16, size=128)`` renders axial slices of one ``ct-abdomen`` phantom subject
(``rau_ray.data.phantoms.ct_abdomen``; the slices centred on the spleen's level, so liver and spleen are in view)
and wraps each in a single-frame CT Image Storage dataset: patient / study / series / frame-of-reference UIDs
derived from (seed, subject) so the same call gives the same UIDs, LPS geometry (rows run anterior -> posterior,
columns patient right -> left, slices feet -> head, 360 mm field of view), HU stored as unsigned 16-bit with
RescaleIntercept -1024, and the label map returned beside it for checking. ``rau_ray.data.dicom_series`` reads such a
series back into the same volume.
Use: ``datasets, labels = phantom_ct_series(3, slices=16, size=128)``; ``ds.save_as(path)`` or ``dcmwrite`` each.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from rau_ray.data.phantoms import ct_abdomen

SPLEEN_DEPTH_MM = 66.0  # the spleen's centre below the diaphragm (ct_abdomen.ORGANS): the series' centre


def _uid(seed: int, subject: int, what: str) -> str:
    return generate_uid(entropy_srcs=["rau-ray phantom", str(seed), str(subject), what])


def phantom_ct_series(subject: int, slices: int = 16, size: int = 128, seed: int = 0,
                      depth: int = ct_abdomen.DEPTH) -> tuple[list[Dataset], np.ndarray]:
    """(datasets in slice order feet -> head, label map (slices, size, size) uint8 with ``ct_abdomen.LABELS``).
    ``slices`` consecutive axial slices of the ``depth``-slice grid, centred on the spleen's level."""
    if not 1 <= slices <= depth:
        raise ValueError(f"slices must be 1..{depth}, not {slices}")
    p = ct_abdomen.draw_subject(seed, subject)
    step = (ct_abdomen.BOTTOM_MM - ct_abdomen.TOP_MM) / depth
    centre = int(round(depth - 1 - (SPLEEN_DEPTH_MM - ct_abdomen.TOP_MM) / step))
    first = min(max(0, centre - slices // 2), depth - slices)
    spacing = ct_abdomen.FOV_MM / size
    origin = -(size - 1) / 2 * spacing
    study, series = _uid(seed, subject, "study"), _uid(seed, subject, f"series/{slices}/{size}/{depth}")
    frame = _uid(seed, subject, f"frame/{size}/{depth}")
    datasets, labels = [], []
    for i, k in enumerate(range(first, first + slices)):
        hu, label = ct_abdomen.render_slice(p, seed, subject, k, size, depth)
        labels.append(label)
        sop = _uid(seed, subject, f"instance/{slices}/{size}/{depth}/{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta, ds.preamble = meta, b"\0" * 128  # a PS3.10 file: preamble, DICM, then the meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName, ds.PatientID = f"Phantom^{ct_abdomen.subject_id(subject)}", ct_abdomen.subject_id(subject)
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDate, ds.StudyTime = "20261207", "120000"
        ds.StudyDescription, ds.SeriesDescription = "RAU-Ray phantom abdomen", f"phantom CT {slices} slices"
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "RAU-Ray phantom", 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        z = -ct_abdomen.slice_depth(k, depth)  # LPS z grows towards the head; depth grows towards the feet
        ds.ImagePositionPatient = [round(origin, 4), round(origin, 4), round(z, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z, 4)
        ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
        ds.SliceThickness = round(step, 4)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = size, size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = (hu.astype(np.int32) + 1024).clip(0, 65535).astype("<u2").tobytes()
        datasets.append(ds)
    return datasets, np.stack(labels)
