"""rau_ray.data.phantom_dicom: a phantom CT volume as a DICOM series that dicom_series reads back to the same HU, in
the same slice order, with the same UIDs for the same call."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from rau_ray.data.dicom_series import series_volume
from rau_ray.data.phantom_dicom import phantom_ct_series
from rau_ray.data.phantoms import ct_abdomen


def test_the_series_reads_back_as_the_phantom_volume():
    datasets, labels = phantom_ct_series(3, slices=6, size=64)
    assert len(datasets) == 6 and labels.shape == (6, 64, 64)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6 and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    series = series_volume(list(reversed(datasets)))  # any order in: slices come out feet -> head
    assert [str(ds.SOPInstanceUID) for ds in series.sources] == [str(ds.SOPInstanceUID) for ds in datasets]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.all(np.diff(z) > 0) and series.spacing == pytest.approx((360 / 64, 360 / 64, 5.0))
    p = ct_abdomen.draw_subject(0, 3)
    k0 = int(round(ct_abdomen.DEPTH - 1 - (-z[0] - ct_abdomen.TOP_MM) / 5.0))  # z: minus the depth below the dome
    hu, label = ct_abdomen.render_slice(p, 0, 3, k0, 64)
    np.testing.assert_array_equal(series.volume[0], hu.astype(np.float32))  # modality LUT: HU back exactly
    np.testing.assert_array_equal(labels[0], label)
    assert {1, 2} <= set(np.unique(labels[len(labels) // 2]))  # liver and spleen in the middle slice


def test_uids_are_the_same_for_the_same_call_and_files_are_ps310():
    a, _ = phantom_ct_series(1, slices=2, size=32)
    b, _ = phantom_ct_series(1, slices=2, size=32)
    c, _ = phantom_ct_series(2, slices=2, size=32)
    assert [ds.SOPInstanceUID for ds in a] == [ds.SOPInstanceUID for ds in b]
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, a[0])  # as a STOW-RS client writes it: preamble and DICM, so any reader takes it
    assert buf.getvalue()[128:132] == b"DICM"
    assert pydicom.dcmread(io.BytesIO(buf.getvalue())).Modality == "CT"
    with pytest.raises(ValueError, match="slices must be"):
        phantom_ct_series(1, slices=0)
