"""DICOM Segmentation (DICOM-SEG) export of a session's mask, with highdicom.

``encode_segmentation(sources, masks, structure)`` -> the bytes of a binary DICOM Segmentation instance: one segment
named after the structure, its category and type coded in SNOMED CT from DICOM CID 7150 / 7151 (pydicom's code
dictionary, as highdicom uses it) where the name is found there ("liver" -> SCT 10200004 Liver), else the generic
SCT 91723000 "Anatomical structure" with the name as the segment label; algorithm type SEMIAUTOMATIC (a person
steers the model in a session), algorithm family "Artificial Intelligence". The SEG is a new series in the source's
study, references the source images by SOP Instance UID (Referenced Series Sequence, and each frame's Derivation
Image Sequence) and copies the patient / study from them, so a PACS files it beside the images it outlines.
``sources`` are the source datasets' metadata only (``pydicom.dcmread(..., stop_before_pixels=True)``), one per
slice of ``masks``. A problem with the sources (missing geometry, sizes that differ) raises ``SegExportError``.
Why there is no DICOM-SEG for a PNG / JPEG / NIfTI session: ``rau_ray.serve.sessions.dicom_seg_refusal``.
Use: ``data = encode_segmentation([meta], mask[None], "liver")``; read back with ``highdicom.seg.segread``.
"""

from __future__ import annotations

import io
import re

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

MANUFACTURER = "RAU-Ray"
SERIES_NUMBER = 4242  # a series number unlikely to clash with the scanner's (DICOM needs one; any integer works)


class SegExportError(ValueError):
    """The sources cannot carry a DICOM-SEG (-> 422)."""


def _camel(name: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in re.findall(r"[a-z0-9]+", name.lower()))


def property_codes(structure: str | None):
    """(category, type) codes of a segment for ``structure``: SNOMED CT from DICOM CID 7151 when the name (or its
    singular) is a known segmentation property type, else the generic 'Anatomical structure'."""
    generic = codes.cid7150.AnatomicalStructure  # SCT 91723000
    if not structure:
        return generic, generic
    names = [_camel(structure)]
    bare = re.sub(r"^(left|right|upper|lower)\s+", "", structure.strip().lower())
    if bare != structure.strip().lower():  # "left kidney" -> Kidney (the label keeps the side)
        names.append(_camel(bare))
    names += [n[:-1] for n in names if n.endswith("s")]  # "kidneys" -> Kidney
    for name in names:
        if name and name in codes.cid7151.dir():
            kind = getattr(codes.cid7151, name)
            if name in codes.cid7159.dir():  # lesion, mass, cyst...: a morphologically abnormal structure
                return codes.cid7150.MorphologicallyAbnormalStructure, kind
            if name in codes.cid7166.dir():  # adipose tissue, cartilage, ligament...
                return codes.cid7150.Tissue, kind
            return generic, kind
    return generic, generic


def encode_segmentation(sources, masks: np.ndarray, structure: str | None, *, software_version: str = "0.1.0",
                        series_description: str | None = None) -> bytes:
    """A binary DICOM-SEG of ``masks`` (bool (Z, H, W), one frame per source dataset, in the sources' order)."""
    sources = list(sources)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    if not sources:
        raise SegExportError("DICOM-SEG needs the source DICOM images; this session has none")
    if len(sources) != masks.shape[0]:
        raise SegExportError(f"{masks.shape[0]} mask slice(s) for {len(sources)} source image(s)")
    for ds in sources:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if (rows, cols) != masks.shape[1:]:
            raise SegExportError(f"the source image is {cols}x{rows} but the mask is {masks.shape[2]}x"
                                 f"{masks.shape[1]}")
    category, kind = property_codes(structure)
    label = (structure or "segmentation")[:64]  # LO: at most 64 characters
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=MANUFACTURER, version=software_version, family=codes.cid7162.ArtificialIntelligence),
        tracking_id=label, tracking_uid=hd.UID())
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=software_version, device_serial_number="0",
            content_label="RAU_SEG", content_description=f"{label} segmentation"[:64])
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # the sources lack what a SEG must copy
        raise SegExportError(f"cannot build a DICOM-SEG from this DICOM source: {e}") from None
    seg.SeriesDescription = (series_description or f"RAU-Ray {label}")[:64]
    out = io.BytesIO()
    seg.save_as(out)
    return out.getvalue()
