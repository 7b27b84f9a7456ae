"""`rau data make / import / preview` end to end: real CLI processes on the session's real Ray cluster."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rau_ray.data import formats
from rau_ray.data.manifest import read_manifest
from rau_ray.data.phantoms import ct_abdomen


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_is_parallel_deterministic_and_loadable(run_cli, tmp_path):
    args = ["data", "make", "--modality", "ct-abdomen", "--n", "6", "--size", "96", "--seed", "5"]
    a = run_cli(*args, "--out", tmp_path / "a")
    assert a.returncode == 0, a.stderr
    summary = json.loads(a.stdout)
    assert summary["samples"] == 24 and summary["files"] == 48
    assert "100%" in a.stderr  # the progress bar ran to the end
    b = run_cli(*args, "--out", tmp_path / "b", "--backend", "local")
    c = run_cli(*args[:-1], "6", "--out", tmp_path / "c")
    assert b.returncode == 0 and c.returncode == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # Ray and one process write the same bytes
    assert digest(tmp_path / "a") != digest(tmp_path / "c")  # another seed, other data
    m = read_manifest(tmp_path / "a")
    assert {r.split for r in m.rows} == {"train", "val", "test"}
    for subject in {r.subject for r in m.rows}:  # splits are per subject
        assert len({r.split for r in m.rows if r.subject == subject}) == 1
    image, label = m.load(m.rows[0])
    assert image.dtype == np.float32 and image.min() >= -1024 and label.max() <= 11


def test_all_modalities(run_cli, tmp_path):
    for name, modality in [("xray-angio", "XA"), ("ultrasound", "US"), ("xray-msk", "DX")]:
        r = run_cli("data", "make", "--modality", name, "--n", "3", "--size", "64", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        m = read_manifest(tmp_path / name)
        assert len(m) == 3 and {row.modality for row in m.rows} == {modality}
        if name != "xray-angio":
            assert {row.split for row in m.rows} == {"test"}  # out-of-distribution sets are never trained on
    r = run_cli("data", "preview", tmp_path / "xray-angio", tmp_path / "xray-msk", "--out", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / "grid.png")
    assert img.width > 400 and img.height > 400
    assert np.asarray(img.convert("RGB")).std() > 10  # a picture, not a blank page


def test_3d_volumes_import_back_to_the_same_slices(run_cli, tmp_path):
    r = run_cli("data", "make", "--modality", "ct-abdomen", "--n", "2", "--dims", "3", "--size", "64",
                "--out", tmp_path / "vol")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "vol" / "dataset.json").read_text())
    assert info["labels"]["liver"] == 1 and info["channel_names"] == {"0": "CT"}
    r = run_cli("data", "import", "--dataset-json", tmp_path / "vol" / "dataset.json", "--out", tmp_path / "imp")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "imp")
    assert {row.subject for row in m.rows} == {"ctabdomen_s0000", "ctabdomen_s0001"}
    # the imported slice equals the phantom's own 2D slice: orientation, HU and labels survive the round trip
    params = ct_abdomen.draw_subject(0, 1)
    for row in [r for r in m.rows if r.subject == "ctabdomen_s0001"][::7]:
        image, label = m.load(row)
        hu, lab = ct_abdomen.render_slice(params, 0, 1, row.slice, 64)
        assert np.array_equal(label, lab)
        assert np.array_equal(image, hu.astype(np.float32))
        assert row.spacing == (360 / 64, 360 / 64)
    r = run_cli("data", "preview", tmp_path / "vol", "--out", tmp_path / "vol.png")
    assert r.returncode == 0, r.stderr


def test_import_msd_layout(run_cli, tmp_path):
    """MSD style: labels {"1": name}, modality {"0": "MRI"}, a training list; a non-CT volume becomes 8-bit."""
    root = tmp_path / "Task99_Test"
    vol = np.zeros((20, 24, 6), np.float32)
    vol[5:15, 6:18, :] = 300.0
    lab = np.zeros((20, 24, 6), np.uint8)
    lab[8:12, 8:16, 2:5] = 1
    formats.write_nifti(root / "imagesTr" / "case_1.nii.gz", vol, (1.0, 1.5, 3.0))
    formats.write_nifti(root / "labelsTr" / "case_1.nii.gz", lab, (1.0, 1.5, 3.0))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Test", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/case_1.nii.gz", "label": "./labelsTr/case_1.nii.gz"}]}))
    r = run_cli("data", "import", "--dataset-json", root / "dataset.json", "--out", tmp_path / "out",
                "--min-pixels", "1", "--backend", "local")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "out")
    assert [row.slice for row in m.rows] == [2, 3, 4]
    row = m.rows[0]
    assert row.modality == "MR" and row.labels == {"1": "tumour"} and row.spacing == (1.0, 1.5)
    image, label = m.load(row)
    assert image.dtype == np.uint8 and image.shape == (24, 20) and (label == 1).sum() == 32


def test_import_a_dicom_folder_with_its_seg_and_refuse_an_unannotated_one(run_cli, tmp_path):
    """``--dicom``: a series + its DICOM-SEG (on Ray tasks) -> the labelled slices; a folder without a SEG -> exit 2
    with the reason, no traceback."""
    import pydicom
    from dicom_files import save, slices, write_seg

    datasets = slices([0.0, 2.5, 5.0])
    folder = save(tmp_path / "export" / "ct", datasets)
    mask = np.zeros((3, 128, 128), bool)
    mask[1, 40:80, 30:90] = True
    write_seg(tmp_path / "export" / "seg.dcm", [pydicom.dcmread(folder / ds.filename) for ds in datasets],
              {"liver": mask})
    r = run_cli("data", "import", "--dicom", tmp_path / "export", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "out")
    assert [(row.slice, row.labels, row.modality) for row in m.rows] == [(1, {"1": "liver"}, "CT")]
    assert (m.load(m.rows[0])[1] == 1).sum() == mask.sum()
    r = run_cli("data", "import", "--dicom", folder, "--out", tmp_path / "out2")
    assert r.returncode == 2 and "no DICOM-SEG found: 1 series, none annotated" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_subcommands(run_cli):
    r = run_cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "data" in r.stdout
    r = run_cli("data", "--help")
    assert all(cmd in r.stdout for cmd in ("make", "import", "preview"))


def test_bad_input_is_a_clear_error_without_traceback(run_cli, tmp_path):
    def fails(*args, expect):
        r = run_cli(*args)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and 'File "' not in r.stderr and expect in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr

    fails("data", "make", "--modality", "xray-angio", "--n", "2", "--dims", "3", "--out", tmp_path / "x",
          expect="is 2D only")
    fails("data", "import", "--dataset-json", tmp_path / "none.json", "--out", tmp_path / "o",
          expect="dataset.json not found")
    (tmp_path / "bad.json").write_text("{not json")
    fails("data", "import", "--dataset-json", tmp_path / "bad.json", "--out", tmp_path / "o",
          expect="not valid JSON")
    fails("data", "preview", tmp_path, "--out", tmp_path / "p.png", expect="neither manifest.jsonl nor dataset.json")

    # a truncated NIfTI inside a dataset: the error names that file
    r = run_cli("data", "make", "--modality", "ct-abdomen", "--n", "1", "--dims", "3", "--size", "48",
                "--out", tmp_path / "vol")
    assert r.returncode == 0, r.stderr
    label_file = tmp_path / "vol" / "labelsTr" / "ctabdomen_s0000.nii.gz"
    label_file.write_bytes(label_file.read_bytes()[:300])
    fails("data", "import", "--dataset-json", tmp_path / "vol" / "dataset.json", "--out", tmp_path / "o2",
          expect="ctabdomen_s0000.nii.gz")
    assert not (tmp_path / "o2" / "manifest.jsonl").exists()

    # label values the dataset does not name
    r = run_cli("data", "make", "--modality", "ct-abdomen", "--n", "1", "--dims", "3", "--size", "48",
                "--out", tmp_path / "vol2")
    info = json.loads((tmp_path / "vol2" / "dataset.json").read_text())
    info["labels"] = {"background": 0, "liver": 1}
    (tmp_path / "vol2" / "dataset.json").write_text(json.dumps(info))
    fails("data", "import", "--dataset-json", tmp_path / "vol2" / "dataset.json", "--out", tmp_path / "o3",
          expect="not in the label names")


def test_interrupted_make_leaves_no_half_written_file(ray_cluster, tmp_path):
    out = tmp_path / "big"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.Popen([sys.executable, "-m", "rau_ray.cli", "data", "make", "--modality", "ct-abdomen",
                             "--n", "2000", "--size", "128", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # Ctrl-C as a terminal gives it, also when the suite itself runs as a background job
                            # (whose children inherit SIGINT ignored, and Python then never raises KeyboardInterrupt)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("images/*.png"))) < 8:
        time.sleep(0.2)
    # 2,000 subjects take minutes: a loaded machine that polls late still interrupts it (400 once finished first)
    assert proc.poll() is None, "the make finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    written = sorted(out.rglob("*.png"))
    assert 8 <= len(written) < 16000  # 8 images a subject: interrupted before the end
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.jsonl").exists()
    for p in written:  # every file that exists is whole
        formats.read_png_image(p)
