"""Why this Ingress replica serves nothing (a policy + segmenter pair that does not belong together), or empty.

A module of its own on purpose: Serve ships the ingress class and its FastAPI app to the replica by value
(cloudpickle), copying the globals they reference; an imported module travels by reference, so the value the
Ingress sets at start-up is the one every route's check reads. Use: ``REASON[:] = [message]``; ``REASON[0]``.
"""

REASON: list[str] = []
