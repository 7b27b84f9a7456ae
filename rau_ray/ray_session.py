"""Connect to Ray: the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else an embedded local one.

Never assumes a GPU; tasks ask for CPUs explicitly. Use: ``ray_session.connect()`` before submitting tasks.
"""

from __future__ import annotations

import os


# Ray Serve's high-throughput mode (gRPC between deployments, user code on the replica's own loop, GC frozen after
# start-up): at concurrency 1 it took ~12 ms off a tiny /v1/segment request and ~13 ms off a point prompt here
# (BENCHMARKS.md). Two of its parts are turned back off: the router on the caller's event loop (a synchronous handle
# call from a driver, a test or a benchmark would fail) and direct ingress (replicas then drain 30 s on shutdown and
# it did not help on its own). An embedded cluster gets these at start; a real cluster sets them in its nodes'
# environment (cluster.yaml, deploy/kuberay); the cluster's processes must have them, the driver need not.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
             "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def connect(num_cpus: int | None = None):
    """Initialise Ray once per process; returns the ``ray`` module. A no-op when already connected. An embedded
    cluster starts with ``SERVE_ENV`` (unless the caller's environment sets those variables)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            for key, value in SERVE_ENV.items():
                os.environ.setdefault(key, value)
        kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        ray.init(logging_level="ERROR", log_to_driver=True, **kwargs)
    return ray


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
