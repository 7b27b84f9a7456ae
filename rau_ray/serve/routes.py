"""The FastAPI Ingress of the serving graph: every HTTP route, and the interactive sessions it holds.

HTTP API (OpenAPI at ``/docs``, ``/openapi.json``, generated from the models of ``rau_ray.serve.http``):
``POST /v1/segment``, ``POST /v1/label``, ``GET /v1/structures``, sessions (``POST /v1/sessions``,
``GET|DELETE /v1/sessions/{id}``, ``POST /v1/sessions/{id}/commands``, ``GET /v1/sessions/{id}/mask`` (png, rle,
nifti, dicom-seg), ``GET /v1/sessions/{id}/image``, ``POST /v1/sessions/{id}/undo|redo``), ``GET /healthz``,
``GET /readyz``, and the web page at ``GET /`` (``rau_ray/serve/static/``). The routes parse (``http.Reader``), ask
the models through ``pipeline.Pipeline`` and answer; bad input is a 4xx with ``{"error": message}``, a model replica
that dies is retried, then answered with 503.
Sessions live in the Ingress replica (``sessions``): cheap and consistent, at the price of one Ingress replica (a
second replica would not see the first one's sessions; scaling it out needs sticky routing or an external store).
Use: ``rau_ray.serve.app.build_graph`` binds ``Ingress(retriever, policy, segmenter, commander, Settings(...),
DecoderSpec(...) or None)``.
"""

# No ``from __future__ import annotations`` here: Serve rebuilds these routes on the replica from a pickled copy of
# the app, where FastAPI could no longer resolve string annotations (``request: Request``).
import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve

from rau_ray.commands import operation_validator
from rau_ray.data import formats
from rau_ray.serve import auth, codecs, http, metrics, refusal
from rau_ray.serve.dicom_seg import SegExportError, encode_segmentation
from rau_ray.serve.http import ApiError
from rau_ray.serve.messages import NotUnderstood
from rau_ray.serve.monailabel import MonaiLabelRoutes
from rau_ray.serve.monailabel import router as monailabel_router
from rau_ray.serve.pacs_routes import PacsRoutes
from rau_ray.serve.pacs_routes import router as pacs_router
from rau_ray.serve.pipeline import DecoderSpec, Pipeline, prompt_decoder
from rau_ray.serve.sessions import (
    SessionError,
    SessionGone,
    SessionLimit,
    SessionNotFound,
    SessionStore,
    dicom_seg_refusal,
)

log = logging.getLogger("rau_ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
MASK_FILES = ("image/png", "application/gzip", "application/dicom")


@dataclass(frozen=True)
class Settings:
    session_ttl_s: float = 900.0
    max_sessions: int = 64
    max_image_bytes: int = codecs.MAX_IMAGE_BYTES
    max_pixels: int = codecs.MAX_PIXELS
    max_structures: int = 16
    request_timeout_s: float = 120.0
    retries: int = 3
    refusal: str | None = None  # set by build_graph for a mismatched checkpoint pair: every route but /healthz -> 503
    pacs_timeout_s: float = 30.0  # each DICOMweb request's timeout (POST /v1/pacs/segment)
    pacs_allowed_urls: tuple[str, ...] | None = None  # PACS URL prefixes the route may reach; None: any
    access: auth.Policy = auth.Policy()  # API keys, per-key limits, CORS, the audit log (rau_ray/serve/auth.py)


app = http.new_app(STATIC, title="RAU-Ray", version="0.1.0",
                   description="Reference-based anatomical understanding on Ray Serve: retrieval (DINOv2 + faiss) -> "
                               "policy (Qwen2.5-VL + LoRA, <Seg>) -> SAM2 + memory fusion; interactive sessions with "
                               "natural-language commands.")


app.include_router(monailabel_router)  # MONAI Label-compatible routes (rau_ray/serve/monailabel.py)
app.include_router(pacs_router)  # POST /v1/pacs/segment (rau_ray/serve/pacs_routes.py)
app.include_router(auth.router)  # MONAI Label's /auth/ routes
app.add_middleware(auth.AccessMiddleware)  # API keys on every route but the open ones, per-key rate, audit, CORS
app.add_middleware(metrics.MetricsMiddleware)  # outermost: counts what the access check refuses too


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=10)
@serve.ingress(app)
class Ingress(MonaiLabelRoutes, PacsRoutes):
    def __init__(self, retriever, policy, segmenter, commander, settings: Settings | None = None,
                 decoder: DecoderSpec | None = None):
        """``decoder``: None (prompts are decoded by the Segmenter), or the SAM2 whose prompt decoder runs here
        (``prompt_decoding: ingress``)."""
        operation_validator()  # built once here (7 ms), not in the first click's request
        self.settings = settings or Settings()
        refusal.REASON[:] = [self.settings.refusal] if self.settings.refusal else []
        if self.settings.refusal:
            log.error("refusing every request: %s", self.settings.refusal)
        auth.configure(self.settings.access)
        self.sessions = SessionStore(self.settings.session_ttl_s, self.settings.max_sessions)
        metrics.watch_sessions(self.sessions)
        self.read = http.Reader(self.settings.max_image_bytes, self.settings.max_pixels)
        handles = {"retriever": retriever, "policy": policy, "segmenter": segmenter, "commander": commander}
        self.pipeline = Pipeline(handles, self.settings.request_timeout_s, self.settings.retries,
                                 prompt_decoder(decoder) if decoder else None)

    # -- health, page -----------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(self):
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse("<!doctype html><title>RAU-Ray</title><h1>RAU-Ray</h1><p>The web page is not "
                            "installed; the API is at <a href='docs'>/docs</a>.</p>")

    @app.get("/healthz", tags=["health"], summary="Liveness: the Ingress answers",
             responses=http.responses(http.Health))
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every deployment answers",
             responses={**http.responses(http.Readiness), 503: {"model": http.Readiness, "description": "not ready"}})
    async def readyz(self):
        results = await self.pipeline.ready()
        ready = all(v == "ok" for v in results.values())
        return JSONResponse({"ready": ready, "deployments": results, "sessions": len(self.sessions)},
                            status_code=200 if ready else 503)

    # -- one-shot routes --------------------------------------------------------------------------------------------
    @app.get("/v1/structures", tags=["segment"], summary="Structures and modalities the reference bank knows",
             responses=http.responses(http.Structures))
    async def structures(self):
        known = await self.pipeline.known_structures()
        return {"structures": list(known.structures), "modalities": list(known.modalities), "entries": known.entries}

    @app.post("/v1/segment", tags=["segment"], summary="Segment named structures in an image (multipart or JSON)",
              openapi_extra=app.body(form=http.SegmentForm, json=http.SegmentJson),
              responses=http.responses(http.SegmentResponse, 400, 413, 415, 422, 504))
    async def segment(self, request: Request):
        req = await self.read.segment(request, self.settings.max_structures)
        if not isinstance(req.reference, http.ClientReference):
            known = list((await self.pipeline.known_structures()).structures)
            unknown = [n for n in req.structures if n not in known]
            if unknown:
                raise ApiError(422, f"unknown structure(s) {', '.join(map(repr, unknown))}; known: "
                                    f"{', '.join(known)}", known=known)
        t0 = time.perf_counter()
        image = req.image.array
        results = await asyncio.gather(*(self.pipeline.segment_one(image, req.modality, n, req.reference,
                                                                   req.mask_format) for n in req.structures))
        return {"image": {"height": int(image.shape[0]), "width": int(image.shape[1]), "modality": req.modality,
                          "format": req.image.kind},
                "mask_format": req.mask_format, "results": [r for r, _ in results],
                "timings_ms": {"total": round(1000 * (time.perf_counter() - t0), 2)}}

    @app.post("/v1/label", tags=["label"],
              summary="Name the regions of an image (given boxes, or found ones) with global OT matching",
              openapi_extra=app.body(form=http.LabelForm, json=http.LabelJson),
              responses=http.responses(http.LabelResponse, 400, 413, 415, 422, 504))
    async def label(self, request: Request):
        req = await self.read.label(request)
        return await self.pipeline.label(req.image.array, req.modality, req.boxes, req.method, req.reference)

    # -- sessions ---------------------------------------------------------------------------------------------------
    def _session(self, sid: str):
        s = self.sessions.peek(sid)
        if s is not None:
            auth.check_owner(s)  # 403 before anything else: another key's session is not touched, not even its TTL
        try:
            return self.sessions.get(sid)
        except SessionGone as e:
            raise ApiError(410, str(e)) from None
        except SessionNotFound as e:
            raise ApiError(404, str(e)) from None

    @app.post("/v1/sessions", tags=["sessions"], status_code=201,
              summary="Open an interactive session on an image or a volume (NIfTI / DICOM)",
              openapi_extra=app.body(form=http.SessionForm, json=http.SessionJson),
              responses=http.responses(http.SessionCreated, 400, 413, 415, 422, 429, status=201,
                                       description="the session (its URL in Location)"))
    async def create_session(self, request: Request):
        req = await self.read.session(request)
        image = req.image
        auth.check_quota(self.sessions)
        try:
            s = self.sessions.create(image.array, req.modality, image.spacing, sources=image.sources, kind=image.kind)
        except SessionLimit as e:
            raise ApiError(429, str(e.args[0]), headers={"Retry-After": str(e.args[1])}) from None
        auth.own(s)
        known = await self.pipeline.known_structures()
        return JSONResponse({**s.summary(), "structures": list(known.structures), "ttl_s": self.sessions.ttl_s},
                            status_code=201, headers={"Location": f"/v1/sessions/{s.id}"})

    @app.get("/v1/sessions/{sid}", tags=["sessions"], summary="A session's state",
             responses=http.responses(http.SessionState, 404, 410, 422))
    async def get_session(self, sid: str):
        return self._session(sid).summary()

    @app.delete("/v1/sessions/{sid}", tags=["sessions"], status_code=204, summary="Close a session",
                responses=http.responses(None, 404, 410, 422, status=204, description="closed"))
    async def delete_session(self, sid: str):
        self._session(sid)
        self.sessions.delete(sid)
        return Response(status_code=204)

    async def _run_ops(self, sid: str, ops: list[dict], mask_format: str = "rle") -> dict:
        s = self._session(sid)
        known = set((await self.pipeline.known_structures()).structures)
        t0 = time.perf_counter()
        async with s.lock:
            try:
                results = await s.apply(ops, self.pipeline, known)
            except SessionError as e:
                raise ApiError(422, str(e), session=s.summary()) from None
            finally:
                self.sessions.touch(s)
        for r in results:
            if r.get("op") in ("add_point", "add_box") and getattr(s, "last_result", None):
                r["cached_embedding"] = s.last_result.get("cached")
        return {"operations": ops, "results": results, "session": s.summary(),
                "mask": codecs.encode_mask(s.mask(), mask_format), "mask_format": mask_format,
                "timings_ms": {"total": round(1000 * (time.perf_counter() - t0), 2)}}

    @app.post("/v1/sessions/{sid}/commands", tags=["sessions"],
              summary="Apply a natural-language command ({\"text\": ...}) or operations ({\"operations\": [...]})",
              openapi_extra=app.body(json=http.CommandBody),
              responses=http.responses(http.CommandResponse, 400, 404, 410, 422, 504))
    async def command(self, sid: str, request: Request):
        self._session(sid)
        req = http.command_request(await request.body())
        ops = req.operations
        if req.text is not None:
            ops = await self.pipeline.call("commander", "parse", req.text)
            if isinstance(ops, NotUnderstood):
                raise ApiError(422, f"not understood: {ops.message}", text=req.text)
        return await self._run_ops(sid, ops, req.mask_format)

    @app.post("/v1/sessions/{sid}/undo", tags=["sessions"], summary="Undo the last change",
              responses=http.responses(http.CommandResponse, 404, 410, 422))
    async def undo(self, sid: str, steps: int = 1):
        return await self._run_ops(sid, [{"op": "undo", "steps": max(1, steps)}])

    @app.post("/v1/sessions/{sid}/redo", tags=["sessions"], summary="Redo the last undone change",
              responses=http.responses(http.CommandResponse, 404, 410, 422))
    async def redo(self, sid: str, steps: int = 1):
        return await self._run_ops(sid, [{"op": "redo", "steps": max(1, steps)}])

    @app.get("/v1/sessions/{sid}/mask", tags=["sessions"],
             summary="The session's mask: png (current slice), rle (JSON), nifti (every slice) or dicom-seg "
                     "(every slice, referencing the source DICOM images; sessions opened from DICOM only)",
             responses=http.responses(http.RleSlice, 404, 410, 422, files=MASK_FILES,
                                      description="rle: JSON; png, nifti, dicom-seg: the file"))
    async def get_mask(self, sid: str, format: str = "png", slice: int | None = None):
        s = self._session(sid)
        if slice is not None and not 0 <= slice < s.volume.shape[0]:
            raise ApiError(422, f"slice {slice} is outside 0..{s.volume.shape[0] - 1}")
        if format == "png":
            return Response(codecs.mask_png(s.mask(slice)), media_type="image/png")
        if format == "rle":
            return {"slice": s.state.slice if slice is None else slice, "mask": codecs.rle_encode(s.mask(slice))}
        if format == "nifti":
            vol = np.stack([s.mask(i) for i in range(s.volume.shape[0])]).astype(np.uint8)
            xyz = np.transpose(np.flip(vol, axis=(1, 2)), (2, 1, 0))  # back to the RAS+ (x, y, z) layout it came in
            spacing = tuple(s.spacing) + (1.0,) * (3 - len(s.spacing))
            ras = np.diag([*spacing[:3], 1.0])  # the RAS+ layout's own affine (encode_nifti's default is LPS)
            return Response(formats.encode_nifti(xyz, spacing[:3], affine=ras), media_type="application/gzip",
                            headers={"Content-Disposition": f'attachment; filename="{sid}.nii.gz"'})
        if format == "dicom-seg":
            if not s.sources:
                raise ApiError(422, dicom_seg_refusal(s.kind))
            vol = np.stack([s.mask(i) for i in range(s.volume.shape[0])])
            try:  # highdicom takes a moment on a long series: off the event loop
                data = await asyncio.to_thread(encode_segmentation, s.sources, vol, s.state.structure,
                                               software_version=app.version)
            except SegExportError as e:
                raise ApiError(422, str(e)) from None
            return Response(data, media_type="application/dicom",
                            headers={"Content-Disposition": f'attachment; filename="{sid}-seg.dcm"'})
        raise ApiError(422, f"format must be png, rle, nifti or dicom-seg, not {format!r}")

    @app.get("/v1/sessions/{sid}/image", tags=["sessions"], summary="The current slice as PNG, in the window",
             response_class=Response,
             responses=http.responses(None, 404, 410, 422, files=("image/png",), description="the slice"))
    async def get_image(self, sid: str, slice: int | None = None):
        s = self._session(sid)
        i = s.state.slice if slice is None else slice
        if not 0 <= i < s.volume.shape[0]:
            raise ApiError(422, f"slice {i} is outside 0..{s.volume.shape[0] - 1}")
        img = s.volume[i]
        if s.modality == "CT" and img.dtype != np.uint8:
            img = formats.apply_window(img, (s.state.window[1], s.state.window[2]))
        return Response(formats.encode_png(np.clip(img, 0, 255).astype(np.uint8)), media_type="image/png")
