"""Codecs: COCO RLE round trips (and pycocotools' own strings, pycocotools being a dev dependency), image decoding
with limits, bad images."""

import base64
import io

import numpy as np
import pytest

from rau_ray.data import formats
from rau_ray.serve import codecs
from rau_ray.serve.codecs import BadInput, decode_image, rle_decode, rle_encode


@pytest.mark.parametrize("seed", range(6))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, size=2)
    mask = rng.random((h, w)) < [0.0, 0.05, 0.5, 0.95, 1.0, 0.3][seed]
    rle = rle_encode(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_decode(rle), mask)


def test_rle_matches_coco_spec():
    # a 3x3 mask with the centre pixel set: column-major runs 4 zeros, 1 one, 4 zeros (pycocotools writes "414": the
    # first three counts as they are)
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    assert rle_encode(mask)["counts"] == "414"
    # uncompressed counts are accepted too
    np.testing.assert_array_equal(rle_decode({"size": [3, 3], "counts": [4, 1, 4]}), mask)
    # long runs need several characters, and deltas against the count two back may be negative
    big = np.zeros((100, 100), bool)
    big[10:90, 20:30] = True
    big[0:5, 60:99] = True
    np.testing.assert_array_equal(rle_decode(rle_encode(big)), big)


def test_rle_against_pycocotools():
    import pycocotools.mask as mask_utils  # a dev dependency: the reference implementation of COCO RLE
    rng = np.random.default_rng(1)
    m = rng.random((37, 23)) < 0.4
    ours = rle_encode(m)
    theirs = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert ours["counts"] == theirs["counts"].decode()


def _png(arr):
    return formats.encode_png(arr)


def test_decode_png_8_and_16_bit():
    grey = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    d = decode_image(_png(grey))
    assert d.kind == "png" and d.modality == "" and d.array.shape == (48, 64) and d.array.dtype == np.uint8
    hu = np.full((32, 32), 40.0)
    d = decode_image(_png(formats.hu_to_png16(hu)))
    assert d.modality == "CT" and np.allclose(d.array, 40.0)


def test_decode_jpeg():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(buf, format="JPEG")
    d = decode_image(buf.getvalue())
    assert d.kind == "jpeg" and d.array.shape == (20, 30)


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"hello, this is not an image at all", 415, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, 400, "unreadable"),
])
def test_bad_images(data, status, words):
    with pytest.raises(BadInput) as e:
        decode_image(data)
    assert e.value.status == status and words in e.value.message


def test_truncated_png():
    data = _png((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    with pytest.raises(BadInput) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.status == 400 and "unreadable" in e.value.message


def test_size_limits():
    data = _png(np.zeros((64, 64), np.uint8))
    with pytest.raises(BadInput) as e:
        decode_image(data, max_bytes=10)
    assert e.value.status == 413
    with pytest.raises(BadInput) as e:
        decode_image(data, max_pixels=32 * 32)
    assert e.value.status == 413 and "64x64" in e.value.message


def test_nifti_only_for_volumes(tmp_path):
    vol = np.zeros((16, 12, 3), np.int16)
    vol[4:8, 2:6, 1] = 100
    data = formats.encode_nifti(vol, (1.0, 1.5, 2.0))
    with pytest.raises(BadInput) as e:
        decode_image(data)
    assert e.value.status == 415 and "sessions" in e.value.message
    d = decode_image(data, volumes=True)
    assert d.is_volume and d.array.shape == (3, 12, 16) and d.spacing == (1.0, 1.5, 2.0)
    assert d.array[1].max() == 100


def test_dicom(tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns = "CT", 16, 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept, ds.PixelSpacing = 1, -1024, [0.5, 0.7]
    ds.PixelData = np.full((16, 16), 1064, np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    d = decode_image(buf.getvalue())
    assert d.kind == "dicom" and d.modality == "CT" and np.allclose(d.array, 40) and d.spacing == (0.7, 0.5)


def test_b64_and_mask_png():
    assert codecs.b64decode(base64.b64encode(b"abc").decode()) == b"abc"
    assert codecs.b64decode("data:image/png;base64," + base64.b64encode(b"abc").decode()) == b"abc"
    with pytest.raises(BadInput):
        codecs.b64decode("%%% not base64")
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    back = decode_image(codecs.mask_png(m)).array
    np.testing.assert_array_equal(back > 0, m)


# ------------------------------------------------------------------------------------------------- DICOM series
def _series_parts(positions):
    from dicom_files import slices

    parts = []
    for ds in slices(positions):
        buf = io.BytesIO()
        ds.save_as(buf)
        parts.append((ds.filename, buf.getvalue()))
    return parts


def _zip(files) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            z.writestr(name, data)
    return out.getvalue()


def test_series_as_parts_or_one_zip_is_one_volume_with_headers_for_dicom_seg():
    from dicom_files import RAW

    parts = _series_parts([2.5, 0.0, 5.0])
    for given in (parts, [("ct.zip", _zip(parts + [("__MACOSX/._s0.dcm", b"x"), ("sub/.DS_Store", b"x")]))]):
        d = codecs.decode_series(given)
        assert d.is_volume and d.array.shape == (3, 128, 128) and d.kind == "dicom" and d.modality == "CT"
        np.testing.assert_array_equal(d.array[0], RAW - 924)  # s1 (position 0, intercept -1024 + 100) first
        assert d.spacing == pytest.approx((0.661468, 0.661468, 2.5))
        assert [m.filename for m in d.sources] == ["s1.dcm", "s0.dcm", "s2.dcm"]
        assert all("PixelData" not in m and m.SOPInstanceUID for m in d.sources)  # headers only


def test_series_uploads_refused_with_the_reason():
    parts = _series_parts([0.0, 2.5])
    for given, status, words in [
        ([("../x.dcm", parts[0][1])], 422, "leaves the zip's root"),
        ([("/etc/x.dcm", parts[0][1])], 422, "leaves the zip's root"),
        ([("s.dcm", b"\0" * (9 * 2 ** 20))], 413, "the zip unpacks to more than"),
    ]:
        with pytest.raises(BadInput, match=words) as e:
            codecs.decode_series([("x.zip", _zip(given))], max_bytes=2 ** 20)
        assert e.value.status == status
    with pytest.raises(BadInput, match="unreadable zip"):
        codecs.decode_series([("x.zip", b"PK\x03\x04" + b"\0" * 100)])
    with pytest.raises(BadInput, match="a.txt: not a DICOM file") as e:
        codecs.decode_series(parts + [("a.txt", b"hello")])
    assert e.value.status == 415
    with pytest.raises(BadInput, match="two slices at one position") as e:
        codecs.decode_series(parts + [("again.dcm", parts[0][1])])
    assert e.value.status == 422
