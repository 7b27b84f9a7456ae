"""The FastAPI Ingress of the serving graph, the application builder for Serve configs, and ``start``/``stop``.

HTTP API (OpenAPI at ``/docs``, ``/openapi.json``): ``POST /v1/segment``, ``POST /v1/label``, sessions
(``POST /v1/sessions``, ``GET|DELETE /v1/sessions/{id}``, ``POST /v1/sessions/{id}/commands``,
``GET /v1/sessions/{id}/mask`` (png, rle, nifti, dicom-seg), ``GET /v1/sessions/{id}/image``,
``POST /v1/sessions/{id}/undo|redo``),
``GET /healthz``, ``GET /readyz``, and the web page at ``GET /`` (``rau_ray/serve/static/``).
Sessions live in the Ingress replica (see ``sessions``): cheap and consistent, at the price of one Ingress replica
(a second replica would not see the first one's sessions; scaling it out needs sticky routing or an external store).
Bad input is a 4xx with ``{"error": message}``; a model replica that dies is retried, then answered with 503.
The Commander's optional LLM fallback is set by the ``command_llm_*`` args (``AppArgs``).
Use: ``serve run serve_configs/local.yaml``; from Python ``base_url = start(profile="tiny", port=8000)``, ``stop()``.
"""


import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve

from rau_ray.errors import ConfigError
from rau_ray.serve import codecs, refusal
from rau_ray.serve.codecs import BadInput
from rau_ray.serve.deployments import Commander, Policy, Retriever, Segmenter
from rau_ray.serve.sessions import (SessionError, SessionGone, SessionLimit, SessionNotFound, SessionStore,
                                    dicom_seg_refusal, mask_box)

log = logging.getLogger("rau_ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "serve_configs" / "local.yaml"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


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


MULTIPART_OR_JSON = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"},
            "structures": {"type": "string", "description": "comma-separated names, e.g. 'liver,spleen'"},
            "modality": {"type": "string", "description": "CT (default), MR, XA, US, DX"},
            "reference_id": {"type": "string", "description": "a bank entry to use as the reference"},
            "reference_image": {"type": "string", "format": "binary"},
            "reference_mask": {"type": "string", "format": "binary", "description": "label map PNG (0 = none)"},
            "reference_labels": {"type": "string", "description": 'JSON {"1": "liver"} for reference_mask'},
            "mask_format": {"type": "string", "enum": ["rle", "png"]},
            "boxes": {"type": "string", "description": "/v1/label: JSON [[x1, y1, x2, y2], ...]"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_b64"], "properties": {
            "image_b64": {"type": "string"}, "structures": {"type": "array", "items": {"type": "string"}},
            "modality": {"type": "string"}, "mask_format": {"type": "string", "enum": ["rle", "png"]},
            "reference": {"type": "object", "properties": {
                "id": {"type": "string"}, "image_b64": {"type": "string"}, "mask_b64": {"type": "string"},
                "labels": {"type": "object"}}},
            "boxes": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}}}}}

_ALWAYS_ANSWERED = ("/healthz", "/docs", "/openapi.json")


async def _refuse_a_mismatched_pair(request: Request) -> None:
    """A checkpoint pair that does not belong together serves nothing: 503 with the reason, naming both."""
    if refusal.REASON and request.url.path not in _ALWAYS_ANSWERED:
        raise ApiError(503, refusal.REASON[0])


app = FastAPI(title="RAU-Ray", version="0.1.0", dependencies=[Depends(_refuse_a_mismatched_pair)],
              description="Reference-based anatomical understanding on Ray Serve: retrieval (DINOv2 + faiss) -> "
                          "policy (Qwen2.5-VL + LoRA, <Seg>) -> SAM2 + memory fusion; interactive sessions with "
                          "natural-language commands.")
app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")


@app.exception_handler(ApiError)
async def _api_error(request, e: ApiError):
    return JSONResponse({"error": e.message, **e.extra}, status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, e: RequestValidationError):
    return JSONResponse({"error": "invalid request", "detail": json.loads(json.dumps(e.errors(), default=str))},
                        status_code=422)


def _ray_unavailable_errors() -> tuple:
    import ray.exceptions as rx

    errors = [rx.RayActorError, rx.ActorUnavailableError]
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        errors += [BackPressureError, DeploymentUnavailableError]
    except ImportError:  # older Ray
        pass
    return tuple(errors)


async def _form_or_json(request: Request, limit: int) -> tuple[dict, dict]:
    """(fields, files) of a multipart form or a JSON object; files are bytes (JSON: base64 fields decoded)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit * 4 // 3 + 65536:
        raise BadInput(f"request body is {length} bytes; the limit is {limit} bytes of image", 413)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=32)
        except Exception as e:
            raise BadInput(f"malformed multipart form: {e}") from None
        fields, files = {}, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if value.size is not None and value.size > limit:
                    raise BadInput(f"{key} is {value.size} bytes; the limit is {limit} bytes", 413)
                files[key] = await value.read()
            else:
                fields[key] = value
        return fields, files
    if ctype in ("application/json", ""):
        body = await request.body()
        if len(body) > limit * 4 // 3 + 65536:
            raise BadInput(f"request body is {len(body)} bytes; the limit is {limit} bytes of image", 413)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInput(f"malformed JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadInput(f"expected a JSON object, got {type(data).__name__}")
        return data, {}
    raise BadInput(f"unsupported content type {ctype!r}; send multipart/form-data or application/json", 415)


def _structures(value) -> list[str]:
    if value is None or value == "" or value == []:
        raise BadInput("name at least one structure: structures='liver,spleen' (form) or [\"liver\"] (JSON)", 422)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadInput("structures must be a comma-separated string or a list of strings", 422)
    names = [s.strip().lower() for s in items if s.strip()]
    if not names:
        raise BadInput("structures is empty", 422)
    return list(dict.fromkeys(names))


OPERATIONS = ("segment", "add_point", "add_box", "undo", "redo", "clear", "set_window", "goto_slice", "propagate",
              "export", "show_metrics")


def _check_operations(ops) -> str | None:
    """Validate client-sent operations against the shared schema (jsonschema when installed)."""
    if not isinstance(ops, list) or not ops or len(ops) > 32:
        return "operations must be a non-empty list (at most 32)"
    try:
        from rau_ray.commands import operation_validator

        validator = operation_validator()
        for op in ops:
            validator.validate(op)
    except ImportError:
        if not all(isinstance(o, dict) and o.get("op") in OPERATIONS for o in ops):
            return f"each operation needs an op among {', '.join(OPERATIONS)}"
    except Exception as e:  # jsonschema.ValidationError
        return f"invalid operation: {getattr(e, 'message', e)}"
    return None


async def _await(response):
    return await response


def _prompt_decoder(profile: str, policy_checkpoint: str | None, segmenter_checkpoint: str | None, device: str,
                    threads: int | None, capacity: int):
    """The Ingress's PromptDecoder: the Segmenter's SAM2 (same checkpoint), on a GPU only if this replica has one."""
    import torch

    from rau_ray.serve.deployments import load_segmenter
    from rau_ray.serve.prompt_decoder import PromptDecoder

    if threads:
        torch.set_num_threads(int(threads))
    device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    return PromptDecoder(load_segmenter(profile, policy_checkpoint, segmenter_checkpoint, device)[1], capacity)


class _SessionBackend:
    """What a Session needs from the models: point/box prompts (decoded here or on the Segmenter, ``prompt_decoding``),
    the full pipeline for 'segment X'."""

    def __init__(self, ingress: "Ingress"):
        self.ingress = ingress

    async def prompt(self, image, points, labels, box, key: str | None = None):
        """Point/box prompts on an image's cached SAM2 embedding. ``prompt_decoding: ingress``: decoded right here
        (``PromptDecoder``) on the embedding fetched once from the Segmenter; ``segmenter``: decoded by the Segmenter
        replica holding the embedding. Either way the image's digest goes first (routed to the replica holding
        it, so no pixels travel) and the image itself only when that replica lacks it (first prompt, eviction, a
        replaced replica). ``key``: the image's digest when the caller has it (a session keeps it per slice)."""
        from rau_ray.models.rau import image_digest

        key, decoder = key or image_digest(image), self.ingress.decoder
        if decoder is None:
            return await self._on_segmenter("prompt", image, key, points, labels, box)
        cached = True
        if key not in decoder:
            got = await self._on_segmenter("embedding", image, key)
            decoder.put(key, got)
            cached = got["cached"]
        return {**decoder.predict(key, points, labels, box), "cached": cached}

    async def _on_segmenter(self, method: str, image, key: str, *args):
        out = await self.ingress._call("segmenter", method, key, *args, route_key=key)
        if out.get("missing"):
            out = await self.ingress._call("segmenter", method, image, *args, route_key=key)
        return out

    async def segment(self, session, target: str):
        """The full pipeline on the current slice; besides the mask, what /v1/segment returns for the structure
        (the policy's reasoning, label, box, timings), so a session's segment result needs no second request."""
        out = await self.ingress._segment_one(session.current_image(), session.modality, target, None, None)
        return {"mask": out["_mask"], **{k: out.get(k) for k in ("score", "reference", "label", "box", "reasoning",
                                                                 "format_error", "timings_ms")}}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=10)
@serve.ingress(app)
class Ingress:
    def __init__(self, retriever, policy, segmenter, commander, settings: dict | None = None,
                 decoder: dict | None = None):
        """``decoder``: None (prompts are decoded by the Segmenter), or the model spec (``profile``,
        ``policy_checkpoint``, ``segmenter_checkpoint``, ``device``, ``threads``, ``capacity``) of the SAM2 whose
        prompt decoder runs here (``prompt_decoding: ingress``)."""
        import rau_ray.data.tasks  # noqa: F401 - the request path's imports, paid at start-up, not by the first user
        import rau_ray.eval.matching  # noqa: F401
        import rau_ray.models.prompts  # noqa: F401
        import rau_ray.models.rau  # noqa: F401

        try:
            from rau_ray.commands import operation_validator

            operation_validator()  # built once here (7 ms), not in the first click's request
        except ImportError:
            pass

        self.h = {"retriever": retriever, "policy": policy, "segmenter": segmenter, "commander": commander}
        self.settings = Settings(**(settings or {}))
        refusal.REASON[:] = [self.settings.refusal] if self.settings.refusal else []
        if self.settings.refusal:
            log.error("refusing every request: %s", self.settings.refusal)
        self.sessions = SessionStore(self.settings.session_ttl_s, self.settings.max_sessions)
        self._known: dict | None = None
        self._unavailable = _ray_unavailable_errors()
        self.backend = _SessionBackend(self)
        self.decoder = _prompt_decoder(**decoder) if decoder else None

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _handle(self, which: str, route_key: str | None = None):
        """The deployment's handle; with ``route_key`` (an image digest) Serve routes to a replica that has seen
        that image (model multiplexing used as cache affinity: see ``Segmenter._holds``)."""
        h = self.h[which]
        if not h.is_initialized:
            try:  # route on this replica's event loop (every call here is made on it): no thread hop per call
                h._init(_run_router_in_separate_loop=False)
            except (TypeError, RuntimeError) as e:  # a Ray without the option: its default router
                log.info("handle %s: default router (%s)", which, e)
        return h.options(multiplexed_model_id=route_key) if route_key else h

    async def _call(self, which: str, method: str, *args, route_key: str | None = None, **kwargs):
        """A handle call with retries while Serve replaces a dead replica; 503 when it stays unavailable."""
        last = None
        for attempt in range(self.settings.retries):
            response = getattr(self._handle(which, route_key), method).remote(*args, **kwargs)
            try:
                return await asyncio.wait_for(_await(response), self.settings.request_timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, f"{which} did not answer within {self.settings.request_timeout_s:g} s") from None
            except self._unavailable as e:
                last = e
                log.warning("%s.%s unavailable (attempt %d): %s", which, method, attempt + 1, type(e).__name__)
                await asyncio.sleep(0.3 * (attempt + 1))
        raise ApiError(503, f"the {which} is unavailable right now ({type(last).__name__}); Serve is replacing it, "
                            "retry shortly", headers={"Retry-After": "2"})

    async def _known_structures(self) -> dict:
        if self._known is None:
            self._known = await self._call("retriever", "structures")
        return self._known

    def _decode(self, data: bytes | None, what: str = "image", volumes: bool = False) -> codecs.Decoded:
        if data is None:
            raise BadInput(f"missing {what}: send it as a multipart file field {what!r} or as {what}_b64 in JSON", 422)
        return codecs.decode_image(data, volumes=volumes, max_bytes=self.settings.max_image_bytes,
                                   max_pixels=self.settings.max_pixels)

    async def _one_image(self, request: Request, route: str) -> tuple[dict, dict, codecs.Decoded]:
        """(fields, files, decoded image) of a request that takes one 2D image; a volume is refused (BadInput)."""
        fields, files = await _form_or_json(request, self.settings.max_image_bytes)
        image = self._decode(self._image_field(fields, files))
        if image.is_volume:
            raise BadInput(f"a volume goes to POST /v1/sessions; {route} takes one 2D image", 422)
        return fields, files, image

    def _image_field(self, fields: dict, files: dict, name: str = "image") -> bytes | None:
        if name in files:
            return files[name]
        if fields.get(f"{name}_b64") is not None:
            return codecs.b64decode(fields[f"{name}_b64"], f"{name}_b64")
        return None

    def _reference(self, fields: dict, files: dict) -> dict | None:
        """A reference given by the client: a bank id, or an image + label map (+ names)."""
        ref = fields.get("reference")
        if isinstance(ref, dict):
            if ref.get("id"):
                return {"id": str(ref["id"])}
            image = codecs.b64decode(ref.get("image_b64"), "reference.image_b64")
            mask = codecs.b64decode(ref.get("mask_b64"), "reference.mask_b64")
            labels = ref.get("labels")
        elif ref is not None:
            raise BadInput("reference must be an object: {\"id\": ...} or {\"image_b64\", \"mask_b64\", \"labels\"}",
                           422)
        elif fields.get("reference_id"):
            return {"id": str(fields["reference_id"])}
        elif "reference_image" in files or "reference_mask" in files:
            image, mask = files.get("reference_image"), files.get("reference_mask")
            if image is None or mask is None:
                raise BadInput("a reference needs both reference_image and reference_mask", 422)
            labels = fields.get("reference_labels")
            if isinstance(labels, str):
                try:
                    labels = json.loads(labels)
                except ValueError as e:
                    raise BadInput(f"reference_labels is not JSON: {e}") from None
        else:
            return None
        img = self._decode(image, "reference_image")
        lab = self._decode(mask, "reference_mask").array
        if lab.shape != img.array.shape:
            raise BadInput(f"reference mask {lab.shape} and image {img.array.shape} differ in size", 422)
        lab = np.asarray(lab).astype(np.int32)
        values = sorted(int(v) for v in np.unique(lab) if v)
        if not values:
            raise BadInput("the reference mask is empty", 422)
        if labels is None:
            if len(values) != 1:
                raise BadInput("a reference mask with several values needs labels: {\"1\": \"liver\", ...}", 422)
            labels = {}
        if not isinstance(labels, dict):
            raise BadInput("reference labels must be an object {\"1\": \"liver\"}", 422)
        return {"image": img.array, "modality": img.modality or "CT", "label": lab,
                "names": {int(k): str(v).lower() for k, v in labels.items()}, "values": values}

    # -- the pipeline ----------------------------------------------------------------------------------------------
    async def _retrieve(self, target, modality, structure, ref_spec):
        from rau_ray.models.rau import Reference

        if ref_spec is not None and "image" in ref_spec:
            names = dict(ref_spec["names"])
            if not names:  # one value, named after the structure asked about
                names = {ref_spec["values"][0]: structure}
            return Reference(ref_spec["image"], ref_spec["label"], names, ref_spec["modality"], None, None), 0.0
        out = await self._call("retriever", "retrieve", target, modality, structure,
                               ref_spec["id"] if ref_spec else None)
        if isinstance(out, Exception):
            raise ApiError(422, str(out))
        return out["reference"], out["seconds"]

    async def _policy_then_segmenter(self, ask: dict, tgt_u8, ref_u8, ref_mask) -> tuple[dict, dict, float]:
        """The Policy's answer and the Segmenter's mask, with the Segmenter working alongside the Policy: its
        ``prepare`` (embeddings, reference memory) runs while the Policy generates, and the Policy's pending
        response is handed to ``Segmenter.segment`` as an argument, so only the <Seg> hidden state is waited for.
        Returns (answer, segmentation, time the answer arrived). When a replica is unavailable, falls back to the
        calls one after the other, each with ``_call``'s retries."""
        from rau_ray.models.rau import image_digest

        key, token = image_digest(tgt_u8), uuid.uuid4().hex
        images = (tgt_u8, ref_u8, ref_mask)
        try:
            pol_resp = self._handle("policy").answer.remote(ask)
            segmenter = self._handle("segmenter", key)  # prepare and segment go to the replica holding the image
            prepared = segmenter.prepare.remote(token, *images)
            seg_resp = segmenter.segment.remote(token, pol_resp)
            pol = await asyncio.wait_for(_await(pol_resp), self.settings.request_timeout_s)
            t_pol = time.perf_counter()
            seg = await asyncio.wait_for(_await(seg_resp), self.settings.request_timeout_s)
            with contextlib.suppress(Exception):  # its failure, if any, is the segment call's below
                await prepared
            if seg.get("missing"):  # prepared on another replica (or lost): send the images
                seg = await self._call("segmenter", "segment", token, pol["seg_hidden"], *images, route_key=key)
            return pol, seg, t_pol
        except asyncio.TimeoutError:
            raise ApiError(504, f"the policy or segmenter did not answer within "
                                f"{self.settings.request_timeout_s:g} s") from None
        except self._unavailable as e:
            log.warning("policy -> segmenter chain unavailable (%s); calling one after the other",
                        type(e).__name__)
        pol = await self._call("policy", "answer", ask)
        t_pol = time.perf_counter()
        return pol, await self._call("segmenter", "segment", token, pol["seg_hidden"], *images, route_key=key), t_pol

    async def _segment_one(self, target, modality, structure, ref_spec, mask_format, reasoning: bool = True) -> dict:
        from rau_ray.data.tasks import label_boxes
        from rau_ray.models.prompts import to_pil

        t0 = time.perf_counter()
        timings = {}
        ref, timings["retrieval"] = await self._retrieve(target, modality, structure, ref_spec)
        by_name = {v: k for k, v in ref.names.items()}
        if structure not in by_name:
            raise ApiError(422, f"structure {structure!r} is not annotated in the reference; it has "
                                f"{', '.join(sorted(by_name))}", known=sorted(by_name))
        ref_mask = ref.label == by_name[structure]
        if not ref_mask.any():
            raise ApiError(422, f"structure {structure!r} has no pixels in the reference image")
        ref_u8 = np.asarray(to_pil(ref.image, ref.modality))
        tgt_u8 = np.asarray(to_pil(target, modality))
        ask = {"task": "segment", "ref_image": ref_u8, "ref_boxes": label_boxes(ref.label, ref.names),
               "target": tgt_u8, "structure": structure, "modality": modality}
        t1 = time.perf_counter()
        pol, seg, t_pol = await self._policy_then_segmenter(ask, tgt_u8, ref_u8, ref_mask)
        timings["policy"] = t_pol - t1
        timings.update({f"policy_{k}": v for k, v in pol["timings"].items() if k != "batch"})
        timings["segmenter"] = time.perf_counter() - t_pol
        timings.update({f"segmenter_{k}": v for k, v in seg["timings"].items()})
        mask = seg["mask"]
        timings["total"] = time.perf_counter() - t0
        out = {"structure": structure, "label": pol["label"] or structure, "box": pol["box"] or mask_box(mask),
               "score": round(float(seg["score"]), 4),
               "reference": {"id": ref.row["id"], "similarity": ref.similarity} if ref.row else {"id": "client"},
               "format_error": pol["format_error"], "policy_batch": pol["timings"].get("batch"),
               "cached_embedding": bool(seg.get("cached")),
               "timings_ms": {k: round(1000 * v, 2) for k, v in timings.items()}, "_mask": mask}
        if reasoning:
            out["reasoning"] = pol["completion"]
        if mask_format:
            out["mask"] = codecs.encode_mask(mask, mask_format)
        return out

    # -- routes -----------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(self):
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse("<!doctype html><title>RAU-Ray</title><h1>RAU-Ray</h1><p>The web page is not "
                            "installed; the API is at <a href='docs'>/docs</a>.</p>")

    @app.get("/healthz", tags=["health"], summary="Liveness: the Ingress answers")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every deployment answers")
    async def readyz(self):
        checks = {"retriever": ("structures", ()), "policy": ("batch_sizes", ()),
                  "segmenter": ("cache_info", ()), "commander": ("parse", ("undo",))}

        async def one(name, method, args):
            try:
                await asyncio.wait_for(_await(getattr(self._handle(name), method).remote(*args)), 10)
                return name, "ok"
            except Exception as e:  # noqa: BLE001 - any failure means not ready
                return name, f"{type(e).__name__}: {e}"[:200]

        results = dict(await asyncio.gather(*(one(n, m, a) for n, (m, a) in checks.items())))
        ready = all(v == "ok" for v in results.values())
        return JSONResponse({"ready": ready, "deployments": results, "sessions": len(self.sessions)},
                            status_code=200 if ready else 503)

    @app.get("/v1/structures", tags=["segment"], summary="Structures and modalities the reference bank knows")
    async def structures(self):
        return await self._known_structures()

    @app.post("/v1/segment", tags=["segment"], openapi_extra=MULTIPART_OR_JSON,
              summary="Segment named structures in an image (multipart or JSON)")
    async def segment(self, request: Request):
        try:
            fields, files, image = await self._one_image(request, "/v1/segment")
            names = _structures(fields.get("structures"))
            if len(names) > self.settings.max_structures:
                raise BadInput(f"{len(names)} structures; at most {self.settings.max_structures} a request", 422)
            mask_format = fields.get("mask_format") or "rle"
            if mask_format not in ("rle", "png"):
                raise BadInput(f"mask_format must be 'rle' or 'png', not {mask_format!r}", 422)
            modality = str(fields.get("modality") or image.modality or "CT")
            ref_spec = self._reference(fields, files)
        except BadInput as e:
            raise ApiError(e.status, e.message) from None
        if ref_spec is None or "id" in ref_spec:
            known = (await self._known_structures())["structures"]
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ApiError(422, f"unknown structure(s) {', '.join(map(repr, unknown))}; known: "
                                    f"{', '.join(known)}", known=known)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._segment_one(image.array, modality, n, ref_spec, mask_format)
                                         for n in names))
        for r in results:
            r.pop("_mask")
        return {"image": {"height": int(image.array.shape[0]), "width": int(image.array.shape[1]),
                          "modality": modality, "format": image.kind},
                "mask_format": mask_format, "results": results,
                "timings_ms": {"total": round(1000 * (time.perf_counter() - t0), 2)}}

    @app.post("/v1/label", tags=["label"], openapi_extra=MULTIPART_OR_JSON,
              summary="Name the regions of an image (given boxes, or found ones) with global OT matching")
    async def label(self, request: Request):
        from rau_ray.data.tasks import label_boxes
        from rau_ray.eval.matching import MatchConfig, assign
        from rau_ray.models.prompts import to_pil

        try:
            fields, files, image = await self._one_image(request, "/v1/label")
            modality = str(fields.get("modality") or image.modality or "CT")
            boxes = fields.get("boxes")
            if isinstance(boxes, str):
                try:
                    boxes = json.loads(boxes)
                except ValueError as e:
                    raise BadInput(f"boxes is not JSON: {e}") from None
            h, w = image.array.shape
            if boxes is not None:
                ok = isinstance(boxes, list) and len(boxes) <= 64 and all(
                    isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                    and 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for b in boxes)
                if not ok:
                    raise BadInput(f"boxes must be a list (at most 64) of [x1, y1, x2, y2] with 0 <= x1 < x2 <= {w} "
                                   f"and 0 <= y1 < y2 <= {h}", 422)
            method = fields.get("method") or "emd"
            cfg = MatchConfig(method=method) if method in ("emd", "sinkhorn", "fgw", "independent") else None
            if cfg is None:
                raise BadInput(f"method must be emd, sinkhorn, fgw or independent, not {method!r}", 422)
            ref_spec = self._reference(fields, files)
        except BadInput as e:
            raise ApiError(e.status, e.message) from None
        t0 = time.perf_counter()
        ref, _ = await self._retrieve(image.array, modality, None, ref_spec)
        protos = label_boxes(ref.label, ref.names)
        rh, rw = ref.label.shape
        ref_u8, tgt_u8 = np.asarray(to_pil(ref.image, ref.modality)), np.asarray(to_pil(image.array, modality))
        source = "client"
        if boxes is None:  # the policy's boxes for every structure; failing that, the reference's, scaled
            ans = await self._call("policy", "answer", {"task": "all_boxes", "ref_image": ref_u8, "ref_boxes": protos,
                                                        "target": tgt_u8, "modality": modality})
            boxes, source = [b for _, b in ans.get("boxes") or []], "policy"
            if not boxes:
                boxes = [[b[0] * w / rw, b[1] * h / rh, b[2] * w / rw, b[3] * h / rh] for b in protos.values()]
                source = "reference"
        answers = await asyncio.gather(*(self._call("policy", "answer", {
            "task": "label", "ref_image": ref_u8, "ref_boxes": protos, "target": tgt_u8,
            "region": [int(round(v)) for v in b], "modality": modality}) for b in boxes))
        predicted = [a["label"] for a in answers]
        result = assign(boxes, (w, h), protos, (rw, rh), cfg, predicted)
        regions = [{"box": [round(float(v), 1) for v in b], "label": lab, "policy_label": p,
                    "cost": None if c != c else round(c, 4)}
                   for b, lab, p, c in zip(boxes, result.labels, predicted, result.costs)]
        return {"regions": regions, "boxes_from": source, "method": method,
                "reference": {"id": ref.row["id"], "similarity": ref.similarity} if ref.row else {"id": "client"},
                "timings_ms": {"total": round(1000 * (time.perf_counter() - t0), 2)}}

    # -- sessions ---------------------------------------------------------------------------------------------------
    def _session(self, sid: str):
        try:
            return self.sessions.get(sid)
        except SessionGone as e:
            raise ApiError(410, str(e)) from None
        except SessionNotFound as e:
            raise ApiError(404, str(e)) from None

    @app.post("/v1/sessions", tags=["sessions"], status_code=201, openapi_extra=MULTIPART_OR_JSON,
              summary="Open an interactive session on an image or a volume (NIfTI / DICOM)")
    async def create_session(self, request: Request):
        try:
            fields, files = await _form_or_json(request, self.settings.max_image_bytes)
            image = self._decode(self._image_field(fields, files), volumes=True)
        except BadInput as e:
            raise ApiError(e.status, e.message) from None
        modality = str(fields.get("modality") or image.modality or "CT")
        try:
            s = self.sessions.create(image.array, modality, image.spacing, sources=image.sources, kind=image.kind)
        except SessionLimit as e:
            raise ApiError(429, str(e.args[0]), headers={"Retry-After": str(e.args[1])}) from None
        known = await self._known_structures()
        return JSONResponse({**s.summary(), "structures": known["structures"], "ttl_s": self.sessions.ttl_s},
                            status_code=201, headers={"Location": f"/v1/sessions/{s.id}"})

    @app.get("/v1/sessions/{sid}", tags=["sessions"], summary="A session's state")
    async def get_session(self, sid: str):
        return self._session(sid).summary()

    @app.delete("/v1/sessions/{sid}", tags=["sessions"], status_code=204, summary="Close a session")
    async def delete_session(self, sid: str):
        self._session(sid)
        self.sessions.delete(sid)
        return Response(status_code=204)

    async def _run_ops(self, sid: str, ops: list[dict], mask_format: str = "rle") -> dict:
        s = self._session(sid)
        known = set((await self._known_structures())["structures"])
        t0 = time.perf_counter()
        async with s.lock:
            try:
                results = await s.apply(ops, self.backend, known)
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
              summary="Apply a natural-language command ({\"text\": ...}) or operations ({\"operations\": [...]})")
    async def command(self, sid: str, request: Request):
        self._session(sid)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict) or ("text" in body) == ("operations" in body):
            raise ApiError(422, 'send {"text": "add a point at 40, 50"} or {"operations": [...]}')
        mask_format = body.get("mask_format", "rle")
        if mask_format not in ("rle", "png"):
            raise ApiError(422, f"mask_format must be 'rle' or 'png', not {mask_format!r}")
        if "text" in body:
            if not isinstance(body["text"], str):
                raise ApiError(422, "text must be a string")
            ops = await self._call("commander", "parse", body["text"])
            if isinstance(ops, dict):
                raise ApiError(422, f"not understood: {ops['error']}", text=body["text"])
        else:
            ops = body["operations"]
            problem = _check_operations(ops)
            if problem:
                raise ApiError(422, problem)
        return await self._run_ops(sid, ops, mask_format)

    @app.post("/v1/sessions/{sid}/undo", tags=["sessions"], summary="Undo the last change")
    async def undo(self, sid: str, steps: int = 1):
        return await self._run_ops(sid, [{"op": "undo", "steps": max(1, steps)}])

    @app.post("/v1/sessions/{sid}/redo", tags=["sessions"], summary="Redo the last undone change")
    async def redo(self, sid: str, steps: int = 1):
        return await self._run_ops(sid, [{"op": "redo", "steps": max(1, steps)}])

    @app.get("/v1/sessions/{sid}/mask", tags=["sessions"],
             summary="The session's mask: png (current slice), rle (JSON), nifti (every slice) or dicom-seg "
                     "(every slice, referencing the source DICOM images; sessions opened from DICOM only)")
    async def get_mask(self, sid: str, format: str = "png", slice: int | None = None):
        s = self._session(sid)
        if slice is not None and not 0 <= slice < s.volume.shape[0]:
            raise ApiError(422, f"slice {slice} is outside 0..{s.volume.shape[0] - 1}")
        if format == "png":
            return Response(codecs.mask_png(s.mask(slice)), media_type="image/png")
        if format == "rle":
            return {"slice": s.state.slice if slice is None else slice, "mask": codecs.rle_encode(s.mask(slice))}
        if format == "nifti":
            from rau_ray.data.formats import encode_nifti

            vol = np.stack([s.mask(i) for i in range(s.volume.shape[0])]).astype(np.uint8)
            xyz = np.transpose(np.flip(vol, axis=1), (2, 1, 0))  # back to the RAS+ (x, y, z) layout it came in
            spacing = tuple(s.spacing) + (1.0,) * (3 - len(s.spacing))
            return Response(encode_nifti(xyz, spacing[:3]), media_type="application/gzip",
                            headers={"Content-Disposition": f'attachment; filename="{sid}.nii.gz"'})
        if format == "dicom-seg":
            from rau_ray.serve.dicom_seg import SegExportError, encode_segmentation

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

    @app.get("/v1/sessions/{sid}/image", tags=["sessions"], summary="The current slice as PNG, in the window")
    async def get_image(self, sid: str, slice: int | None = None):
        from rau_ray.data.formats import apply_window

        s = self._session(sid)
        i = s.state.slice if slice is None else slice
        if not 0 <= i < s.volume.shape[0]:
            raise ApiError(422, f"slice {i} is outside 0..{s.volume.shape[0] - 1}")
        img = s.volume[i]
        if s.modality == "CT" and img.dtype != np.uint8:
            img = apply_window(img, (s.state.window[1], s.state.window[2]))
        return Response(codecs.formats.encode_png(np.clip(img, 0, 255).astype(np.uint8)), media_type="image/png")


# ------------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class AppArgs:
    """``args:`` of a Serve config application (``import_path: rau_ray.serve.app:build_app``)."""

    profile: str = "tiny"
    bank_dir: str | None = None  # None: the tiny profile builds a small CT phantom bank at start-up
    policy_checkpoint: str | None = None
    segmenter_checkpoint: str | None = None
    device: str = "cpu"  # cpu | cuda | auto
    threads: int | None = 1  # torch threads per replica (None: torch's default)
    policy_batch_size: int = 8  # @serve.batch max_batch_size; 1 = unbatched
    policy_batch_wait_s: float = 0.01  # a lone request on an idle replica skips it; under load the queued ones get in
    max_new_tokens: int | None = None
    embedding_cache: int | None = None
    # Where a click's SAM2 prompt decoder runs: "segmenter" (the replica holding the image's embedding; GPUs) or
    # "ingress" (next to the sessions, on the embedding fetched once per image: no handle hop per click, for CPUs
    # and small models; see rau_ray/serve/prompt_decoder.py).
    prompt_decoding: str = "segmenter"
    ingress_embedding_cache: int = 32  # images whose embeddings the Ingress keeps for prompt_decoding: ingress
    session_ttl_s: float = 900.0
    max_sessions: int = 64
    max_image_bytes: int = codecs.MAX_IMAGE_BYTES
    max_pixels: int = codecs.MAX_PIXELS
    # The Commander's optional LLM fallback for commands the deterministic parser cannot read (rau_ray.commands):
    # any OpenAI-compatible /v1/chat/completions server (vLLM, llama.cpp, Ollama...). Off while the URL is None.
    command_llm_url: str | None = None
    command_llm_model: str | None = None  # required with a URL: the model name the server knows
    command_llm_api_key_env: str | None = None  # NAME of an env var of the replicas holding the key, never the key
    command_llm_timeout_s: float = 10.0

    def validate(self) -> None:

        if self.prompt_decoding not in ("segmenter", "ingress"):
            raise ConfigError(f"serve args.prompt_decoding must be 'segmenter' or 'ingress', not "
                              f"{self.prompt_decoding!r}")
        if self.ingress_embedding_cache < 1:
            raise ConfigError("serve args.ingress_embedding_cache must be >= 1")
        if self.command_llm_url is None:
            return
        if not self.command_llm_url.startswith(("http://", "https://")):
            raise ConfigError(f"serve args.command_llm_url must be an http(s) URL, not {self.command_llm_url!r}")
        if not self.command_llm_model:
            raise ConfigError("serve args.command_llm_model is required with command_llm_url (the model name the "
                              "chat completions server serves)")
        env = self.command_llm_api_key_env
        if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", env):
            raise ConfigError("serve args.command_llm_api_key_env is the NAME of an environment variable holding the "
                              "key (e.g. OPENAI_API_KEY), not the key itself; keep keys out of config files")
        if not self.command_llm_timeout_s > 0:
            raise ConfigError("serve args.command_llm_timeout_s must be > 0")


def build_app(args: dict | None = None):
    """The application builder of the Serve configs (``import_path: rau_ray.serve.app:build_app``, ``args:`` ->
    ``AppArgs``); Serve calls it with exactly one argument, the args dict, and applies the config's
    ``deployments:`` options itself."""
    return build_graph(args)


def pair_refusal(policy_checkpoint: str | None, segmenter_checkpoint: str | None) -> str | None:
    """Why a policy + segmenter checkpoint pair must not serve (``check_pair``'s error, naming both), else None.
    A checkpoint that cannot be read still fails the deployment as before (a DataError naming the file)."""
    from rau_ray.errors import ConfigError
    from rau_ray.models import checkpoint as ckpt

    if not (policy_checkpoint and segmenter_checkpoint):
        return None
    try:
        ckpt.check_pair(ckpt.read_checkpoint(policy_checkpoint),
                        ckpt.read_checkpoint(segmenter_checkpoint, kind="seg"))
    except ConfigError as e:
        return str(e)
    return None


def build_graph(args: dict | None = None, options: dict | None = None):
    """The Serve application: Ingress(Retriever, Policy, Segmenter, Commander). ``options``: per-deployment
    ``.options(...)`` (a Serve config's ``deployments:`` section does the same)."""
    from rau_ray.config import from_dict

    a = from_dict(AppArgs, dict(args or {}), "serve args")
    options = options or {}

    def opt(dep):
        o = options.get(dep.name)
        return dep.options(**o) if o else dep

    refused = pair_refusal(a.policy_checkpoint, a.segmenter_checkpoint)
    # a refused pair: the deployments start on the profile's own models (never asked); the Ingress answers 503
    policy_ck, segmenter_ck = (None, None) if refused else (a.policy_checkpoint, a.segmenter_checkpoint)
    common = {"profile": a.profile, "policy_checkpoint": policy_ck, "segmenter_checkpoint": segmenter_ck,
              "device": a.device, "threads": a.threads}
    retriever = opt(Retriever).bind(bank_dir=a.bank_dir, **common)
    policy = opt(Policy).bind(max_batch_size=a.policy_batch_size, batch_wait_timeout_s=a.policy_batch_wait_s,
                              max_new_tokens=a.max_new_tokens, **common)
    segmenter = opt(Segmenter).bind(embedding_cache=a.embedding_cache, **common)
    commander = opt(Commander).bind(llm_url=a.command_llm_url, llm_model=a.command_llm_model,
                                    llm_api_key_env=a.command_llm_api_key_env, llm_timeout_s=a.command_llm_timeout_s)
    settings = asdict(Settings(session_ttl_s=a.session_ttl_s, max_sessions=a.max_sessions,
                               max_image_bytes=a.max_image_bytes, max_pixels=a.max_pixels, refusal=refused))
    decoder = ({**common, "capacity": a.ingress_embedding_cache} if a.prompt_decoding == "ingress" else None)
    return opt(Ingress).bind(retriever, policy, segmenter, commander, settings, decoder)


def local_options(path: Path = LOCAL_CONFIG) -> tuple[dict, dict]:
    """(args, deployment options) of a Serve config file's first application."""
    import yaml

    if not path.is_file():
        return {}, {}
    conf = yaml.safe_load(path.read_text())
    application = conf["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments", [])}
    return dict(application.get("args") or {}), options


_STARTED: dict = {}


def start(profile: str = "tiny", route_prefix: str = "/", port: int = 8000, host: str = "127.0.0.1",
          name: str = "rau", timeout_s: float = 300.0, options: dict | None = None, **args) -> str:
    """Run the app on the Ray cluster this process is connected to (``ray_session.connect()`` if none) and wait
    until ``/readyz`` is 200; returns the base URL. Deployment options come from serve_configs/local.yaml, then
    ``options`` ({deployment name: {option: value}}); ``args`` are ``AppArgs`` fields. The file's checkpoints (the
    shipped pair) are a pair: a caller naming either checkpoint, or another profile, serves without them."""
    import os
    import urllib.error
    import urllib.request

    from rau_ray import ray_session

    ray_session.connect()
    conf_args, conf_options = local_options()
    if {"policy_checkpoint", "segmenter_checkpoint"} & set(args) or profile != conf_args.get("profile", profile):
        conf_args = {k: v for k, v in conf_args.items() if k not in ("policy_checkpoint", "segmenter_checkpoint")}
    merged = {k: dict(v) for k, v in conf_options.items()}
    for dep, o in (options or {}).items():
        merged[dep] = {**merged.get(dep, {}), **o}
    if "RAU_CACHE" in os.environ:  # replicas build/read the tiny models in the caller's cache
        for dep in ("Retriever", "Policy", "Segmenter", "Commander", "Ingress"):
            o = merged.setdefault(dep, {})
            rao = dict(o.get("ray_actor_options") or {})
            env = dict(rao.get("runtime_env") or {})
            env["env_vars"] = {**(env.get("env_vars") or {}), "RAU_CACHE": os.environ["RAU_CACHE"]}
            rao["runtime_env"] = env
            o["ray_actor_options"] = rao
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_graph({**conf_args, "profile": profile, **args}, merged), name=name, route_prefix=route_prefix,
              blocking=False)
    base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    deadline, last = time.monotonic() + timeout_s, ""
    while True:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=10) as r:
                if r.status == 200:
                    break
        except urllib.error.HTTPError as e:  # 503: not every deployment answers yet, or a refused pair
            last = e.read().decode(errors="replace")[:2000]
            refused = _refusal_in(last)
            if refused:  # the app is up and answers 503 with the reason; the caller is told now, not at timeout
                raise ConfigError(f"the RAU app at {base} refuses to serve: {refused}")
        except Exception as e:  # noqa: BLE001 - not up yet
            last = repr(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the RAU app did not become ready within {timeout_s:g} s at {base}: {last}")
        time.sleep(0.5)
    _STARTED.update(name=name, base=base)
    return base


def _refusal_in(body: str) -> str | None:
    """A /readyz 503 body's refusal (the pair check's reason), as opposed to deployments still starting."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("error") if isinstance(answer, dict) and "deployments" not in answer else None


def stop() -> None:
    """Shut Serve down on this cluster (every application, the proxy, the controller)."""
    serve.shutdown()
    _STARTED.clear()
