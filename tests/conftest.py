"""Shared test fixtures. One real Ray cluster per test session, started on first use and shut down at the end.

Subprocesses (the ``rau`` CLI) join it through RAY_ADDRESS instead of starting clusters of their own. Tiny models
are built once per session into an isolated cache folder (no hub, no user cache), set before the cluster starts so
its workers share it.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
def ray_cluster(isolated_model_cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
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
