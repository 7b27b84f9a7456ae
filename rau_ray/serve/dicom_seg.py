"""DICOM Segmentation (DICOM-SEG) export of a session's mask, with highdicom.

``encode_segmentation(sources, masks, structure)`` -> the bytes of a binary DICOM Segmentation instance: one segment
named after the structure, its category and type coded in SNOMED CT from DICOM CID 7150 / 7151 (pydicom's code
dictionary, as highdicom uses it) where the name is found there ("liver" -> SCT 10200004 Liver), else the generic
SCT 91723000 "Anatomical structure" with the name as the segment label; algorithm type SEMIAUTOMATIC (a person
steers the model in a session), algorithm family "Artificial Intelligence". ``build_segmentation(sources,
{structure: masks, ...}, automatic=True)`` is the dataset itself, one segment per structure (AUTOMATIC: what
``rau pacs segment`` stores in a PACS, no person steering). The SEG is a new series in the source's study,
references the source images by SOP Instance UID (Referenced Series Sequence, and each frame's Derivation Image
Sequence) and copies the patient / study from them, so a PACS files it beside the images it outlines.
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
    seg = build_segmentation(sources, {structure: masks}, software_version=software_version,
                             series_description=series_description)
    out = io.BytesIO()
    seg.save_as(out)
    return out.getvalue()


def build_segmentation(sources, masks: dict, *, automatic: bool = False, software_version: str = "0.1.0",
                       series_description: str | None = None) -> hd.seg.Segmentation:
    """A binary DICOM-SEG dataset with one segment per entry of ``masks`` ({structure or None: bool (Z, H, W)},
    numbered in order; one frame per source dataset and segment, empty frames left out). ``automatic``: the
    algorithm type is AUTOMATIC (a job with no person steering it, e.g. ``rau pacs segment``), else SEMIAUTOMATIC."""
    sources = list(sources)
    if not sources:
        raise SegExportError("DICOM-SEG needs the source DICOM images; this session has none")
    if not masks:
        raise SegExportError("DICOM-SEG needs at least one segment")
    stack = []
    for m in masks.values():
        m = np.asarray(m, dtype=bool)
        if m.ndim == 2:
            m = m[None]
        if len(sources) != m.shape[0]:
            raise SegExportError(f"{m.shape[0]} mask slice(s) for {len(sources)} source image(s)")
        for ds in sources:
            rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
            if (rows, cols) != m.shape[1:]:
                raise SegExportError(f"the source image is {cols}x{rows} but the mask is {m.shape[2]}x"
                                     f"{m.shape[1]}")
        stack.append(m)
    kind_of = (hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if automatic
               else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC)
    descriptions, labels = [], []
    for number, structure in enumerate(masks, 1):
        category, kind = property_codes(structure)
        label = (structure or "segmentation")[:64]  # LO: at most 64 characters
        labels.append(label)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=kind_of,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=MANUFACTURER, version=software_version, family=codes.cid7162.ArtificialIntelligence),
            tracking_id=label, tracking_uid=hd.UID()))
    pixels = stack[0] if len(stack) == 1 else np.stack(stack, axis=-1)
    what = labels[0] if len(labels) == 1 else ", ".join(labels)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER, software_versions=software_version, device_serial_number="0",
            content_label="RAU_SEG", content_description=f"{what} segmentation"[:64])
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # the sources lack what a SEG must copy
        raise SegExportError(f"cannot build a DICOM-SEG from this DICOM source: {e}") from None
    seg.SeriesDescription = (series_description or f"RAU-Ray {what}")[:64]
    seg.preamble = b"\0" * 128  # a PS3.10 file however it is written (save_as, or a STOW-RS client's dcmwrite)
    return seg
