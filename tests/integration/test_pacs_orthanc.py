"""A PACS over DICOMweb, for real: Orthanc (Debian orthanc + orthanc-dicomweb, ``make install``) started on loopback
with its storage in a temp folder and stopped by PID; a phantom CT series (8 slices, 128 px) stored in it with
dicomweb-client (STOW-RS). ``rau pacs segment`` (a subprocess; every slice) and ``POST /v1/pacs/segment`` (the
shared ``local_app``; key slice + propagation) each find the series (QIDO-RS), fetch it (WADO-RS), segment liver and
spleen and store a DICOM-SEG (STOW-RS); the test then finds that SEG in Orthanc, reads it back with highdicom: it
references the series' instances, its segments are the structures, its frames are the masks returned (the route) /
counted (the CLI).
Failures: nothing listening, servers that are not a PACS (the app's own /healthz base, a server answering 404), a
PACS answering 500, one that accepts and never answers, and a PACS that stops answering at the store (a proxy in
front of Orthanc holding STOW-RS) -> 502 / 504 naming the URL, nothing stored, and the app still answers /healthz."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from rau_ray.data.phantom_dicom import phantom_ct_series
from rau_ray.orthanc import LocalOrthanc
from rau_ray.serve import codecs

REPO = Path(__file__).resolve().parents[2]
STRUCTURES = ["liver", "spleen"]
SUBJECT, SLICES, SIZE = 3, 8, 128


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = LocalOrthanc(tmp_path_factory.mktemp("orthanc"))  # a ConfigError naming `make install` if not installed
    pacs.start()
    pid = pacs.pid
    yield pacs
    pacs.stop()
    with pytest.raises(ProcessLookupError):  # stopped by its PID: gone
        os.kill(pid, 0)


@pytest.fixture(scope="module")
def study(orthanc):
    datasets, labels = phantom_ct_series(SUBJECT, slices=SLICES, size=SIZE)
    DICOMwebClient(orthanc.dicomweb_url).store_instances(datasets)
    return datasets, labels


def seg_series(orthanc, study_uid: str) -> list[str]:
    """The SEG series of the study, found by QIDO-RS."""
    found = DICOMwebClient(orthanc.dicomweb_url).search_for_series(study_instance_uid=study_uid,
                                                                   search_filters={"Modality": "SEG"})
    return [r["0020000E"]["Value"][0] for r in found]


def read_seg(orthanc, study_uid: str, series_uid: str):
    (ds,) = DICOMwebClient(orthanc.dicomweb_url).retrieve_series(study_uid, series_uid)
    return hd.seg.Segmentation.from_dataset(ds)


def check_seg(seg, datasets) -> np.ndarray:
    """The SEG references the series' instances and is labelled with the structures; returns its pixels (Z, H, W, S)
    in the series' slice order."""
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    refs = seg.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence} == set(uids)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == STRUCTURES
    assert {d.SegmentAlgorithmType for d in seg.SegmentSequence} == {"AUTOMATIC"}
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                             assert_missing_frames_are_empty=True).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


# -------------------------------------------------------------------------------------------------- the CLI
def rau(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rau_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_segments_a_study_and_stores_the_seg_in_orthanc(orthanc, study):
    datasets, labels = study
    uid = datasets[0].StudyInstanceUID
    r = rau("pacs", "segment", "--url", orthanc.dicomweb_url, "--study", uid, "--structures", ",".join(STRUCTURES))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert f"fetch: {SLICES} slices of series {datasets[0].SeriesInstanceUID}" in r.stderr
    assert "segment: liver" in r.stderr and f"store: DICOM-SEG {out['seg']['sop_instance_uid']}" in r.stderr
    assert out["series"]["uid"] == datasets[0].SeriesInstanceUID and out["series"]["slices"] == SLICES
    assert out["mode"] == "every slice" and all(len(s["tried"]) == SLICES for s in out["structures"])
    assert all(out["timings_s"][k] > 0 for k in ("fetch", "segment", "store", "qido", "wado", "stow"))
    assert out["seg"]["series_uid"] in seg_series(orthanc, uid)
    pixels = check_seg(read_seg(orthanc, uid, out["seg"]["series_uid"]), datasets)
    for i, s in enumerate(out["structures"]):
        assert s["name"] == STRUCTURES[i] and s["voxels"] == int(pixels[..., i].sum())
        assert s["slices"] == [int(k) for k in np.flatnonzero(pixels[..., i].any(axis=(1, 2)))]
    assert dice(pixels[..., 0], labels == 1) > 0.7  # the liver, on the right slices: frames follow the instances


def test_cli_errors_are_one_line_naming_the_problem(orthanc, study):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nothing = f"http://127.0.0.1:{s.getsockname()[1]}/dicom-web"
    uid = study[0][0].StudyInstanceUID
    for url, study_uid, says in ((nothing, uid, f"error: cannot reach the PACS at {nothing}"),
                                 (orthanc.url, uid, f"error: {orthanc.url} is not a DICOMweb service"),
                                 (orthanc.dicomweb_url, "1.2.3.4", "error: study 1.2.3.4 is not at the PACS")):
        r = rau("pacs", "segment", "--url", url, "--study", study_uid, "--structures", "liver", timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ the route
def test_route_segments_a_study_and_stores_the_seg_in_orthanc(local_app, orthanc, study):
    datasets, labels = study
    uid = datasets[0].StudyInstanceUID
    before = seg_series(orthanc, uid)
    r = requests.post(local_app + "/v1/pacs/segment", json={"url": orthanc.dicomweb_url, "study": uid, "masks": True,
                                                            "structures": "liver, spleen", "propagate": True},
                      timeout=600)
    assert r.status_code == 200, r.text[:2000]
    out = r.json()
    assert out["mode"] == "key slice + propagation"  # the CLI test runs the default, every slice
    assert out["series"]["instance_uids"] == [str(ds.SOPInstanceUID) for ds in datasets]
    assert set(seg_series(orthanc, uid)) - set(before) == {out["seg"]["series_uid"]}
    pixels = check_seg(read_seg(orthanc, uid, out["seg"]["series_uid"]), datasets)
    for i, s in enumerate(out["structures"]):
        returned = np.stack([codecs.rle_decode(m) for m in s["mask"]])
        np.testing.assert_array_equal(pixels[..., i], returned)  # the stored frames are the masks returned
        assert s["voxels"] == int(returned.sum()) > 0
    assert dice(pixels[..., 0], labels == 1) > 0.7
    assert all(out["timings_s"][k] > 0 for k in ("fetch", "segment", "store"))


class Answers(BaseHTTPRequestHandler):
    """A server that is not a PACS: 404 for everything."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", "9")
        self.end_headers()
        self.wfile.write(b"not here\n")

    def log_message(self, *args):
        pass


class Proxy(BaseHTTPRequestHandler):
    """In front of Orthanc: forwards GETs, except WADO-RS when ``server.fail_wado`` (answered 500); a POST (STOW-RS)
    is held unanswered until the test ends, as a PACS that stops answering at the store."""

    def do_GET(self):  # noqa: N802
        if self.server.fail_wado and "/series/" in self.path:
            return self._send(500, b'{"Message": "disk failure"}', "application/json")
        request = urllib.request.Request(self.server.target + self.path, headers={
            k: v for k, v in self.headers.items() if k.lower() in ("accept",)})
        try:
            with urllib.request.urlopen(request, timeout=30) as up:
                self._send(up.status, up.read(), up.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as e:
            self._send(e.code, e.read(), e.headers.get("Content-Type", ""))

    def do_POST(self):  # noqa: N802
        self.server.posts.append(self.path)
        self.server.release.wait(120)  # never answered while the test looks

    def _send(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def servers(orthanc):
    """(a 404 server's URL, a hanging socket's URL, the proxy in front of Orthanc)."""
    not_pacs = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    proxy.target, proxy.fail_wado, proxy.posts, proxy.release = orthanc.url, False, [], threading.Event()
    proxy.url = f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web"
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # accepts (the kernel does), never reads, never answers
    for s in (not_pacs, proxy):
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield (f"http://127.0.0.1:{not_pacs.server_address[1]}/dicom-web",
           f"http://127.0.0.1:{hang.getsockname()[1]}/dicom-web", proxy)
    proxy.release.set()
    for s in (not_pacs, proxy):
        s.shutdown()
        s.server_close()
    hang.close()


def test_route_errors_are_502_504_with_the_reason_and_the_app_keeps_serving(local_app, orthanc, study, servers):
    not_pacs, hanging, proxy = servers
    uid = study[0][0].StudyInstanceUID
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nothing = f"http://127.0.0.1:{s.getsockname()[1]}/dicom-web"
    cases = [
        (nothing, {}, 502, f"cannot reach the PACS at {nothing}"),
        (local_app + "/healthz", {}, 502, f"{local_app}/healthz is not a DICOMweb service"),
        (not_pacs, {}, 502, f"{not_pacs} is not a DICOMweb service"),
        (hanging, {"timeout_s": 1}, 504, f"the PACS at {hanging} (QIDO-RS search for the series of study {uid}) did "
                                         "not answer within 1 s"),
        (orthanc.dicomweb_url, {"study": "1.2.3.4"}, 404, "study 1.2.3.4 is not at the PACS"),
        (orthanc.dicomweb_url, {"structures": ["liver", "heart"]}, 422, "unknown structure(s) 'heart'"),
        ("ftp://pacs", {}, 422, "the PACS URL must be an http(s) URL"),
    ]
    for url, extra, status, says in cases:
        body = {"url": url, "study": uid, "structures": ["liver"], **extra}
        r = requests.post(local_app + "/v1/pacs/segment", json=body, timeout=120)
        assert r.status_code == status and says in r.json()["error"], (url, r.status_code, r.text[:1000])
        assert requests.get(local_app + "/healthz", timeout=10).status_code == 200  # still serving
    proxy.fail_wado = True  # a PACS answering an error to WADO-RS
    r = requests.post(local_app + "/v1/pacs/segment", json={"url": proxy.url, "study": uid, "structures": ["liver"]},
                      timeout=120)
    assert r.status_code == 502 and "WADO-RS retrieval" in r.json()["error"], r.text[:1000]
    assert "answered 500 Internal Server Error" in r.json()["error"] and "disk failure" in r.json()["error"]


def test_route_a_pacs_silent_at_the_store_is_504_and_nothing_is_stored(local_app, orthanc, study, servers):
    _, _, proxy = servers
    uid = study[0][0].StudyInstanceUID
    before = seg_series(orthanc, uid)
    r = requests.post(local_app + "/v1/pacs/segment", json={"url": proxy.url, "study": uid, "structures": ["liver"],
                                                            "timeout_s": 3}, timeout=600)
    assert r.status_code == 504, r.text[:1000]
    assert "STOW-RS store of instance" in r.json()["error"] and "did not answer within 3 s" in r.json()["error"]
    assert len(proxy.posts) == 1  # fetched and segmented through the proxy; the store went out once, unanswered
    assert seg_series(orthanc, uid) == before  # nothing half-stored
    assert requests.get(local_app + "/healthz", timeout=10).status_code == 200

