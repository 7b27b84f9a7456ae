"""Every test under tests/integration is marked ``integration``: they start real Ray clusters, Serve apps, CLI
subprocesses or a browser. ``make test-unit`` (``pytest tests/unit -m "not integration"``) runs the rest.

``local_app`` is the Serve app as ``serve_configs/local.yaml`` serves it (the shipped chain, default settings),
started once per test process and shared: the tests that ask for it run at the end of the session, so one
start-up (~25 s) serves them all.
A test that needs other settings starts its own app (``rau_ray.serve.app.start``)."""

import socket
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.integration)
    # the local_app users last and together (a stable sort: their own order is kept)
    items.sort(key=lambda item: "local_app" in getattr(item, "fixturenames", ()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - down, or another app took the name
        return False


_LOCAL_APP: dict = {}


@pytest.fixture(scope="session")
def _local_app_owner(ray_cluster):
    """Stops the shared app at the end of the session, if it is still up."""
    yield _LOCAL_APP
    if _LOCAL_APP:
        from rau_ray.serve.app import stop

        stop()


@pytest.fixture
def local_app(_local_app_owner) -> str:
    """Base URL of the shared local app; started on first use, and again if a test in between shut Serve down."""
    from ray import serve

    from rau_ray.serve.app import start, stop

    url = _LOCAL_APP.get("url")
    if url is None or not _ready(url):
        try:
            _LOCAL_APP["url"] = url = start(profile="tiny", port=free_port(), timeout_s=420)
        except TimeoutError as e:
            status = serve.status()
            stop()
            pytest.fail(f"{e}; Serve status: {status}")
    return url
