"""Ray Serve, for real: the tiny app on the session's Ray cluster, real HTTP on loopback.

One app for the module (start-up ~40 s on 2 cores), short session TTL and a small session limit so expiry (410) and
the limit (429) are testable; a Segmenter replica is killed under load at the end.
"""

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from rau_ray.data import formats
from rau_ray.serve import codecs

pytestmark = pytest.mark.integration
TTL = 8.0
MAX_SESSIONS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(ray_cluster):
    from ray import serve

    from rau_ray.serve.app import start, stop

    url = start(profile="tiny", port=_free_port(), session_ttl_s=TTL, max_sessions=MAX_SESSIONS,
                max_image_bytes=2_000_000, max_pixels=512 * 512)
    yield url
    stop()
    assert not serve.status().applications


@pytest.fixture(scope="module")
def ct_png():
    """A phantom CT slice (16-bit PNG, HU + 1024) that shows the liver."""
    from rau_ray.data.phantoms import get_phantom

    samples = list(get_phantom("ct-abdomen").generate_2d(3, 11, size=128, slices=4))
    best = max(samples, key=lambda s: int((s.label == 1).sum()))
    return formats.encode_png(formats.hu_to_png16(best.image))


def post_image(base, path, png, **data):
    return requests.post(base + path, files={"image": ("x.png", png, "image/png")}, data=data, timeout=120)


def test_health_docs_and_page(base):
    assert requests.get(base + "/healthz").json() == {"status": "ok"}
    ready = requests.get(base + "/readyz").json()
    assert ready["ready"] and set(ready["deployments"]) == {"retriever", "policy", "segmenter", "commander"}
    paths = requests.get(base + "/openapi.json").json()["paths"]
    for p in ("/v1/segment", "/v1/label", "/v1/sessions", "/v1/sessions/{sid}", "/v1/sessions/{sid}/commands",
              "/v1/sessions/{sid}/mask", "/healthz", "/readyz"):
        assert p in paths, p
    assert "multipart/form-data" in paths["/v1/segment"]["post"]["requestBody"]["content"]
    assert "swagger" in requests.get(base + "/docs").text.lower()
    page = requests.get(base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_segment_multipart_and_json(base, ct_png):
    r = post_image(base, "/v1/segment", ct_png, structures="liver, spleen")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["structure"] for x in body["results"]] == ["liver", "spleen"]
    for x in body["results"]:
        mask = codecs.rle_decode(x["mask"])
        assert mask.shape == (128, 128)
        assert set(x) >= {"label", "box", "score", "reference", "reasoning", "timings_ms"}
        assert x["reference"]["id"].startswith("ct-abdomen-")
        assert {"retrieval", "policy", "segmenter", "total"} <= set(x["timings_ms"])
    r = requests.post(base + "/v1/segment", json={"image_b64": base64.b64encode(ct_png).decode(),
                                                  "structures": ["liver"], "mask_format": "png"})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["results"][0]["mask"])
    assert codecs.decode_image(png).array.shape == (128, 128)
    # a reference given by bank id, and one given as image + mask
    ref_id = body["results"][0]["reference"]["id"]
    r = post_image(base, "/v1/segment", ct_png, structures="liver", reference_id=ref_id)
    assert r.status_code == 200 and r.json()["results"][0]["reference"]["id"] == ref_id
    ref_mask = np.zeros((128, 128), np.uint8)
    ref_mask[30:70, 20:60] = 1
    r = requests.post(base + "/v1/segment", json={
        "image_b64": base64.b64encode(ct_png).decode(), "structures": ["blob"],
        "reference": {"image_b64": base64.b64encode(ct_png).decode(),
                      "mask_b64": base64.b64encode(formats.encode_png(ref_mask)).decode()}})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["reference"] == {"id": "client"}


def test_label(base, ct_png):
    r = post_image(base, "/v1/label", ct_png)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["regions"] and body["boxes_from"] in ("policy", "reference")
    r = requests.post(base + "/v1/label", json={"image_b64": base64.b64encode(ct_png).decode(),
                                                "boxes": [[20, 30, 60, 80], [70, 30, 100, 60]], "method": "fgw"})
    assert r.status_code == 200, r.text
    assert [x["box"] for x in r.json()["regions"]] == [[20, 30, 60, 80], [70, 30, 100, 60]]


def test_session_commands(base, ct_png):
    r = post_image(base, "/v1/sessions", ct_png)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def cmd(text):
        return requests.post(f"{base}/v1/sessions/{sid}/commands", json={"text": text}, timeout=120)

    r = cmd("add a point at 40,50")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["operations"] == [{"op": "add_point", "positive": True, "x": 40, "y": 50, "count": 1}]
    assert codecs.rle_decode(body["mask"]).shape == (128, 128) and body["session"]["can_undo"] == 1
    r = cmd("add a point at 60, 70")  # the same image: the Segmenter's cached embedding
    assert r.json()["results"][0]["cached_embedding"] is True
    r = cmd("undo")
    assert r.json()["session"]["points"] == [[40, 50, 1]] and r.json()["session"]["can_redo"] == 1
    r = cmd("bone window")
    assert r.json()["session"]["window"] == {"preset": "bone", "level": 400.0, "width": 1800.0}
    r = cmd("segment the liver then show metrics")
    assert r.status_code == 200, r.text
    assert r.json()["results"][1]["metrics"]["area_px"] == int(codecs.rle_decode(r.json()["mask"]).sum())
    for text, words in [("segment the heart", "unknown structure"), ("make me a sandwich", "not understood"),
                        ("add a point at 500, 5", "outside")]:
        r = cmd(text)
        assert r.status_code == 422 and words in r.json()["error"], (text, r.text)
    r = requests.post(f"{base}/v1/sessions/{sid}/commands", json={"operations": [{"op": "redo", "steps": 1}]})
    assert r.status_code == 200
    r = requests.get(f"{base}/v1/sessions/{sid}/mask")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert requests.get(f"{base}/v1/sessions/{sid}/mask?format=rle").json()["mask"]["size"] == [128, 128]
    assert requests.get(f"{base}/v1/sessions/{sid}/image").headers["content-type"] == "image/png"
    assert requests.delete(f"{base}/v1/sessions/{sid}").status_code == 204
    assert requests.get(f"{base}/v1/sessions/{sid}").status_code == 410
    assert requests.get(f"{base}/v1/sessions/never-issued").status_code == 404


def test_volume_session(base):
    vol = np.full((24, 20, 3), -100, np.int16)
    vol[6:14, 5:12, :] = 60
    r = requests.post(base + "/v1/sessions", files={"image": ("v.nii.gz", formats.encode_nifti(vol, (1, 1, 2)))})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["slices"] == 3
    r = requests.post(f"{base}/v1/sessions/{sid}/commands", json={"text": "go to slice 1 then add box 2 2 18 18"})
    assert r.status_code == 200, r.text
    r = requests.post(f"{base}/v1/sessions/{sid}/commands", json={"text": "propagate"})
    assert r.status_code in (200, 422), r.text  # 422: the tiny random SAM2 may return an empty mask to propagate
    r = requests.get(f"{base}/v1/sessions/{sid}/mask?format=nifti")
    assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"
    requests.delete(f"{base}/v1/sessions/{sid}")


def test_session_expiry_and_limit(base, ct_png):
    sids = []
    for _ in range(MAX_SESSIONS):
        r = post_image(base, "/v1/sessions", ct_png)
        assert r.status_code == 201, r.text
        sids.append(r.json()["id"])
    r = post_image(base, "/v1/sessions", ct_png)
    assert r.status_code == 429 and "limit" in r.json()["error"] and "Retry-After" in r.headers
    time.sleep(TTL + 1.5)
    r = requests.post(f"{base}/v1/sessions/{sids[0]}/commands", json={"text": "undo"})
    assert r.status_code == 410 and "expired" in r.json()["error"]
    assert post_image(base, "/v1/sessions", ct_png).status_code == 201  # expired sessions free their slots


def test_bad_input_is_4xx(base, ct_png):
    big = formats.encode_png((np.random.default_rng(0).random((1200, 1200)) * 255).astype(np.uint8))
    cases = [
        (post_image(base, "/v1/segment", b"definitely not an image", structures="liver"), 415, "not an image"),
        (post_image(base, "/v1/segment", ct_png[: len(ct_png) // 2], structures="liver"), 400, "unreadable"),
        (post_image(base, "/v1/segment", big, structures="liver"), 413, "limit"),
        (post_image(base, "/v1/segment", ct_png, structures="liver,heart"), 422, "known:"),
        (post_image(base, "/v1/segment", ct_png), 422, "structure"),
        (requests.post(base + "/v1/segment", data=b"{not json", headers={"content-type": "application/json"}),
         400, "malformed JSON"),
        (requests.post(base + "/v1/segment", json={"structures": ["liver"]}), 422, "missing image"),
        (requests.post(base + "/v1/segment", json={"image_b64": "@@@", "structures": ["liver"]}), 400, "base64"),
        (requests.post(base + "/v1/segment", data=b"x", headers={"content-type": "text/plain"}), 415, "content type"),
        (post_image(base, "/v1/segment", ct_png, structures="liver", reference_id="nope"), 422, "no reference"),
        (requests.post(base + "/v1/label", json={"image_b64": base64.b64encode(ct_png).decode(),
                                                 "boxes": [[5, 5, 1, 1]]}), 422, "boxes"),
        (requests.post(base + "/v1/sessions/missing/commands", json={"text": "undo"}), 404, "no session"),
        (requests.get(base + "/v1/sessions/missing/mask"), 404, "no session"),
    ]
    known = cases[3][0].json().get("known", [])
    assert "liver" in known
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["error"], (status, r.status_code, r.text)


def _replica_actors(deployment: str):
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]]


def test_segmenter_killed_under_load(base, ct_png):
    import ray

    r = post_image(base, "/v1/sessions", ct_png)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert requests.post(f"{base}/v1/sessions/{sid}/commands", json={"text": "add a point at 40,50"}).ok
    statuses, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                statuses.append(requests.post(f"{base}/v1/sessions/{sid}/commands",
                                              json={"text": "add a point at 41, 51"}, timeout=60).status_code)
            except requests.RequestException as e:  # a dropped connection would be a failure too
                statuses.append(repr(e))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(load) for _ in range(3)]
        time.sleep(1.0)
        victims = _replica_actors("Segmenter")
        assert victims
        for a in victims:
            ray.kill(ray.get_actor(a["name"], namespace="serve"), no_restart=True)
        time.sleep(4.0)
        stop.set()
        for f in futures:
            f.result()
    assert statuses and all(s in (200, 503) for s in statuses), statuses
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = requests.post(f"{base}/v1/sessions/{sid}/commands", json={"text": "add a point at 42, 52"}, timeout=60)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        time.sleep(1)
    assert r.status_code == 200, r.text
    state = r.json()["session"]  # the session survived the Segmenter's death
    assert len(state["points"]) >= 3 and state["can_undo"] >= 3
    requests.delete(f"{base}/v1/sessions/{sid}")
