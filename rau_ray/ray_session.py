"""Connect to Ray: the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else an embedded local one.

Never assumes a GPU; tasks ask for CPUs explicitly. Use: ``ray_session.connect()`` before submitting tasks.
"""

from __future__ import annotations

import os

import ray

# Ray Serve's high-throughput mode (gRPC between deployments, user code on the replica's own loop, GC frozen after
# start-up) with HAProxy as the HTTP ingress (direct to the Ingress replicas' own HTTP servers, no Python proxy hop):
# at concurrency 1 an empty HTTP round trip went from ~3-5 ms to ~1 ms and a point prompt from ~14 ms to ~8 ms
# here (BENCHMARKS.md). One part is turned back off: the router on the caller's event loop, with which a synchronous
# handle call from a driver, a test or a benchmark fails. An embedded cluster gets these at start; a real cluster
# sets them in its nodes' environment (cluster.yaml, deploy/kuberay); the cluster's processes need them.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
             "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

# Ray Train on one machine: the controller polls its workers every 0.5 s instead of 2 s (a run's start, each
# checkpoint and its end each waited up to a poll), and no preemption-watcher actor (a process of its own per run)
# where no autoscaler drains nodes. A seg job of 2 steps here: 23.7 s -> 19.8 s. The driver's values reach the
# controller and the workers (Ray Train propagates them); a real cluster keeps Ray's defaults.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def connect(num_cpus: int | None = None):
    """Initialise Ray once per process; returns the ``ray`` module. A no-op when already connected. An embedded
    cluster starts with ``SERVE_ENV`` and ``LOCAL_TRAIN_ENV`` (unless the caller's environment sets those
    variables)."""

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            for key, value in {**SERVE_ENV, **LOCAL_TRAIN_ENV}.items():
                os.environ.setdefault(key, value)
        kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        ray.init(logging_level="ERROR", log_to_driver=True, **kwargs)
    return ray


def cluster_cpus() -> int:

    return int(ray.cluster_resources().get("CPU", 1))
