"""Shared test fixtures. One real Ray cluster per test session, started on first use and shut down at the end.

Subprocesses (the ``rau`` CLI) join it through RAY_ADDRESS instead of starting clusters of their own. Tiny models
are built once per session into an isolated cache folder (no hub, no user cache), set before the cluster starts so
its workers share it. ``llm`` / ``module_llm``: a real local HTTP server answering like an OpenAI-compatible
``/v1/chat/completions`` (the commands' LLM fallback), its answers set by the test. ``s3://`` storage is a real
S3-protocol server (moto's, in a thread of this process, on a free loopback port): ``AWS_ENDPOINT_URL`` and dummy
credentials point pyarrow at it, set before the cluster starts so Ray Train / Tune workers and CLI subprocesses
reach it too; ``s3_bucket`` gives a test a fresh bucket.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_model_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAU_CACHE", str(tmp_path_factory.mktemp("rau_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server for the session; the environment points every S3 client at it
    (pyarrow honours AWS_ENDPOINT_URL) with dummy credentials, so nothing reaches AWS."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request in the test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one, no race
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        mp.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        mp.setenv(name, value)
    yield endpoint
    mp.undo()
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """``s3://<name>`` of a new empty bucket on the session's S3 server."""
    import uuid

    from pyarrow import fs

    name = f"rau-test-{uuid.uuid4().hex[:12]}"
    fs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True, region="us-east-1").create_dir(name)
    return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(isolated_model_cache, s3_endpoint):
    import ray

    from rau_ray.ray_session import LOCAL_TRAIN_ENV, SERVE_ENV

    # the cluster's processes (and the CLI subprocesses) run Serve and Ray Train as an embedded cluster would
    for key, value in {**SERVE_ENV, **LOCAL_TRAIN_ENV}.items():
        os.environ.setdefault(key, value)
    # Serve's HAProxy also binds fixed stats / metrics ports (8404, 9101): free ones, so another Ray cluster serving
    # on this machine (a second test session, a user's app) cannot make this session's proxy fail to start
    for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ.setdefault(key, str(_free_port()))
    # the node's Prometheus endpoint on a free port, reporting every second (Ray's default: 10 s), for the metrics test
    os.environ["RAU_TEST_METRICS_PORT"] = str(_free_port())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _metrics_export_port=int(os.environ["RAU_TEST_METRICS_PORT"]),
             _system_config={"metrics_report_interval_ms": 1000})
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


@pytest.fixture
def run_cli(ray_cluster):
    """Run ``rau ARGS...`` in a subprocess attached to the session's Ray cluster; returns CompletedProcess."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, RAY_ADDRESS=ray_cluster)
        return subprocess.run([sys.executable, "-m", "rau_ray.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=REPO)

    return run


@pytest.fixture(scope="session")
def ct_manifest(tmp_path_factory):
    """``ct_manifest(n, size, slices)`` -> path of a ct-abdomen phantom manifest, made once per session per shape."""
    from rau_ray.data.make import MakeConfig, make_dataset

    made: dict[tuple, str] = {}

    def make(n: int, size: int, slices: int) -> str:
        if (n, size, slices) not in made:
            out = tmp_path_factory.mktemp(f"ct_{n}x{slices}_{size}px") / "ct"
            make_dataset(MakeConfig("ct-abdomen", n=n, out=str(out), size=size, slices_per_subject=slices),
                         backend="local", progress=False)
            made[n, size, slices] = str(out / "manifest.jsonl")
        return made[n, size, slices]

    return make


# ------------------------------------------------------------------ a local OpenAI-compatible chat completions server
class _OpenAILike(BaseHTTPRequestHandler):
    """POST /v1/chat/completions -> {"choices": [{"message": {"content": server.answer(body)}}]}."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, content = self.server.answer(body)
        reply = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}]}).encode()
        if self.path != "/v1/chat/completions":
            status, reply = 404, b'{"error": "not found"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@contextmanager
def _openai_like_server():
    """The server on a free loopback port: ``.url``, ``.requests`` (what it was sent) and ``.answer`` (body ->
    (status, content); by default ``{"operations": []}``, i.e. "not a command")."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAILike)
    server.requests, server.answer = [], lambda body: (200, '{"operations": []}')
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def llm():
    with _openai_like_server() as server:
        yield server


@pytest.fixture(scope="module")
def module_llm():
    with _openai_like_server() as server:
        yield server
