"""DICOM-SEG export without Ray: pydicom's real CT slice (CT_small.dcm) decoded with its metadata kept, a session on
it, the export op, the SEG read back with highdicom (pixels, referenced SOP Instance UID, patient / study, codes),
and the clear refusal for a session that did not come from DICOM."""

import asyncio
import io

import highdicom as hd
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from rau_ray.data import formats
from rau_ray.serve import codecs
from rau_ray.serve.dicom_seg import SegExportError, encode_segmentation, property_codes
from rau_ray.serve.sessions import Session, SessionError


@pytest.fixture(scope="module")
def ct_small():
    return codecs.decode_image(open(get_testdata_file("CT_small.dcm"), "rb").read())


class Backend:
    async def segment(self, session, target):
        m = np.zeros(session.shape, bool)
        m[30:70, 40:90] = True
        return {"mask": m, "score": 0.8, "reference": {"id": "r"}, "reasoning": "<think>liver</think>",
                "label": target, "box": [40, 30, 90, 70], "timings_ms": {"total": 1.0}}


def test_dicom_decoding_keeps_the_metadata_without_pixels(ct_small):
    assert ct_small.kind == "dicom" and ct_small.array.shape == (128, 128)
    (meta,) = ct_small.sources
    assert "PixelData" not in meta and meta.Modality == "CT" and meta.SOPInstanceUID
    png = codecs.decode_image(formats.encode_png(np.zeros((16, 16), np.uint8)))
    assert png.sources == ()


def test_session_export_and_read_back(ct_small):
    s = Session(ct_small.array, "CT", ct_small.spacing, sources=ct_small.sources, kind=ct_small.kind)
    results = asyncio.run(s.apply([{"op": "segment", "target": "liver"},
                                   {"op": "export", "format": "dicom-seg"}], Backend()))
    assert results[0]["reasoning"] == "<think>liver</think>" and results[0]["box"] == [40, 30, 90, 70]
    assert results[1]["url"] == f"/v1/sessions/{s.id}/mask?format=dicom-seg"
    assert "dicom-seg" in s.summary()["exports"]

    data = encode_segmentation(s.sources, s.mask()[None], s.state.structure)
    seg = hd.seg.segread(io.BytesIO(data))
    source = ct_small.sources[0]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    assert [u[2] for u in seg.get_source_image_uids()] == [source.SOPInstanceUID]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                               segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), s.mask())
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "liver" and segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # SCT Anatomical structure


def test_codes_generic_for_unknown_names():
    assert [c.meaning for c in property_codes("spleen")] == ["Anatomical Structure", "Spleen"]
    assert [c.meaning for c in property_codes("left kidney")] == ["Anatomical Structure", "Kidney"]
    assert [c.meaning for c in property_codes("mass")] == ["Morphologically Abnormal Structure", "Mass"]
    assert [c.value for c in property_codes("blob")] == ["91723000", "91723000"]
    assert [c.value for c in property_codes(None)] == ["91723000", "91723000"]


def test_empty_mask_and_bad_sources(ct_small):
    seg = hd.seg.segread(io.BytesIO(encode_segmentation(ct_small.sources, np.zeros((1, 128, 128), bool), None)))
    assert seg.SegmentSequence[0].SegmentLabel == "segmentation"
    with pytest.raises(SegExportError, match="mask is"):
        encode_segmentation(ct_small.sources, np.zeros((1, 64, 64), bool), "liver")
    with pytest.raises(SegExportError, match="source image"):
        encode_segmentation(ct_small.sources, np.zeros((2, 128, 128), bool), "liver")
    with pytest.raises(SegExportError, match="needs the source"):
        encode_segmentation((), np.zeros((1, 128, 128), bool), "liver")


@pytest.mark.parametrize("kind", ["png", "nifti", None])
def test_no_dicom_seg_without_a_dicom_source(kind):
    s = Session(np.zeros((32, 32), np.float32), "CT", (1.0, 1.0), kind=kind)
    with pytest.raises(SessionError, match="DICOM-SEG needs a DICOM source"):
        asyncio.run(s.apply([{"op": "export", "format": "dicom-seg"}], Backend()))
    assert "dicom-seg" not in s.summary()["exports"]
