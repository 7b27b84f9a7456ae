"""`serve run serve_configs/local.yaml` (Ray Serve's own CLI, as the README tells a user to run it) against the
test session's Ray cluster: the session's shared ``local_app_run`` (tests/integration/conftest.py: a copy of
local.yaml on a free port, with the session's model cache in the app's runtime_env, ``serve run --address <the
cluster>`` in its own process group). This test runs last of the session's tests that use it: ``/readyz`` 200 with
every deployment, local.yaml's one application on the cluster, one ``/v1/segment``, then Ctrl-C (SIGINT to the group),
which makes ``serve run`` shut Serve down. This test found that Serve refuses a two-parameter app builder:
``build_app(args)`` is the config's builder, ``build_graph(args, options)`` the one ``start`` uses."""

from __future__ import annotations

import pytest
import requests

from rau_ray.data import formats

pytestmark = pytest.mark.integration


def test_serve_run_local_yaml_then_ctrl_c(local_app_run):
    from ray import serve

    from rau_ray.data.phantoms import get_phantom

    base = local_app_run.url
    ready = requests.get(base + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"], ready.text
    assert set(ready.json()["deployments"]) == {"retriever", "policy", "segmenter", "commander"}
    assert list(serve.status().applications) == ["rau"]  # local.yaml's application, on this cluster
    sample = max(get_phantom("ct-abdomen").generate_2d(3, 11, size=128, slices=4),
                 key=lambda s: int((s.label == 1).sum()))
    png = formats.encode_png(formats.hu_to_png16(sample.image))
    r = requests.post(base + "/v1/segment", files={"image": ("ct.png", png, "image/png")},
                      data={"structures": "liver"}, timeout=120)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["structure"] == "liver" and result["reference"]["id"].startswith("ct-abdomen-")

    code = local_app_run.stop()
    assert code == 0, f"serve run exited with {code} on Ctrl-C:\n{local_app_run.log()}"
    assert "KeyboardInterrupt, shutting down" in local_app_run.log_path.read_text(errors="replace"), \
        local_app_run.log()  # serve run's own
    assert not serve.status().applications
    with pytest.raises(requests.RequestException):
        requests.get(base + "/healthz", timeout=5)
