"""rau_ray.data.dicom_series on real DICOM files: copies of pydicom's CT_small placed along the slice normal, one or
two series, oblique and reversed stacks, and every geometry a volume cannot be built from."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_files import CT_SMALL, RAW, save, slices

from rau_ray.data.dicom_series import group_by_series, read_datasets, read_dicom_series, series_volume
from rau_ray.errors import DataError


def test_folder_in_file_order_comes_back_ordered_along_the_normal_in_hu(tmp_path):
    datasets = slices([5.0, 0.0, 2.5])  # file order != position order
    series = read_dicom_series(save(tmp_path / "ct", datasets))
    assert series.volume.shape == (3, 128, 128) and series.volume.dtype == np.float32
    for k, i in enumerate([1, 2, 0]):  # ordered by position: s1 (0), s2 (2.5), s0 (5)
        np.testing.assert_array_equal(series.volume[k], RAW - 1024 + 100 * i)  # the modality LUT: HU
    assert series.spacing == pytest.approx((0.661468, 0.661468, 2.5))
    assert series.instance_uids == tuple(datasets[i].SOPInstanceUID for i in [1, 2, 0])
    assert series.modality == "CT" and series.series_uid == datasets[0].SeriesInstanceUID
    # the affine maps (slice, row, column) to the patient position of each voxel
    first = series.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(first[:3], datasets[1].ImagePositionPatient, atol=1e-4)
    np.testing.assert_allclose((series.affine @ [2, 0, 0, 1])[:3], datasets[0].ImagePositionPatient, atol=1e-4)


def test_oblique_series_is_ordered_by_geometry_not_by_z(tmp_path):
    # rows along x, columns tilted 30 degrees out of the axial plane: z alone would still order these, but the
    # positions are set along the tilted normal and the spacing is the distance along it (2 mm), not the z step
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    datasets = slices([4.0, 0.0, 2.0, 6.0], orientation=(1, 0, 0, 0, c, s))
    series = series_volume(datasets)
    assert series.spacing[2] == pytest.approx(2.0)
    for k, i in enumerate([1, 2, 0, 3]):
        np.testing.assert_array_equal(series.volume[k], RAW - 1024 + 100 * i)


def test_a_stack_given_head_to_feet_runs_along_the_normal(tmp_path):
    series = series_volume(slices([0.0, -2.5, -5.0]))
    assert [series.volume[k, 0, 0] - RAW[0, 0] for k in range(3)] == [-824.0, -924.0, -1024.0]


def test_grouping_by_series_uid_and_two_series_in_one_upload_are_refused(tmp_path):
    a, b = slices([0.0, 2.5], description="arterial"), slices([0.0, 2.5, 5.0], description="venous")
    for ds in b:
        ds.filename = "v" + ds.filename
    groups = group_by_series(a + b)
    assert {uid: len(g) for uid, g in groups.items()} == {a[0].SeriesInstanceUID: 2, b[0].SeriesInstanceUID: 3}
    with pytest.raises(DataError, match=r"2 series in one upload: .*\(2 files, 'arterial'\).*\(3 files, 'venous'\)"):
        read_dicom_series(save(tmp_path / "both", a + b))
    assert series_volume(groups[b[0].SeriesInstanceUID]).volume.shape[0] == 3


@pytest.mark.parametrize("case, match", [
    ("gap", r"a gap in the series: 1 slice\(s\) missing between s1.dcm \(2.50 mm\) and s2.dcm \(7.50 mm\)"),
    ("duplicate", r"two slices at one position \(2.50 mm along the normal\): s1.dcm and s2.dcm"),
    ("orientation", r"slices differ in orientation: s0.dcm and s2.dcm"),
    ("size", r"slices differ in size: s0.dcm is 128x128, s1.dcm is 64x64"),
    ("no position", r"s1.dcm: has no ImagePositionPatient"),
    ("no series", r"s0.dcm: has no SeriesInstanceUID"),
])
def test_geometry_a_volume_cannot_come_from_is_refused_naming_the_files(case, match):
    datasets = slices([0.0, 2.5, 7.5] if case == "gap" else [0.0, 2.5, 2.5] if case == "duplicate" else
                      [0.0, 2.5, 5.0])
    if case == "orientation":
        datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
    elif case == "size":
        datasets[1].PixelData = np.ascontiguousarray(datasets[1].pixel_array[:64, :64]).tobytes()
        datasets[1].Rows, datasets[1].Columns = 64, 64
    elif case == "no position":
        del datasets[1].ImagePositionPatient
    elif case == "no series":
        del datasets[0].SeriesInstanceUID
    with pytest.raises(DataError, match=match):
        series_volume(datasets)


def test_files_that_are_not_dicom_are_named(tmp_path):
    data = open(CT_SMALL, "rb").read()
    with pytest.raises(DataError, match=r"cut.dcm: not a readable DICOM image"):
        read_datasets([("ok.dcm", data), ("cut.dcm", data[: len(data) // 2])])
    folder = save(tmp_path / "ct", slices([0.0, 2.5]))
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not a readable DICOM image"):
        read_dicom_series(folder)
    with pytest.raises(DataError, match="DICOM series folder not found"):
        read_dicom_series(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no DICOM files"):
        read_dicom_series(tmp_path / "empty")
