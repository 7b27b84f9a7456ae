"""MONAI Label compatibility, for real: MONAI Label's own client against the shared local app (``local_app``).

``monailabel.client.MONAILabelClient`` (monailabel 0.8.5, unchanged) runs in its own virtual environment
(``.venv-monailabel``, made by ``make monailabel-client``, which ``make test`` runs first: the monailabel package's
dependencies clash with the stack) as a subprocess (``monailabel_client_script.py``): /info/, an upload into the
datastore, ``rau_segmentation`` of the liver on a phantom CT volume (NIfTI), a session and a ``sam2_interactive``
click on it, the session removed, an unknown model. The label volumes it saved are read here: on the uploaded
file's grid and affine, and where the liver is. Bad input is then sent over plain HTTP: each a 4xx naming the
problem, and the app keeps serving.
"""

import io
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from rau_ray.data import formats
from rau_ray.data.phantoms.ct_abdomen import generate_3d

REPO = Path(__file__).resolve().parents[2]
CLIENT_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"
SCRIPT = Path(__file__).with_name("monailabel_client_script.py")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A phantom CT volume (12 axial slices of 128 x 128, LPS storage) written as NIfTI, its liver mask, the slice
    with the most liver and a voxel inside the liver there."""
    sample = generate_3d(seed=11, subject=3, size=128, depth=12)
    path = tmp_path_factory.mktemp("monailabel") / "phantom.nii.gz"
    path.write_bytes(formats.encode_nifti(sample.image, sample.spacing))
    liver = sample.label == 1
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    inside = np.argwhere(liver[:, :, k])
    i, j = (int(v) for v in inside[np.argmin(((inside - inside.mean(0)) ** 2).sum(1))])
    return path, liver, k, [i, j, k]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_monailabel_client_against_the_app(local_app, phantom, tmp_path):
    path, liver, k, click = phantom
    assert CLIENT_PYTHON.is_file(), f"{CLIENT_PYTHON} is missing: `make monailabel-client` makes it (make test does)"
    spec = {"slice": k, "structures": ["liver"], "click": click}
    run = subprocess.run([str(CLIENT_PYTHON), str(SCRIPT), local_app, str(path), str(tmp_path), json.dumps(spec)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout)

    info = out["info"]
    assert "liver" in info["labels"] and "config" not in info
    assert info["models"]["rau_segmentation"]["type"] == "segmentation"
    assert info["models"]["sam2_interactive"]["type"] == "deepgrow"
    assert out["upload"]["image"] == "phantom" and "phantom" in out["datastore"]["objects"]

    source = nib.load(path)
    seg = out["segment"]["params"]
    assert seg["label_names"] == {"liver": 1} and seg["slice"] == k
    assert k in seg["structures"][0]["slices"] and seg["structures"][0]["reference"]["id"]
    labels = nib.load(out["segment"]["file"])
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine)
    pred = np.asarray(labels.dataobj) == 1
    assert dice(pred[:, :, k], liver[:, :, k]) > 0.8, dice(pred[:, :, k], liver[:, :, k])
    assert dice(pred, liver) > 0.8, dice(pred, liver)  # SAM2 carried it through the other slices

    sid = out["session"]["session_id"]
    assert out["get_session"]["name"] == sid and out["get_session"]["meta"]["slices"] == liver.shape[2]
    clicks = out["clicks"]["params"]
    assert clicks["label_names"] == {"liver": 1} and clicks["slice"] == k
    mask = np.asarray(nib.load(out["clicks"]["file"]).dataobj) == 1
    assert mask[tuple(click)] and not mask[:, :, [z for z in range(mask.shape[2]) if z != k]].any()
    assert dice(mask[:, :, k], liver[:, :, k]) > 0.8, dice(mask[:, :, k], liver[:, :, k])
    assert out["removed"]["name"] == sid
    assert out["after_remove"]["status"] == 410 and "deleted" in out["after_remove"]["msg"]
    assert "404" in out["unknown_model"]["msg"] and "deepedit_spleen" in out["unknown_model"]["msg"]

    # the same upload answers output=json (the params alone) and output=image (the file alone)
    r = requests.post(f"{local_app}/infer/sam2_interactive?image=phantom&output=json", timeout=60,
                      files={"params": (None, json.dumps({"foreground": [click]}))})
    assert r.status_code == 200 and r.json()["slice"] == k, r.text
    r = requests.post(f"{local_app}/infer/sam2_interactive?image=phantom&output=image", timeout=60,
                      files={"params": (None, json.dumps({"foreground": [click], "result_extension": ".nrrd"}))})
    assert r.status_code == 200 and r.content.startswith(b"NRRD0004"), r.text[:300]
    r = requests.post(f"{local_app}/infer/sam2_interactive?image=phantom&output=json", timeout=60,
                      json={"foreground": [click], "result_extension": ".nrrd"})  # OHIF posts the params as JSON
    assert r.status_code == 200 and r.json()["label_names"] == {"sam2": 1}, r.text
    assert requests.delete(f"{local_app}/datastore/image?id=phantom", timeout=30).status_code == 200


def test_bad_input_is_a_clear_4xx(local_app, phantom):
    path, _, k, click = phantom
    nifti = path.read_bytes()
    base = local_app

    def infer(model, query="", params=None, file=None):
        files = {"params": (None, json.dumps(params) if isinstance(params, dict) else (params or "{}"))}
        if file is not None:
            files["file"] = file
        return requests.post(f"{base}/infer/{model}{query}", files=files, timeout=120)

    cases = [
        (infer("deepedit_spleen", "?image=x"), 404, "no model 'deepedit_spleen'"),
        (infer("rau_segmentation"), 422, "no image"),
        (infer("rau_segmentation", "?image=never-uploaded"), 404, "no image 'never-uploaded'"),
        (infer("rau_segmentation", "?image=x", file=("notes.txt", b"hello " * 40)), 415, "not an image"),
        (requests.put(f"{base}/datastore/?image=notes", files={"file": ("notes.txt", b"hello " * 40)}, timeout=30),
         415, "not an image"),
        (requests.put(f"{base}/datastore/?image=half", files={"file": ("x.nii.gz", nifti[: len(nifti) // 2])},
                      timeout=30), 400, "unreadable NIfTI"),
        (infer("rau_segmentation", "?image=x", "{not json", ("v.nii.gz", nifti)), 422, "params is not JSON"),
        (infer("rau_segmentation", "?image=x", {"structures": ["heart"]}, ("v.nii.gz", nifti)), 422,
         "unknown structure(s) 'heart'"),
        (infer("rau_segmentation", "?image=x", {"structures": ["liver"], "slice": 99}, ("v.nii.gz", nifti)), 422,
         "params slice 99 is outside the image"),
        (infer("sam2_interactive", "?image=x", {"background": [click]}, ("v.nii.gz", nifti)), 422,
         "needs a foreground click"),
        (infer("sam2_interactive", "?image=x", {"foreground": [[500, 2, k]]}, ("v.nii.gz", nifti)), 422,
         "outside the image"),
        (infer("sam2_interactive", "?image=x&output=dicom_seg", {"foreground": [click]}, ("v.nii.gz", nifti)), 422,
         "DICOM-SEG needs a DICOM source"),
        (infer("sam2_interactive", "?image=x&output=png", {"foreground": [click]}, ("v.nii.gz", nifti)), 422,
         "output must be"),
        (requests.get(f"{base}/session/nope", timeout=30), 404, "no session 'nope'"),
        (requests.delete(f"{base}/datastore/image?id=nope", timeout=30), 404, "no image 'nope'"),
    ]
    for i, (r, status, message) in enumerate(cases):
        assert r.status_code == status and message in r.json()["error"], (i, r.status_code, r.text[:500])
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200  # still serving
    assert requests.get(f"{base}/info/", timeout=30).status_code == 200


def test_a_dicom_series_session_answers_a_dicom_seg(local_app):
    """A DICOM series opened as a MONAI Label session (PUT /session/, one file per slice): a click on slice 1 answers
    output=dicom_seg, a DICOM-SEG that references the uploaded instances; several structures are refused for it."""
    import highdicom as hd
    import pydicom
    from dicom_files import slices

    series = slices([0.0, 2.5, 5.0])
    files = []
    for ds in series:
        buf = io.BytesIO()
        ds.save_as(buf)
        files.append(("files", (ds.filename, buf.getvalue(), "application/dicom")))
    r = requests.put(f"{local_app}/session/", files=files, timeout=60)
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    assert r.json()["session_info"]["meta"]["source_format"] == "dicom"
    params = {"foreground": [[64, 64, 1]], "label": "liver"}  # no NIfTI grid: [column, row, slice]
    r = requests.post(f"{local_app}/infer/sam2_interactive?session_id={sid}&output=dicom_seg", timeout=60,
                      files={"params": (None, json.dumps(params))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text[:300]
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(r.content))
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in series}
    r = requests.post(f"{local_app}/infer/rau_segmentation?session_id={sid}&output=dicom_seg", timeout=120,
                      files={"params": (None, json.dumps({"structures": ["liver", "spleen"], "slice": 1}))})
    assert r.status_code == 422 and "one structure a request" in r.json()["error"], r.text[:300]
    assert requests.delete(f"{local_app}/session/{sid}", timeout=30).status_code == 200
