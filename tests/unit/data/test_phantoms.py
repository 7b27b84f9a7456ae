"""Phantom generators: determinism, labels, anatomy that only position can disambiguate."""

import numpy as np
import pytest

from rau_ray.data.phantoms import PHANTOMS, ct_abdomen, get_phantom
from rau_ray.errors import DataError


@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_same_seed_same_sample_and_other_seed_differs(name):
    m = PHANTOMS[name]
    a, b, c = m.generate_2d(7, 2, size=96)[0], m.generate_2d(7, 2, size=96)[0], m.generate_2d(8, 2, size=96)[0]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_sample_fields(name):
    m = PHANTOMS[name]
    s = m.generate_2d(0, 1, size=128)[0]
    assert s.image.shape == s.label.shape == (128, 128)
    assert s.label.dtype == np.uint8
    assert s.image.dtype == (np.int16 if m.MODALITY == "CT" else np.uint8)
    present = set(np.unique(s.label).tolist()) - {0}
    assert present and present <= set(s.labels)
    assert s.modality == m.MODALITY and s.subject == "s0001" and len(s.spacing) == 2


def test_label_counts_match_the_issue():
    assert len(PHANTOMS["ct-abdomen"].LABELS) >= 10
    assert len(PHANTOMS["xray-angio"].LABELS) >= 10
    assert {"femur", "tibia", "fibula", "patella"} <= set(PHANTOMS["xray-msk"].LABELS.values())
    assert PHANTOMS["ultrasound"].OUT_OF_DISTRIBUTION and PHANTOMS["xray-msk"].OUT_OF_DISTRIBUTION
    assert not PHANTOMS["ct-abdomen"].OUT_OF_DISTRIBUTION


def test_every_angio_segment_is_drawn_and_thin():
    s = PHANTOMS["xray-angio"].generate_2d(0, 0, size=256)[0]
    assert set(np.unique(s.label)) - {0} == set(s.labels)
    # thin and elongated: vessels cover a small fraction of the image, and are darker than the background
    assert (s.label > 0).mean() < 0.08
    assert s.image[s.label > 0].mean() < s.image[s.label == 0].mean() - 30


def test_ultrasound_outside_fan_is_black():
    s = PHANTOMS["ultrasound"].generate_2d(0, 0, size=128)[0]
    assert s.image[0, 0] == 0 and s.image[0, -1] == 0 and s.image[-1, 0] == 0
    assert s.image[64, 64] > 0 or s.label[64, 64] == 1  # the centre is inside the fan


def test_ct_shared_intensities_and_hu_ranges():
    """Liver, spleen and kidneys are all soft tissue (40-70 HU): appearance alone cannot tell them apart."""
    means = {}
    for subject in range(6):
        for s in ct_abdomen.generate_2d(0, subject, size=128, slices=6):
            for lab in (1, 2, 3, 4):
                px = s.image[s.label == lab]
                if px.size > 50:
                    means.setdefault(lab, []).append(px.mean())
    per_organ = {lab: float(np.mean(v)) for lab, v in means.items()}
    assert set(per_organ) == {1, 2, 3, 4}
    assert max(per_organ.values()) - min(per_organ.values()) < 15
    s = ct_abdomen.generate_2d(0, 0, size=128)[0]
    assert s.image.min() >= -1024 and s.image[s.label == 10].mean() > 250  # air outside, bone bright


def test_ct_relative_positions():
    """Liver on the patient's right (image left), spleen on the left (image right), vertebrae posterior."""
    for subject in range(4):
        p = ct_abdomen.draw_subject(0, subject)
        k = next(k for k in range(ct_abdomen.DEPTH) if 50 <= ct_abdomen.slice_depth(k) <= 70)
        _, lab = ct_abdomen.render_slice(p, 0, subject, k, 128)
        cols = {v: np.nonzero(lab == v)[1].mean() for v in (1, 2, 10) if (lab == v).any()}
        rows = {v: np.nonzero(lab == v)[0].mean() for v in (1, 10) if (lab == v).any()}
        assert cols[1] < 64 and rows[10] > rows[1]
        if 2 in cols:
            assert cols[2] > 64


def test_ct_variation_and_missing_organs():
    params = [ct_abdomen.draw_subject(0, i) for i in range(40)]
    missing = [p["missing"] for p in params if p["missing"] is not None]
    assert 2 <= len(missing) <= 20 and set(missing) <= set(ct_abdomen.RESECTABLE)
    p = next(p for p in params if p["missing"] is not None)
    subject = params.index(p)
    labels = set()
    for k in range(0, ct_abdomen.DEPTH, 2):
        labels |= set(np.unique(ct_abdomen.render_slice(p, 0, subject, k, 96)[1]).tolist())
    assert p["missing"] not in labels
    a, b = ct_abdomen.generate_2d(0, 0, size=96)[0], ct_abdomen.generate_2d(0, 1, size=96)[0]
    assert not np.array_equal(a.label, b.label)


def test_ct_2d_slice_equals_volume_slice():
    vol = ct_abdomen.generate_3d(3, 5, size=64, depth=16)
    assert vol.image.shape == (64, 64, 16) and len(vol.spacing) == 3
    for s in ct_abdomen.generate_2d(3, 5, size=64, slices=3, depth=16):
        assert np.array_equal(vol.image[:, :, s.slice].T, s.image)
        assert np.array_equal(vol.label[:, :, s.slice].T, s.label)


def test_unknown_phantom_is_a_clear_error():
    with pytest.raises(DataError, match="unknown phantom modality 'mri-brain'.*ct-abdomen"):
        get_phantom("mri-brain")


def test_a_held_out_set_puts_every_subject_in_the_test_split(tmp_path):
    from rau_ray.data.make import MakeConfig, make_dataset
    from rau_ray.data.manifest import read_manifest

    make_dataset(MakeConfig("ct-abdomen", n=4, out=str(tmp_path / "held"), seed=7777, size=64, held_out=True),
                 backend="local", progress=False)
    make_dataset(MakeConfig("ct-abdomen", n=4, out=str(tmp_path / "plain"), seed=7777, size=64),
                 backend="local", progress=False)
    assert {r.split for r in read_manifest(tmp_path / "held" / "manifest.jsonl").rows} == {"test"}
    assert "train" in {r.split for r in read_manifest(tmp_path / "plain" / "manifest.jsonl").rows}
