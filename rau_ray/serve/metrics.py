"""The serving app's Prometheus metrics, through Ray's metrics API (``ray.util.metrics``): recorded in the Ingress,
exported by each Ray node's metrics agent beside Ray's and Serve's own (``ray_serve_*``), every name prefixed
``ray_`` there (``ray_rau_requests_total``...). Scrape the node's metrics port (``ray start --metrics-export-port``;
on the KubeRay RayService every pod's port 8080, named ``metrics``; README "Metrics (Prometheus)").

- ``rau_requests_total{route, method, status}``: requests answered, by route template (``/v1/sessions/{sid}``,
  never a session id) and status code; errors are the 4xx / 5xx rows;
- ``rau_request_seconds{route}``: the Ingress's time per request, a histogram;
- ``rau_stage_seconds{stage}``: retrieval, policy, segmenter (a /v1/segment structure), prompt (a click decoded on
  a cached embedding), embedding (an image's SAM2 features fetched for the clicks), histograms;
- ``rau_embedding_cache_total{result}``: hit / miss of the SAM2 embedding caches a click meets;
- ``rau_sessions_active``: the Ingress's open sessions (``watch_sessions``: the store the gauge reads after each
  request).
``MetricsMiddleware`` (ASGI, on the Ingress's FastAPI app) records the requests and the sessions; the pipeline calls
``stage`` and ``cache``.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

REQUESTS = Counter("rau_requests", "Requests the RAU app answered, by route template, method and status.",
                   tag_keys=("route", "method", "status"))
REQUEST_SECONDS = Histogram("rau_request_seconds", "Seconds the Ingress took to answer a request, by route template.",
                            boundaries=SECONDS, tag_keys=("route",))
STAGE_SECONDS = Histogram("rau_stage_seconds", "Seconds per pipeline stage: retrieval, policy, segmenter, prompt, "
                          "embedding.", boundaries=SECONDS, tag_keys=("stage",))
CACHE = Counter("rau_embedding_cache", "SAM2 embedding cache lookups of clicks, by result (hit / miss).",
                tag_keys=("result",))
SESSIONS = Gauge("rau_sessions_active", "Interactive sessions open in the Ingress.")


def stage(name: str, seconds: float) -> None:
    STAGE_SECONDS.observe(float(seconds), tags={"stage": name})


def cache(hit: bool) -> None:
    CACHE.inc(tags={"result": "hit" if hit else "miss"})


_WATCHED: list = []  # the Ingress's session store (one per replica process)


def watch_sessions(store) -> None:
    """``rau_sessions_active`` is ``len(store)`` after every request."""
    _WATCHED[:] = [store]


def _route(scope) -> str:
    """The matched route's template (FastAPI puts the route in the scope), else "unmatched": a path with ids in it
    would make a time series per session."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request by route template and status (``rau_requests_total``,
    ``rau_request_seconds``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = _route(scope)
            REQUESTS.inc(tags={"route": route, "method": scope.get("method", "GET"), "status": str(status[0])})
            REQUEST_SECONDS.observe(time.perf_counter() - t0, tags={"route": route})
            if _WATCHED:
                SESSIONS.set(float(len(_WATCHED[0])))
