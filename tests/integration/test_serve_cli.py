"""`serve run serve_configs/local.yaml` (Ray Serve's own CLI, as the README tells a user to run it) against the
test session's Ray cluster: a copy of local.yaml on a free port (and with the session's model cache in the app's
runtime_env, as ``rau_ray.serve.app.start`` does), ``serve run --address <the cluster>`` in its own process group,
``/readyz`` 200, one ``/v1/segment``, then Ctrl-C (SIGINT to the group), which makes ``serve run`` shut Serve down.
Serve is left shut down for the session's other Serve tests (test_serve.py before this file, test_web_page.py
after it; each starts and stops its own app). This test found that Serve refuses a two-parameter app builder:
``build_app(args)`` is the config's builder, ``build_graph(args, options)`` the one ``start`` uses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from rau_ray.data import formats

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / ".venv" / "bin" / "serve"
READY_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cli() -> str:
    if SERVE.is_file():
        return str(SERVE)
    import shutil

    found = shutil.which("serve")
    if found is None:
        pytest.fail("the Ray Serve CLI `serve` is not installed (ray[serve] installs it into .venv/bin)")
    return found


def _stop(proc: subprocess.Popen) -> int:
    """Ctrl-C to the process group, as a person stops `serve run`; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def test_serve_run_local_yaml(ray_cluster, tmp_path):
    from ray import serve

    from rau_ray.data.phantoms import get_phantom

    if serve.status().applications:
        pytest.fail(f"Serve applications are still running before this test: {list(serve.status().applications)}")
    serve.shutdown()  # an idle Serve instance would keep its old HTTP port; serve run must start its own
    conf = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    port = _free_port()
    conf["http_options"]["port"] = port
    conf["applications"][0]["runtime_env"] = {"env_vars": {"RAU_CACHE": os.environ["RAU_CACHE"]}}
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(conf, sort_keys=False))
    log_path = tmp_path / "serve-run.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base = f"http://127.0.0.1:{port}"
    sample = max(get_phantom("ct-abdomen").generate_2d(3, 11, size=128, slices=4),
                 key=lambda s: int((s.label == 1).sum()))
    png = formats.encode_png(formats.hu_to_png16(sample.image))

    def log() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    with open(log_path, "wb") as out:
        proc = subprocess.Popen([_serve_cli(), "run", str(config), "--address", ray_cluster], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        t0, ready = time.monotonic(), None
        while time.monotonic() - t0 < READY_S:
            assert proc.poll() is None, f"serve run exited with {proc.returncode}:\n{log()}"
            app = serve.status().applications.get("rau")
            assert app is None or app.status != "DEPLOY_FAILED", f"serve run could not deploy: {app.message}"
            try:
                ready = requests.get(base + "/readyz", timeout=10)
                if ready.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert ready is not None and ready.status_code == 200, f"not ready after {READY_S} s:\n{log()}"
        print(f"serve run: ready after {time.monotonic() - t0:.1f} s")
        assert ready.json()["ready"] and set(ready.json()["deployments"]) == {"retriever", "policy", "segmenter",
                                                                               "commander"}
        assert list(serve.status().applications) == ["rau"]  # local.yaml's application, on this cluster
        r = requests.post(base + "/v1/segment", files={"image": ("ct.png", png, "image/png")},
                          data={"structures": "liver"}, timeout=120)
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["structure"] == "liver" and result["reference"]["id"].startswith("ct-abdomen-")
    finally:
        code = _stop(proc)
        serve.shutdown()  # whatever serve run left behind (nothing, when Ctrl-C worked)
    assert code == 0, f"serve run exited with {code} on Ctrl-C:\n{log()}"
    assert "KeyboardInterrupt, shutting down" in log_path.read_text(errors="replace"), log()  # serve run's own
    assert not serve.status().applications
    with pytest.raises(requests.RequestException):
        requests.get(base + "/healthz", timeout=5)
