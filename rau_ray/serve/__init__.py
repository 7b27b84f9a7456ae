"""Online serving on Ray Serve: Retriever -> Policy -> Segmenter (+ Commander) behind a FastAPI Ingress.

Start it: ``serve run serve_configs/local.yaml`` (tiny, CPU) or ``serve deploy serve_configs/gpu.yaml`` (paper).
From Python (tests, the web page's browser test), on the Ray cluster this process is connected to:

    from rau_ray.serve.app import start, stop
    base_url = start(profile="tiny", route_prefix="/", port=8000, **options)  # -> "http://127.0.0.1:8000"
    ...                                                                        # GET base_url + "/" is the web page
    stop()                                                                     # serve.shutdown()

``start(profile="tiny", route_prefix="/", port=8000, host="127.0.0.1", bank_dir=None, session_ttl_s=900.0,
max_sessions=64, max_image_bytes=..., max_pixels=..., policy_checkpoint=None, segmenter_checkpoint=None,
policy_batch_size=8, name="rau", timeout_s=300) -> str`` blocks until every deployment is healthy and returns the
base URL (no trailing slash, route_prefix included). ``stop()`` shuts Serve down.

Modules: ``app`` (``AppArgs``, ``build_app`` for serve configs, ``build_graph``, ``start``/``stop``), ``routes`` (the
FastAPI Ingress: every route, the sessions it holds), ``http`` (errors, request parsing, the request / response models
the OpenAPI document is generated from), ``pipeline`` (the calls between deployments: retrieve -> policy -> segment,
retries, where clicks are decoded), ``messages`` (the typed messages between deployments), ``deployments``
(Retriever, Policy, Segmenter), ``commander`` (the Commander: commands -> operations, no model), ``sessions``
(per-user interactive state, undo/redo, expiry, limit),
``prompt_decoder`` (SAM2's prompt decoder in the Ingress), ``codecs`` (image decode with limits, mask PNG / COCO RLE),
``dicom_seg`` (DICOM-SEG export), ``refusal`` (a refused checkpoint pair's reason), ``keys`` (API keys: the
hashed keys file, ``rau keys``), ``auth`` (access control: keys on every route, session owners, per-key limits, the
audit log, CORS, MONAI Label's ``/auth/`` routes), ``metrics`` (Prometheus metrics through Ray's metrics API).
"""
