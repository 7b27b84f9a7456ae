"""Every test under tests/integration is marked ``integration``: they start real Ray clusters, Serve apps, CLI
subprocesses or a browser. ``make test-unit`` (``pytest tests/unit -m "not integration"``) runs the rest.

``local_app`` is the Serve app as a user starts it: ``serve run serve_configs/local.yaml`` (Ray Serve's own CLI, as
the README says), against the session's cluster, a copy of the file on a free port and with the session's model cache
in the app's runtime_env. It is started once per test session and shared: the tests that ask for it run at the end of
the session, so one start-up (~30 s) serves them all; ``local_app_run`` (its process and log) goes last of all, for
the test that stops it with Ctrl-C (test_serve_cli.py).
A test that needs other settings starts its own app (``rau_ray.serve.app.start``)."""

import inspect
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
READY_S = 420


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.integration)

    # the local_app users last and together, the one that stops it at the very end (a stable sort: order kept)
    def rank(item) -> int:
        names = getattr(item, "fixturenames", ())  # every fixture the test needs: local_app brings local_app_run
        asks = inspect.signature(item.function).parameters if hasattr(item, "function") else {}
        return 2 if "local_app_run" in asks else 1 if "local_app_run" in names else 0

    items.sort(key=rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - down, or not up yet
        return False


def serve_cli() -> str:
    """Ray Serve's ``serve`` command of this environment (ray[serve] installs it next to the interpreter)."""
    import shutil
    import sys

    found = Path(sys.executable).with_name("serve")
    if found.is_file():
        return str(found)
    found = shutil.which("serve")
    if found is None:
        pytest.fail("the Ray Serve CLI `serve` is not installed (ray[serve] installs it into .venv/bin)")
    return found


@dataclass
class LocalApp:
    """``serve run`` of a copy of serve_configs/local.yaml: its base ``url``, process (its own process group) and
    log file."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """Ctrl-C to the process group, as a person stops `serve run`; SIGKILL if it does not exit in time. Then
        Serve is shut down (whatever serve run left behind: nothing, when Ctrl-C worked). Returns the exit code."""
        from ray import serve

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        serve.shutdown()
        return self.proc.returncode


def _serve_run_local_yaml(ray_address: str, folder: Path) -> LocalApp:
    from ray import serve

    if serve.status().applications:
        pytest.fail(f"Serve applications are still running before local_app: {list(serve.status().applications)}")
    serve.shutdown()  # an idle Serve instance would keep its old HTTP port; serve run must start its own
    conf = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    port = free_port()
    conf["http_options"]["port"] = port
    conf["applications"][0]["runtime_env"] = {"env_vars": {"RAU_CACHE": os.environ["RAU_CACHE"]}}
    config = folder / "local.yaml"
    config.write_text(yaml.safe_dump(conf, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = folder / "serve-run.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([serve_cli(), "run", str(config), "--address", ray_address], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    app = LocalApp(f"http://127.0.0.1:{port}", proc, log_path)
    t0 = time.monotonic()
    while not _ready(app.url):
        failed = serve.status().applications.get("rau")
        if proc.poll() is not None or (failed is not None and failed.status == "DEPLOY_FAILED") or \
                time.monotonic() - t0 > READY_S:
            app.stop()
            pytest.fail(f"serve run {config} not ready (exit code {proc.returncode}, "
                        f"{failed.message if failed else 'no app'}):\n{app.log()}")
        time.sleep(0.5)
    return app


_LOCAL_APP: dict = {}


@pytest.fixture(scope="session")
def _local_app_owner(ray_cluster):
    """Stops the shared app at the end of the session, if it is still up."""
    yield _LOCAL_APP
    if _LOCAL_APP.get("app"):
        _LOCAL_APP.pop("app").stop()


def _wait_up(app: LocalApp) -> str | None:
    """None once /readyz answers 200 (a busy app may answer late: up to READY_S while its process runs), else why
    it is not up."""
    deadline = time.monotonic() + READY_S
    while app.proc.poll() is None:
        if _ready(app.url):
            return None
        if time.monotonic() > deadline:
            return f"/readyz not 200 for {READY_S} s"
        time.sleep(1)
    return f"serve run exited with {app.proc.returncode}"


def pytest_terminal_summary(terminalreporter):
    """A restart of the shared app is said at the end of the run (each costs ~40 s of the suite)."""
    for reason in _LOCAL_APP.get("restarts", []):
        terminalreporter.write_line(f"local_app restarted: {reason}")


@pytest.fixture
def local_app_run(_local_app_owner, ray_cluster, tmp_path_factory) -> LocalApp:
    """The shared ``serve run serve_configs/local.yaml``; started on first use, and again if its process is gone."""
    app = _LOCAL_APP.get("app")
    why = "not started" if app is None else _wait_up(app)
    if why is not None:
        if app is not None:
            _LOCAL_APP.setdefault("restarts", []).append(f"{why}; its log's end:\n{app.log()[-1500:]}")
            app.stop()
        _LOCAL_APP["app"] = app = _serve_run_local_yaml(ray_cluster, tmp_path_factory.mktemp("local_app"))
    return app


@pytest.fixture
def local_app(local_app_run) -> str:
    """Base URL of the shared local app (``local_app_run``)."""
    return local_app_run.url
