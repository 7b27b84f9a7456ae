"""rau_ray.serve.pacs, the parts without a PACS or models: structure lists, the multi-segment DICOM-SEG read back, the
URLs the route may reach (a volume through a Session: tests/unit/serve/test_sessions.py). The round trip through
Orthanc and the real models is tests/integration/test_pacs.py."""

from __future__ import annotations

import asyncio
import io

import highdicom as hd
import numpy as np
import pytest

from rau_ray.data.phantom_dicom import phantom_ct_series
from rau_ray.dicomweb import PacsRequestError
from rau_ray.serve import codecs
from rau_ray.serve.dicom_seg import SegExportError, build_segmentation
from rau_ray.serve.http import ApiError
from rau_ray.serve.pacs import PacsSeriesError, ServeBackend, check_known, parse_structures
from rau_ray.serve.pacs_routes import allowed
from rau_ray.serve.sessions import Session


def test_structures_are_parsed_and_checked():
    assert parse_structures("Liver, spleen,,liver") == ["liver", "spleen"]
    assert parse_structures(["left  kidney", "Aorta"]) == ["left kidney", "aorta"]
    with pytest.raises(PacsRequestError, match="at least one structure"):
        parse_structures(" , ")
    with pytest.raises(PacsRequestError, match="17 structures; at most 16"):
        parse_structures([f"s{i}" for i in range(17)])
    check_known(["liver"], ["liver", "spleen"])
    check_known(["anything"], None)
    with pytest.raises(PacsSeriesError, match="unknown structure.*'heart'; known: liver, spleen"):
        check_known(["liver", "heart"], ["spleen", "liver"])


def test_one_seg_with_a_segment_per_structure():
    datasets, labels = phantom_ct_series(2, slices=4, size=32)
    decoded = codecs.series_from_datasets(datasets)
    masks = {"liver": labels == 1, "spleen": labels == 2, "urinary bladder": labels == 11}  # the last: empty
    seg = build_segmentation(decoded.sources, masks, automatic=True)
    buf = io.BytesIO()
    seg.save_as(buf)
    back = hd.seg.segread(io.BytesIO(buf.getvalue()))
    assert buf.getvalue()[128:132] == b"DICM"
    assert [d.SegmentLabel for d in back.SegmentSequence] == ["liver", "spleen", "urinary bladder"]
    assert {d.SegmentAlgorithmType for d in back.SegmentSequence} == {"AUTOMATIC"}
    assert back.StudyInstanceUID == datasets[0].StudyInstanceUID
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    pixels = back.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3])
    for i, name in enumerate(masks):
        np.testing.assert_array_equal(pixels[..., i].astype(bool), masks[name])
    with pytest.raises(SegExportError, match="3 mask slice"):
        build_segmentation(decoded.sources, {"liver": np.zeros((3, 32, 32), bool)})


def test_the_route_reaches_only_allowed_urls():
    assert allowed("http://pacs:8042/dicom-web", None)
    assert allowed("http://pacs:8042/dicom-web", ("http://pacs:8042/",))
    assert not allowed("http://169.254.169.254/latest", ("http://pacs:8042",))
    assert not allowed("http://pacs:8042/dicom-web", ())
    for sly in ("http://pacs:8042@evil.example/dicom-web", "http://pacs:18042/dicom-web",
                "http://pacs:99999/dicom-web", "https://pacs:8042/x", "http://pacs:8042/other"):
        assert not allowed(sly, ("http://pacs:8042/dicom-web",)), sly
    assert allowed("http://PACS:8042/dicom-web/studies", ("http://pacs:8042/dicom-web",))


def test_a_slice_no_reference_shows_is_empty_other_errors_raise():
    class Pipeline:
        def __init__(self, status):
            self.status = status

        async def segment(self, session, target):
            raise ApiError(self.status, "none of the 8 most similar references shows 'spleen'")

    session = Session(np.zeros((4, 16, 16), np.float32), "CT", (1, 1, 1))
    out = asyncio.run(ServeBackend(Pipeline(422)).segment(session, "spleen"))
    assert out["mask"].shape == (16, 16) and not out["mask"].any() and "most similar" in out["absent"]
    with pytest.raises(ApiError) as e:
        asyncio.run(ServeBackend(Pipeline(503)).segment(session, "spleen"))
    assert e.value.status == 503
