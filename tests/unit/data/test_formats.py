"""rau_ray.data.formats on real files: pydicom's CT test slice, NIfTI / PNG written to tmp_path, broken files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from rau_ray.data import formats as F
from rau_ray.errors import DataError

CT_SMALL = get_testdata_file("CT_small.dcm")


def _ct_expected_hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# ------------------------------------------------------------------------------------------------------------ DICOM
def test_read_dicom_ct_small_hu_spacing_modality():
    ds = pydicom.dcmread(CT_SMALL)
    hu, spacing, modality = F.read_dicom(CT_SMALL)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, _ct_expected_hu(ds))
    assert hu.min() < -160 and hu.max() > 240  # really HU, not raw stored values (raw min is 128)
    assert spacing == (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]))
    assert modality == "CT"


def test_read_dicom_spacing_is_x_then_y(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.PixelSpacing = [0.5, 0.7]  # DICOM order: [row spacing (y), column spacing (x)]
    ds.save_as(tmp_path / "a.dcm")
    assert F.read_dicom(tmp_path / "a.dcm")[1] == (0.7, 0.5)


def test_apply_window_abdomen_on_ct():
    hu, _, _ = F.read_dicom(CT_SMALL)
    grey = F.apply_window(hu, "abdomen")  # level 40, width 400 -> [-160, 240]
    assert grey.dtype == np.uint8 and grey.shape == hu.shape
    assert (hu <= -160).any() and (hu >= 240).any()
    assert np.all(grey[hu <= -160] == 0) and np.all(grey[hu >= 240] == 255)
    order = np.argsort(hu.ravel(), kind="stable")
    assert np.all(np.diff(grey.ravel()[order].astype(int)) >= 0)  # monotone in HU
    assert int(F.apply_window(np.array([40.0]), "abdomen")[0]) in (127, 128)
    assert int(F.apply_window(np.array([-60.0]), (40, 400))[0]) == 64  # 100 / 400 * 255 = 63.75


def test_read_dicom_bad_files(tmp_path):
    data = Path(CT_SMALL).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    for name in ("cut.dcm", "junk.dcm"):
        with pytest.raises(DataError, match=f"not a readable DICOM file: .*{name}"):
            F.read_dicom(tmp_path / name)


# ------------------------------------------------------------------------------------------------------------ NIfTI
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_lps_default_comes_back_ras(tmp_path, suffix):
    a = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    path = tmp_path / f"v{suffix}"
    F.write_nifti(path, a, (0.8, 0.9, 2.5))  # default affine diag(-sx, -sy, sz): axes L, P, S
    arr, spacing, affine = F.read_nifti(path)
    # as_closest_canonical turns L -> R and P -> A, i.e. flips array axes 0 and 1.
    np.testing.assert_array_equal(arr, a[::-1, ::-1, :])
    assert arr.dtype == np.float32
    assert spacing == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_allclose(np.diag(affine), [0.8, 0.9, 2.5, 1.0], rtol=1e-6)


def test_nifti_ras_affine_is_unchanged_and_int_kept(tmp_path):
    a = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    F.write_nifti(tmp_path / "v.nii.gz", a, (1.0, 1.0, 2.0), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    arr, spacing, _ = F.read_nifti(tmp_path / "v.nii.gz")
    assert arr.dtype == np.int16
    np.testing.assert_array_equal(arr, a)
    assert spacing == (1.0, 1.0, 2.0)


def test_nifti_writes_are_deterministic(tmp_path):
    a = np.random.default_rng(1).integers(-1000, 1000, size=(16, 16, 8)).astype(np.int16)
    F.write_nifti(tmp_path / "a.nii.gz", a, (1, 1, 3))
    F.write_nifti(tmp_path / "b.nii.gz", a, (1, 1, 3))
    data = (tmp_path / "a.nii.gz").read_bytes()
    assert data == (tmp_path / "b.nii.gz").read_bytes()
    assert data[4:8] == b"\0\0\0\0"  # gzip MTIME field
    assert data == F.encode_nifti(a, (1, 1, 3))


def test_nifti_truncated_or_junk_is_data_error(tmp_path):
    a = np.random.default_rng(2).integers(-1000, 1000, size=(32, 32, 16)).astype(np.int16)
    F.write_nifti(tmp_path / "full.nii.gz", a, (1, 1, 1))
    data = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "half.nii.gz").write_bytes(data[: len(data) // 2])  # header intact, data cut
    (tmp_path / "junk.nii").write_bytes(np.random.default_rng(3).bytes(2000))
    for name in ("half.nii.gz", "junk.nii"):
        with pytest.raises(DataError, match=f"not a readable NIfTI file: .*{name}"):
            F.read_nifti(tmp_path / name)


def test_read_nifti_label(tmp_path):
    lab = np.zeros((4, 4, 3), np.float32)
    lab[1:3, 1:3, 1] = 2
    F.write_nifti(tmp_path / "lab.nii.gz", lab, (1, 1, 1))
    out = F.read_nifti_label(tmp_path / "lab.nii.gz")
    assert out.dtype.kind == "i" and set(np.unique(out)) == {0, 2}
    lab[0, 0, 0] = 0.5
    F.write_nifti(tmp_path / "bad.nii.gz", lab, (1, 1, 1))
    with pytest.raises(DataError, match="non-integer"):
        F.read_nifti_label(tmp_path / "bad.nii.gz")


# ------------------------------------------------------------------------------------------------------------ PNG
def test_png_round_trips_exact_and_deterministic(tmp_path):
    rng = np.random.default_rng(4)
    a8 = rng.integers(0, 256, size=(17, 23), dtype=np.uint8)
    a16 = rng.integers(0, 65536, size=(17, 23), dtype=np.uint16)
    a16[0, 0], a16[0, 1] = 0, 65535
    F.write_png(tmp_path / "a8.png", a8)
    F.write_png(tmp_path / "a16.png", a16)
    r8, r16 = F.read_png_image(tmp_path / "a8.png"), F.read_png_image(tmp_path / "a16.png")
    assert r8.dtype == np.uint8 and r16.dtype == np.uint16
    np.testing.assert_array_equal(r8, a8)
    np.testing.assert_array_equal(r16, a16)
    assert (tmp_path / "a16.png").read_bytes() == F.encode_png(a16)
    np.testing.assert_array_equal(F.read_png_label(tmp_path / "a16.png"), a16.astype(np.int32))
    with pytest.raises(DataError, match="2D uint8 or uint16"):
        F.encode_png(a8.astype(np.float32))


def test_png16_hu_rule():
    hu = np.arange(-1024, 3001, dtype=np.float32)
    stored = F.hu_to_png16(hu)
    assert stored.dtype == np.uint16 and stored[0] == 0 and stored[-1] == 3000 + F.CT_PNG_OFFSET
    back = F.png16_to_hu(stored)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, hu)
    np.testing.assert_array_equal(F.hu_to_png16(np.array([-3000.0, 70000.0])), [0, 65535])


def test_png_colour_handling(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert F.read_png_image(tmp_path / "rgb.png").dtype == np.uint8  # converted to 'L'
    with pytest.raises(DataError, match="label map must be single-channel"):
        F.read_png_label(tmp_path / "rgb.png")
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(F.read_png_label(tmp_path / "pal.png"), [[0, 1], [2, 3]])


def test_png_truncated_is_data_error(tmp_path):
    F.write_png(tmp_path / "full.png", np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, image data cut
    with pytest.raises(DataError, match="not a readable PNG file: .*cut.png"):
        F.read_png_image(tmp_path / "cut.png")


# ---------------------------------------------------------------------------------------------------------- read_image
def test_read_image_dispatch(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    F.write_nifti(tmp_path / "v.nii.gz", a, (1, 1, 1), affine=np.eye(4))
    np.testing.assert_array_equal(F.read_image(tmp_path / "v.nii.gz"), a)
    F.write_png(tmp_path / "i.png", np.full((3, 3), 7, np.uint8))
    assert F.read_image(tmp_path / "i.png")[0, 0] == 7
    hu, _, _ = F.read_dicom(CT_SMALL)
    np.testing.assert_array_equal(F.read_image(CT_SMALL), hu)
    (tmp_path / "IM0001").write_bytes(Path(CT_SMALL).read_bytes())  # DICOM without suffix: sniffed by b"DICM"
    np.testing.assert_array_equal(F.read_image(tmp_path / "IM0001"), hu)


def test_read_image_errors(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not really")
    with pytest.raises(DataError, match=r"unsupported image format '\.jpg' for .*x\.jpg; supported: \.nii, \.nii\.gz"):
        F.read_image(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="file not found: .*nope.png"):
        F.read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="file not found"):
        F.read_nifti(tmp_path / "nope.nii.gz")


# ------------------------------------------------------------------------------------------------------------ windows
def test_get_window_parsing():
    assert F.get_window("40,400") == (40.0, 400.0)
    assert F.get_window(" -600, 1500 ") == (-600.0, 1500.0)
    assert F.get_window((50, 350)) == (50.0, 350.0)
    assert F.get_window("Bone") == (400.0, 1800.0)
    with pytest.raises(DataError, match="unknown window 'kidney'.*abdomen.*liver"):
        F.get_window("kidney")
    for bad in ("40,0", (40, -5), "40,abc", (1, 2, 3)):
        with pytest.raises(DataError):
            F.get_window(bad)


# ------------------------------------------------------------------------------------------------------------ atomicity
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        F.write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(OSError, match="disk full"):
        F.write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32), (1, 1, 1))
    assert list(tmp_path.iterdir()) == []
