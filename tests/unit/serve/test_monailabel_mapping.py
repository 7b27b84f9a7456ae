"""The MONAI Label translation without a server: /info/'s shape, params, the voxel geometry of uploaded NIfTI files
(every axis order and flip), the label files (NIfTI on the upload's grid, NRRD) and the multipart answer."""

import email.parser
import gzip
import itertools
import json

import nibabel as nib
import numpy as np
import pytest

from rau_ray.serve import codecs
from rau_ray.serve import monailabel_mapping as mm
from rau_ray.serve.codecs import BadInput

KNOWN = ["liver", "spleen", "right kidney"]


def test_info_has_what_the_clients_read():
    info = mm.info_body(KNOWN, "0.1.0", {"total": 0, "completed": 0, "label_tags": {}})
    assert "config" not in info  # 3D Slicer takes a top-level config as an outdated server
    assert info["labels"] == KNOWN
    seg, clicks = info["models"]["rau_segmentation"], info["models"]["sam2_interactive"]
    assert seg["type"] == "segmentation" and seg["labels"] == {"liver": 1, "spleen": 2, "right kidney": 3}
    assert clicks["type"] == "deepgrow" and clicks["dimension"] == 2  # Slicer's Smart Edit: foreground/background
    assert seg["config"]["structures"] == ["all", *KNOWN]  # a combo box in Slicer; its first value is sent
    for m in info["models"].values():
        assert {"type", "labels", "dimension", "description", "config"} <= set(m)


def test_params_and_structures():
    assert mm.parse_params('{"structures": ["liver"]}') == {"structures": ["liver"]}
    assert mm.parse_params(None) == {} and mm.parse_params("") == {} and mm.parse_params("null") == {}
    for bad, message in (("{nope", "not JSON"), ("[1, 2]", "JSON object")):
        with pytest.raises(BadInput, match=message) as e:
            mm.parse_params(bad)
        assert e.value.status == 422
    assert mm.pick_structures("all", KNOWN, 16) == KNOWN
    assert mm.pick_structures(None, KNOWN, 16) == KNOWN
    assert mm.pick_structures("Spleen, liver,spleen", KNOWN, 16) == ["spleen", "liver"]
    with pytest.raises(BadInput, match="unknown structure.*'heart'.*known: liver, spleen"):
        mm.pick_structures(["liver", "heart"], KNOWN, 16)
    with pytest.raises(BadInput, match="at most 2"):
        mm.pick_structures("all", KNOWN, 2)
    assert mm.flag("false", True) is False and mm.flag(None, True) is True and mm.flag(True, False) is True
    with pytest.raises(BadInput, match="true or false"):
        mm.flag("maybe", True)
    assert mm.points([[1, 2, 3], [4, 5]], "foreground") == [(1, 2, 3), (4, 5)]
    for bad in ([[1]], [["a", 2, 3]], [[1.5, 2, 3]], "1,2,3"):
        with pytest.raises(BadInput, match="foreground"):
            mm.points(bad, "foreground")
    assert mm.roi([1, 9, 2, 8, 3, 3]) == ((1, 2, 3), (9, 8, 3)) and mm.roi([]) is None
    with pytest.raises(BadInput, match="roi"):
        mm.roi([1, 2, 3])
    assert mm.result_extension({}) == ".nii.gz" and mm.result_extension({"result_extension": ".nrrd"}) == ".nrrd"
    with pytest.raises(BadInput, match="result_extension"):
        mm.result_extension({"result_extension": ".mha"})
    assert mm.output_kind(None) == "all"
    with pytest.raises(BadInput, match="output must be"):
        mm.output_kind("png")
    assert mm.safe_name("/tmp/x y/../CT scan.nii.gz") == "CT_scan" and mm.safe_name("") == "image"


def test_a_nifti_session_sees_slices_as_the_models_were_trained_on_them():
    """codecs decodes a NIfTI into the radiological 2D view of the training data (rau_ray.data.importers): the
    phantom's 3D volume, written as NIfTI and decoded, is slice for slice its 2D render (not its mirror image)."""
    from rau_ray.data import formats
    from rau_ray.data.phantoms.ct_abdomen import draw_subject, generate_3d, render_slice

    volume = generate_3d(seed=5, subject=2, size=32, depth=6)
    session = codecs.decode_image(formats.encode_nifti(volume.image, volume.spacing), volumes=True).array
    for k in range(6):
        hu, _ = render_slice(draw_subject(5, 2), 5, 2, k, 32, 6)
        assert (session[k] == hu).all(), k


def _nifti(vol, perm, flips, spacing=(0.7, 0.8, 2.5)):
    """NIfTI bytes of ``vol`` whose file axis a points along RAS axis perm[a], flipped where flips[a] is -1."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for a, (c, f) in enumerate(zip(perm, flips)):
        affine[c, a] = f * spacing[a]
    affine[:3, 3] = [10.0, -5.0, 3.0]
    return nib.Nifti1Image(vol, affine).to_bytes(), affine


@pytest.mark.parametrize("perm,flips", [(p, f) for p in itertools.permutations(range(3))
                                        for f in itertools.product((1, -1), repeat=3)])
def test_geometry_maps_file_voxels_to_the_session_and_back(perm, flips):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, (9, 10, 11)).astype(np.int16)
    data, affine = _nifti(vol, perm, flips)
    session = codecs.decode_image(data, volumes=True).array  # what a session holds: (slice, row, column)
    geo = mm.Geometry.from_nifti(data)
    assert geo.shape == (9, 10, 11) and np.allclose(geo.affine, affine)
    for ijk in itertools.product((0, 4, 8), (0, 9), (0, 5, 10)):
        z, row, col = geo.to_session(ijk)
        assert session[z, row, col] == vol[ijk]
        assert geo.from_session_point(z, row, col) == ijk
    assert (geo.from_session(session) == vol).all()
    name, body, media = mm.label_file((session % 7).astype(np.uint8), geo, None, "out")
    back = nib.Nifti1Image.from_bytes(gzip.decompress(body))
    assert name == "out.nii.gz" and media == "application/gzip"
    assert np.allclose(back.affine, affine) and (np.asarray(back.dataobj) == vol % 7).all()
    if perm[2] == 2:  # the third voxel axis is the axial one: params slice k is a session slice
        for k in (0, 10):
            z = geo.slice_to_z(k)
            assert geo.z_to_slice(z) == k and geo.to_session((0, 0, k))[0] == z
    else:
        with pytest.raises(BadInput, match="not the axial one"):
            geo.slice_to_z(0)


def test_key_slice_and_points_without_geometry():
    assert mm.key_slice(None, 5, None) is None and mm.key_slice(-1, 5, None) is None
    assert mm.key_slice(3, 5, None) == 3
    with pytest.raises(BadInput, match="outside the image: it has 5 slice"):
        mm.key_slice(5, 5, None)
    assert mm.session_point((4, 7, 2), None, None) == (2, 7, 4)  # DICOM / PNG: i column, j row, k slice
    assert mm.session_point((4, 7), None, 3) == (3, 7, 4)  # a 2D click takes params slice
    assert mm.Geometry.from_nifti(b"\x89PNG\r\n\x1a\n" + b"\0" * 400) is None


def test_label_file_without_geometry_and_nrrd():
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 0, 4] = 2  # slice 1, top row, last column
    name, body, _ = mm.label_file(labels, None, (0.5, 0.6, 2.0), "x", ".nii")
    img = nib.Nifti1Image.from_bytes(body)
    assert name == "x.nii" and img.shape == (5, 4, 3) and np.allclose(np.diag(img.affine)[:3], (0.5, 0.6, 2.0))
    assert img.get_fdata()[0, 3, 1] == 2  # RAS+: the last column is the patient's left (x 0), the top row anterior
    vol = (np.arange(8 * 9 * 4) % 251).astype(np.uint8).reshape(8, 9, 4)
    data, affine = _nifti(vol.astype(np.int16), (0, 1, 2), (-1, -1, 1))
    geo = mm.Geometry.from_nifti(data)
    session = codecs.decode_image(data, volumes=True).array.astype(np.uint8)
    name, body, _ = mm.label_file(session, geo, None, "x", ".nrrd")
    header, raw = body.split(b"\n\n", 1)
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[2:])
    assert fields["sizes"] == "8 9 4" and fields["encoding"] == "raw" and fields["type"] == "uint8"
    assert fields["space"] == "right-anterior-superior" and fields["space directions"].startswith("(-0.7,0,0)")
    assert (np.frombuffer(raw, np.uint8).reshape((8, 9, 4), order="F") == vol).all()


def test_multipart_answer_parses_as_a_form():
    body, ctype = mm.multipart({"label_names": {"liver": 1}}, "out.nii.gz", b"\x1f\x8bDATA\r\n--", "application/gzip")
    msg = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
    assert json.loads(parts["params"].get_payload(decode=True)) == {"label_names": {"liver": 1}}
    assert parts["image"].get_filename() == "out.nii.gz"
    assert parts["image"].get_payload(decode=True) == b"\x1f\x8bDATA\r\n--"
