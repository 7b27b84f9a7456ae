"""rau_ray.serve.pacs, the parts without a PACS or models: structure lists, key slices, a volume segmented through a
Session (a painting backend as in test_sessions: the key slice moves on when the mask is empty, propagation fills
the slices the structure is on, absent stays empty), and the multi-segment DICOM-SEG read back. The round trip
through Orthanc and the real models is tests/integration/test_pacs.py."""

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
from rau_ray.serve.pacs import PacsSeriesError, check_known, key_slices, parse_structures, segment_volume
from rau_ray.serve.pacs_routes import allowed


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


def test_key_slices_start_in_the_middle():
    assert key_slices(16) == [8, 4, 12]
    assert key_slices(1) == [0]
    assert key_slices(2) == [1, 0]
    assert key_slices(64, tries=1) == [32]


class Painter:
    """A backend that 'finds' a structure where the volume is bright: segment -> the bright pixels of the current
    slice; a box prompt -> the bright pixels of that slice (empty where there are none, ending propagation)."""

    def __init__(self):
        self.calls = []

    async def segment(self, session, target):
        self.calls.append(("segment", session.state.slice))
        mask = session.current_image() > 100
        return {"mask": mask, "score": 0.9 if mask.any() else 0.1}

    async def prompt(self, image, points, labels, box, key=None):
        self.calls.append(("prompt", box))
        return {"mask": image[..., 0] > 200, "score": 0.8, "cached": False}


def test_a_volume_is_segmented_as_a_session_would():
    vol = np.zeros((10, 32, 32), np.float32)
    vol[3:7, 8:20, 8:20] = 300.0  # on slices 3..6 only: the middle (5) holds it
    masks, info = asyncio.run(segment_volume(vol, "CT", (1.0, 1.0, 2.0), "liver", backend := Painter()))
    assert info["key_slice"] == 5 and info["score"] == 0.9 and info["slices"] == [3, 4, 5, 6]
    np.testing.assert_array_equal(masks, vol > 100)
    assert backend.calls[0] == ("segment", 5)
    vol2 = np.zeros((8, 32, 32), np.float32)
    vol2[1:3, 4:10, 4:10] = 300.0  # not on the middle slice (4): the quarter point (2) finds it
    masks, info = asyncio.run(segment_volume(vol2, "CT", (1.0, 1.0), "spleen", backend := Painter()))
    assert [c for c in backend.calls if c[0] == "segment"] == [("segment", 4), ("segment", 2)]
    assert info["key_slice"] == 2 and info["slices"] == [1, 2]
    masks, info = asyncio.run(segment_volume(np.zeros((8, 16, 16), np.float32), "CT", (1, 1), "liver", Painter()))
    assert not masks.any() and info == {"key_slice": None, "score": None, "slices": []}  # absent


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
