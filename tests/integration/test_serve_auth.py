"""Access control on a real Serve app (the tiny app on the session's Ray cluster, real HTTP on loopback), ONE app
for the module with API keys on (a keys file made with ``rau_ray.serve.keys``, as ``rau keys add`` makes it), two
sessions per key, 30 requests a minute per key, an audit log in a temp folder and one CORS origin.
Covered: 401 without a key, with a wrong one and with one revoked while the app runs (the file re-read, no
restart); 200 with a good key on /v1/segment, the session routes and MONAI Label's; 403 on another key's session
(which is left as it was); 429 at the per-key session limit and over the per-key rate, with Retry-After; /auth/ and
/auth/token, and MONAI Label's own client logging in as 3D Slicer's module does; CORS only for the listed origin;
three users clicking at once, each seeing only their own session; the audit log holds the actions with ids only: no
key text, no patient name from an uploaded DICOM.
"""

import importlib.util
import io
import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from rau_ray.data import formats
from rau_ray.serve import keys

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("serve_users", REPO / "benchmarks" / "serve_users.py")
serve_users = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_users)
CLIENT_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"
SCRIPT = Path(__file__).with_name("monailabel_client_script.py")
RPM = 30
ORIGIN = "http://viewer.test"
PATIENT = "Doe^Jane"


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from rau_ray.serve.app import start, stop

    folder = tmp_path_factory.mktemp("auth")
    path = folder / "keys.json"
    made = {name: keys.add_key(path, name) for name in ("alice", "bob", "carol", "rate", "slicer", "u1", "u2", "u3")}
    audit = folder / "audit.jsonl"
    url = start(profile="tiny", port=free_port(), api_keys_file=str(path), max_sessions_per_key=2,
                requests_per_minute_per_key=RPM, audit_log=str(audit), cors_origins=[ORIGIN], timeout_s=300)
    yield {"url": url, "keys": made, "file": path, "audit": audit, "folder": folder}
    stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def ct_png():
    from rau_ray.data.phantoms import get_phantom

    sample = max(get_phantom("ct-abdomen").generate_2d(3, 11, size=96, slices=4),
                 key=lambda s: int((s.label == 1).sum()))
    return formats.encode_png(formats.hu_to_png16(sample.image))


def dicom_with_patient_name() -> tuple[bytes, str]:
    from dicom_files import slices

    (ds,) = slices([0.0])
    ds.PatientName, ds.PatientID = PATIENT, "PID-4711"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue(), ds.filename


def open_session(app, key, png):
    return requests.post(app["url"] + "/v1/sessions", headers=bearer(key), timeout=60,
                         files={"image": ("x.png", png, "image/png")})


def test_missing_wrong_and_revoked_keys_are_401(app):
    url, k = app["url"], app["keys"]
    for path in ("/healthz", "/readyz", "/", "/auth/"):  # open: health, the page's shell, MONAI Label's auth check
        assert requests.get(url + path, timeout=30).status_code == 200, path
    r = requests.get(url + "/v1/structures", timeout=30)
    assert r.status_code == 401 and "API key is required" in r.json()["error"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    name, secret = keys.split_key(k["alice"])
    for wrong in (f"{name}.{secret[::-1]}", "alice", "Basic abc"):
        r = requests.get(url + "/v1/structures", headers=bearer(wrong), timeout=30)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers, wrong
        assert secret not in r.text
    r = requests.put(url + "/session/", headers=bearer("nobody.AAAAAAAAAAAAAAAAAAAAAAAA"), timeout=30,
                     files={"files": ("a.dcm", b"x")})
    assert r.status_code == 401  # MONAI Label's routes too
    assert requests.get(url + "/v1/structures", headers={"X-API-Key": k["carol"]}, timeout=30).status_code == 200
    assert requests.get(url + "/v1/structures", headers=bearer(k["carol"]), timeout=30).status_code == 200
    keys.revoke_key(app["file"], "carol")  # while the app runs: the next request is refused
    r = requests.get(url + "/v1/structures", headers=bearer(k["carol"]), timeout=30)
    assert r.status_code == 401 and "'carol' was revoked" in r.json()["error"], r.text
    assert requests.get(url + "/v1/structures", headers=bearer(k["alice"]), timeout=30).status_code == 200


def test_good_key_segment_sessions_and_another_keys_session(app, ct_png):
    url, alice, bob = app["url"], app["keys"]["alice"], app["keys"]["bob"]
    r = requests.post(url + "/v1/segment", headers=bearer(alice), timeout=120, data={"structures": "liver"},
                      files={"image": ("x.png", ct_png, "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["label"], r.text[:300]
    r = open_session(app, alice, ct_png)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = requests.post(f"{url}/v1/sessions/{sid}/commands", headers=bearer(alice), timeout=60,
                      json={"text": "add a point at 40,50"})
    assert r.status_code == 200, r.text
    before = requests.get(f"{url}/v1/sessions/{sid}", headers=bearer(alice), timeout=30).json()
    assert requests.get(f"{url}/v1/sessions/{sid}/mask?format=png", headers=bearer(alice),
                        timeout=30).status_code == 200
    # bob, a valid key, on alice's session: 403 naming it, whatever the route; the session is not touched
    for method, path, kw in (("get", f"/v1/sessions/{sid}", {}), ("post", f"/v1/sessions/{sid}/commands",
                                                                    {"json": {"text": "clear"}}),
                             ("post", f"/v1/sessions/{sid}/undo", {}), ("get", f"/v1/sessions/{sid}/mask", {}),
                             ("get", f"/v1/sessions/{sid}/image", {}), ("delete", f"/v1/sessions/{sid}", {}),
                             ("get", f"/session/{sid}", {}), ("delete", f"/session/{sid}", {}),
                             ("post", f"/infer/sam2_interactive?session_id={sid}",
                              {"files": {"params": (None, "{}")}})):
        r = getattr(requests, method)(url + path, headers=bearer(bob), timeout=30, **kw)
        assert r.status_code == 403 and sid in r.json()["error"], (method, path, r.status_code, r.text[:200])
    after = requests.get(f"{url}/v1/sessions/{sid}", headers=bearer(alice), timeout=30).json()
    assert after == before  # the same state and history (undo / clear / delete by bob changed nothing)
    r = requests.get(url + "/info/", headers=bearer(alice), timeout=30)  # a MONAI Label route with a good key
    assert r.status_code == 200 and "rau_segmentation" in r.json()["models"]
    assert requests.delete(f"{url}/v1/sessions/{sid}", headers=bearer(alice), timeout=30).status_code == 204


def test_per_key_session_limit_and_rate(app, ct_png):
    url, bob = app["url"], app["keys"]["bob"]
    data, name = dicom_with_patient_name()
    r = requests.put(url + "/session/", headers=bearer(bob), timeout=60,
                     files={"files": (name, data, "application/dicom")})  # MONAI Label's session, a named patient
    assert r.status_code == 200, r.text
    first = r.json()["session_id"]
    assert open_session(app, bob, ct_png).status_code == 201
    r = open_session(app, bob, ct_png)  # a third session for bob: over his limit (2)
    assert r.status_code == 429 and "'bob' holds 2 live sessions" in r.json()["error"]
    assert int(r.headers["Retry-After"]) >= 1
    assert open_session(app, app["keys"]["alice"], ct_png).status_code == 201  # a limit per key, not for all
    assert requests.delete(f"{url}/session/{first}", headers=bearer(bob), timeout=30).status_code == 200
    assert open_session(app, bob, ct_png).status_code == 201  # room again
    rate = app["keys"]["rate"]
    codes = [requests.get(url + "/auth/token/valid", headers=bearer(rate), timeout=30) for _ in range(RPM + 1)]
    assert [c.status_code for c in codes[:RPM]] == [200] * RPM and codes[0].json()["username"] == "rate"
    assert codes[-1].status_code == 429 and int(codes[-1].headers["Retry-After"]) == 60 // RPM, codes[-1].text
    assert "30 requests a minute" in codes[-1].json()["error"]
    assert requests.get(url + "/auth/token/valid", headers=bearer(bob), timeout=30).status_code == 200  # per key


def test_auth_routes_cors_and_monailabel_client(app, tmp_path):
    url, k = app["url"], app["keys"]
    assert requests.get(url + "/auth/", timeout=30).json()["enabled"] is True
    name, secret = keys.split_key(k["alice"])
    r = requests.post(url + "/auth/token", data={"username": name, "password": secret, "grant_type": "password"},
                      timeout=30)
    assert r.status_code == 200 and r.json() == {"access_token": k["alice"], "token_type": "Bearer"}
    r = requests.post(url + "/auth/token", data={"username": name, "password": "x" * 43}, timeout=30)
    assert r.status_code == 401 and secret not in r.text
    # CORS: the listed origin only (its preflight needs no key); any other origin gets no CORS header
    r = requests.options(url + "/v1/structures", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = requests.get(url + "/v1/structures", headers={**bearer(k["alice"]), "Origin": "http://evil.test"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    if not CLIENT_PYTHON.is_file():
        pytest.fail(f"{CLIENT_PYTHON} is missing: `make monailabel-client` makes it (make test does)")
    image = tmp_path / "phantom.nii.gz"
    image.write_bytes(formats.encode_nifti(np.zeros((32, 32, 3), np.int16) - 1000, (1.0, 1.0, 2.0)))
    sname, ssecret = keys.split_key(k["slicer"])
    spec = {"username": sname, "password": ssecret, "infer": False}
    run = subprocess.run([str(CLIENT_PYTHON), str(SCRIPT), url, str(image), str(tmp_path), json.dumps(spec)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["without_token"]["status"] == 401 and out["auth_enabled"] is True
    assert out["bad_login"]["status"] == 401 and out["token_type"] == "Bearer" and out["token_valid"] is True
    assert "rau_segmentation" in out["info"]["models"] and "phantom" in out["datastore"]["objects"]
    assert out["get_session"]["name"] and out["removed"]
    assert ssecret not in run.stdout
    # another key sees neither the client's datastore image nor may it replace it
    r = requests.get(url + "/datastore/?output=all", headers=bearer(k["alice"]), timeout=30)
    assert r.status_code == 200 and "phantom" not in r.json()["objects"]
    r = requests.put(url + "/datastore/?image=phantom", headers=bearer(k["alice"]), timeout=30,
                     files={"file": ("p.nii.gz", image.read_bytes())})
    assert r.status_code == 403 and "another API key" in r.json()["error"]


def test_several_users_at_once_each_see_only_their_own_session(app):
    """Three keys clicking at once, each in a session of its own on an image of its own (benchmarks/serve_users.py's
    level, small): every request answered, each session holds its own clicks only, each key gets 403 on another's
    session (left as it was), and each final mask equals that user's clicks replayed alone afterwards."""
    users = ("u1", "u2", "u3")
    result = serve_users.level(app["url"], [app["keys"][u] for u in users], serve_users.user_images(3), clicks=3)
    assert result["checks"] == {"every_request_200": True, "requests": 3 * 4, "clicks_answered": 9,
                                "sessions_hold_only_their_clicks": True, "foreign_session_403": True,
                                "masks_equal_replayed_alone": True}, result


def test_audit_log_has_the_actions_and_ids_only(app):
    time.sleep(0.5)  # the last request's line is written after its answer
    text = app["audit"].read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    actions = {(x["key"], x["action"], x["status"]) for x in lines}
    for expected in (("alice", "segment", 200), ("alice", "open", 201), ("alice", "change", 200),
                     ("alice", "export", 200), ("alice", "close", 204), ("bob", "open", 200),
                     ("bob", "change", 403), ("bob", "close", 403), ("bob", "open", 429), ("slicer", "open", 200),
                     ("carol", "refused", 401), ("-", "refused", 401), ("rate", "refused", 429)):
        assert expected in actions, (expected, sorted(actions))
    assert any(x["action"] == "view" and x.get("session") for x in lines)
    assert all(set(x) <= {"time", "key", "action", "method", "route", "session", "image", "status", "reason"}
               for x in lines)
    for secret in app["keys"].values():
        assert secret not in text and keys.split_key(secret)[1] not in text
    assert "Doe" not in text and "Jane" not in text and "PID-4711" not in text
