"""Connect to Ray: the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else an embedded local one.

Never assumes a GPU; tasks ask for CPUs explicitly. Use: ``ray_session.connect()`` before submitting tasks.
"""

from __future__ import annotations

import os


def connect(num_cpus: int | None = None):
    """Initialise Ray once per process; returns the ``ray`` module. A no-op when already connected."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        ray.init(logging_level="ERROR", log_to_driver=True, **kwargs)
    return ray


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
