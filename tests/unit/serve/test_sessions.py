"""Sessions without Ray: the eleven operations on a fake model backend, undo/redo, expiry (410), the limit (429)."""

import asyncio

import numpy as np
import pytest

from rau_ray.commands import parse_command
from rau_ray.serve.sessions import (
    Session,
    SessionError,
    SessionGone,
    SessionLimit,
    SessionNotFound,
    SessionStore,
    key_slices,
    segment_volume,
)


class FakeBackend:
    """Prompts paint a disc around each positive point (or fill the box); 'segment' paints a fixed square."""

    def __init__(self):
        self.calls = []

    async def prompt(self, image, points, labels, box, key=None):
        from rau_ray.models.rau import image_digest

        assert key == image_digest(image)  # the session's cached digest is the image's
        self.calls.append(("prompt", points, labels, box))
        h, w = image.shape[:2]
        m = np.zeros((h, w), bool)
        if box is not None:
            x1, y1, x2, y2 = box
            m[y1:y2, x1:x2] = True
        yy, xx = np.mgrid[:h, :w]
        for (x, y), lab in zip(points or [], labels or []):
            disc = (xx - x) ** 2 + (yy - y) ** 2 <= 16
            m = m | disc if lab else m & ~disc
        return {"mask": m, "score": 0.5, "cached": True}

    async def segment(self, session, target):
        self.calls.append(("segment", target))
        m = np.zeros(session.shape, bool)
        m[10:20, 10:30] = True
        return {"mask": m, "score": 0.9, "reference": {"id": "ref"}}


def run(session, text, backend, known=("liver", "spleen")):
    return asyncio.run(session.apply(parse_command(text), backend, set(known)))


def test_point_undo_redo_window():
    s, b = Session(np.zeros((64, 64), np.float32), "CT", (1.0, 1.0)), FakeBackend()
    run(s, "add a point at 40,50", b)
    assert s.mask()[50, 40] and s.state.points == ((40, 50, 1),)
    run(s, "add a negative point at (41, 50)", b)
    assert not s.mask()[50, 41]
    run(s, "undo", b)
    assert s.mask()[50, 41] and len(s.state.points) == 1
    run(s, "redo", b)
    assert not s.mask()[50, 41]
    run(s, "undo twice", b)
    assert not s.mask().any() and s.summary()["can_redo"] == 2
    run(s, "bone window", b)
    assert s.state.window == ("bone", 400.0, 1800.0)
    assert s.summary()["can_redo"] == 0  # a new change drops the redo branch
    run(s, "undo", b)
    assert s.state.window[0] == "abdomen"


def test_segment_points_box_clear_metrics():
    s, b = Session(np.zeros((64, 64), np.float32), "CT", (0.5, 0.5)), FakeBackend()
    res = run(s, "segment the liver", b)
    assert res[0]["structure"] == "liver" and s.mask().sum() == 200
    run(s, "add three points", b)  # placed inside the current mask
    assert len(s.state.points) == 3 and all(10 <= y < 20 and 10 <= x < 30 for x, y, _ in s.state.points)
    run(s, "add a box", b)  # the current mask's box
    assert s.state.box is not None
    run(s, "add box 1 2 30 40", b)
    assert s.state.box == (1, 2, 30, 40)
    metrics = run(s, "show metrics", b)[0]["metrics"]
    assert metrics["area_px"] == int(s.mask().sum()) and metrics["area_mm2"] == pytest.approx(0.25 * metrics["area_px"])
    run(s, "clear", b)
    assert not s.mask().any() and s.state.points == ()
    assert run(s, "export rle", b)[0]["url"].endswith("format=rle")


def test_segment_result_carries_what_the_pipeline_says():
    class Pipeline(FakeBackend):
        async def segment(self, session, target):
            return {**await super().segment(session, target), "reasoning": "<think>big organ, right side</think>",
                    "label": target, "box": [10, 10, 30, 20], "timings_ms": {"total": 12.5}}

    s = Session(np.zeros((64, 64), np.float32), "CT", (1.0, 1.0))
    (res,) = run(s, "segment the liver", Pipeline())
    assert res["reasoning"].startswith("<think>") and res["label"] == "liver" and res["box"] == [10, 10, 30, 20]
    assert res["timings_ms"] == {"total": 12.5} and res["score"] == 0.9 and res["reference"] == {"id": "ref"}


def test_bad_operations_leave_state():
    s, b = Session(np.zeros((64, 64), np.float32), "CT", (1.0, 1.0)), FakeBackend()
    for text, words in [("segment the heart", "unknown structure"), ("add a point at 100,5", "outside"),
                        ("add three points", "where"), ("go to slice 3", "outside"), ("propagate", "volume"),
                        ("export dicom seg", "DICOM-SEG"), ("add a box", "which box")]:
        with pytest.raises(SessionError, match=words):
            run(s, text, b)
    assert s.summary()["can_undo"] == 0 and not s.mask().any()


def test_volume_slices_and_propagate():
    vol = np.zeros((5, 32, 32), np.float32)
    s, b = Session(vol, "CT", (1.0, 1.0, 2.0)), FakeBackend()
    run(s, "go to slice 2", b)
    run(s, "add box 5 5 15 15", b)
    res = run(s, "propagate", b)
    assert res[0]["slices"] == [0, 1, 3, 4]
    assert all(s.mask(i).any() for i in range(5))
    assert run(s, "show metrics", b)[0]["metrics"]["volume_ml"] == pytest.approx(5 * 100 * 2 / 1000)
    run(s, "next slice", b)
    assert s.state.slice == 3
    run(s, "undo 2", b)
    assert s.state.slice == 2 and not s.mask(0).any()


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_store_expiry_limit_delete():
    clock = Clock()
    store = SessionStore(ttl_s=10, max_sessions=2, clock=clock)
    a = store.create(np.zeros((16, 16)), "CT", (1, 1))
    b = store.create(np.zeros((16, 16)), "CT", (1, 1))
    assert a.id != b.id and len(a.id) >= 20
    with pytest.raises(SessionLimit) as e:
        store.create(np.zeros((16, 16)), "CT", (1, 1))
    assert "limit" in str(e.value.args[0]) and e.value.args[1] >= 1
    clock.t = 6
    store.get(a.id)  # a is used, b idles
    clock.t = 12
    assert store.get(a.id) is a
    with pytest.raises(SessionGone, match="expired"):
        store.get(b.id)
    store.create(np.zeros((16, 16)), "CT", (1, 1))  # b's slot is free again
    store.delete(a.id)
    with pytest.raises(SessionGone, match="deleted"):
        store.get(a.id)
    with pytest.raises(SessionNotFound):
        store.get("nope")


# ------------------------------------------------------------------------- a whole volume (segment_volume)
def test_key_slices_are_spread_nearest_the_middle_first():
    assert key_slices(64) == [32, 21, 42, 10, 53]
    assert key_slices(10) == [5, 3, 6, 1, 8]
    assert key_slices(1) == [0] and key_slices(3) == [1, 0, 2]
    assert key_slices(64, count=1) == [32]


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
    for k, half in ((3, 3), (4, 5), (5, 6), (6, 8), (7, 2)):  # on slices 3..7, largest on 6
        vol[k, 16 - half:16 + half, 16 - half:16 + half] = 300.0
    done = asyncio.run(segment_volume(vol, "CT", (1.0, 1.0, 2.0), "liver", backend := Painter()))
    assert sorted(c[1] for c in backend.calls if c[0] == "segment") == [1, 3, 5, 6, 8]  # every key slice tried
    assert done.key_slice == 6 and done.tried == {5: 144, 3: 36, 6: 256, 1: 0, 8: 0}
    assert done.result["score"] == 0.9 and done.slices == [3, 4, 5, 6, 7]
    np.testing.assert_array_equal(done.masks, vol > 100)  # carried from 6 both ways until a slice comes back empty
    done = asyncio.run(segment_volume(np.zeros((8, 16, 16), np.float32), "CT", (1, 1), "liver", Painter()))
    assert not done.masks.any() and done.key_slice is None and done.slices == []  # absent
    done = asyncio.run(segment_volume(vol, "CT", (1, 1), "liver", Painter(), start=[4], propagate=False))
    assert done.key_slice == 4 and done.slices == [4]  # a given key slice, not carried through
    vol[0, :4, :4] = 300.0  # apart from the rest: propagation stops before it, every slice finds it
    done = asyncio.run(segment_volume(vol, "CT", (1, 1), "liver", backend := Painter(), every_slice=True))
    assert sorted(c[1] for c in backend.calls) == list(range(10)) and {c[0] for c in backend.calls} == {"segment"}
    np.testing.assert_array_equal(done.masks, vol > 100)
    assert done.slices == [0, 3, 4, 5, 6, 7] and done.key_slice == 6
