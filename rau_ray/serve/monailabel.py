"""MONAI Label-compatible routes beside ``/v1/...``, so MONAI Label's clients work against this app unchanged.

``monailabel.client.MONAILabelClient``, 3D Slicer's MONAI Label module (server URL = this app's base URL) and OHIF's
MONAI Label extension call:

- ``GET /info/``: the models (``rau_segmentation``, ``sam2_interactive``) and the labels (the bank's structures).
- ``POST /infer/{model}?image=ID|session_id=ID&output=image|json|all|dicom_seg``: form field ``params`` (JSON:
  ``structures``, ``slice``, ``propagate``; ``foreground`` / ``background`` clicks and ``roi`` in the image's voxel
  indices, ``label``; ``result_extension`` .nii.gz | .nii | .nrrd) and optionally the image itself as file ``file``.
  Answers the label volume on the uploaded image's grid (NIfTI / NRRD), the params JSON, both as multipart (the
  default, as MONAI Label), or a DICOM-SEG (images sent as DICOM only).
- ``PUT /session/`` (files ``files``: a NIfTI, DICOM slices or a zip of them), ``GET|DELETE /session/{id}``.
- ``PUT /datastore/?image=ID`` (or ``/datastore/image``; file ``file``), ``GET /datastore/?output=stats|all|train``,
  ``DELETE /datastore/image?id=ID``: an in-memory datastore of uploaded images.
Every uploaded image (datastore or session) is an interactive session of the Ingress's ``SessionStore`` (its TTL
and limit apply: 410 once expired, 429 when full; also reachable as ``/v1/sessions/{id}``); MONAI Label's label
saving, training and active learning are not offered. Bad input is a 4xx ``{"error": ...}`` naming the problem.
The translation (models, params, voxel geometry, files) is in ``monailabel_mapping``.
Use: ``MonaiLabelRoutes`` is a base class of the Ingress and ``router`` is included in its FastAPI app
(``rau_ray.serve.routes``); the methods use the Ingress's ``sessions``, ``pipeline``, ``read`` and ``settings``.
"""

# No ``from __future__ import annotations``: FastAPI reads these signatures on the replica (see routes.py).
import asyncio
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from rau_ray.serve import auth, codecs, http
from rau_ray.serve import monailabel_mapping as mm
from rau_ray.serve.codecs import BadInput
from rau_ray.serve.dicom_seg import SegExportError, encode_segmentation
from rau_ray.serve.http import ApiError
from rau_ray.serve.sessions import (
    Session,
    SessionError,
    SessionGone,
    SessionLimit,
    SessionNotFound,
    VolumeSegmentation,
    dicom_seg_refusal,
    segment_volume,
)

# the app's pair refusal (503 naming both checkpoints) applies here too: an included router's routes do not carry
# the app's own dependencies
router = APIRouter(tags=["MONAI Label"], dependencies=[Depends(http.refuse_a_mismatched_pair)])
MAX_IMAGE_ID = 256


@dataclass(frozen=True)
class Upload:
    """What a client uploaded into a session: its file name, the NIfTI grid (None for DICOM / 2D images), when."""

    name: str
    geometry: mm.Geometry | None
    created: float  # wall clock, seconds


class MonaiLabelState:
    """The Ingress's MONAI Label bookkeeping: uploads by session id, datastore image ids -> session ids. Entries
    whose session expired or was deleted are dropped on the next change or listing."""

    def __init__(self):
        self.uploads: dict[str, Upload] = {}
        self.images: dict[str, str] = {}

    def prune(self, store) -> None:
        for sid in [sid for sid in self.uploads if store.peek(sid) is None]:
            del self.uploads[sid]
        for image_id in [i for i, sid in self.images.items() if sid not in self.uploads]:
            del self.images[image_id]


class MonaiLabelRoutes:
    """The routes, as methods of the Ingress (a base class of it: Serve's class-based view injects ``self``)."""

    @property
    def _ml(self) -> MonaiLabelState:
        state = self.__dict__.get("_monailabel_state")
        if state is None:
            state = self.__dict__["_monailabel_state"] = MonaiLabelState()
        return state

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _ml_stats(self) -> dict:
        self._ml.prune(self.sessions)
        return {"total": sum(1 for sid in self._ml.images.values() if auth.may_see(sid)), "completed": 0,
                "label_tags": {}}

    def _ml_decode(self, parts: list) -> tuple:
        """(Decoded, Geometry or None, file name) of uploaded file parts: a NIfTI / DICOM / PNG / JPEG file, or a
        DICOM series as several files or one zip."""
        if not parts:
            raise BadInput("no image file: send it as a multipart file field ('file'; 'files' for PUT /session/)",
                           422)
        limits = {"max_bytes": self.read.max_image_bytes, "max_pixels": self.read.max_pixels}
        name = parts[0][0]
        if len(parts) > 1 or codecs.is_zip(parts[0][1]):
            return codecs.decode_series(parts, **limits), None, name
        try:
            image = codecs.decode_image(parts[0][1], volumes=True, **limits)
        except BadInput as e:
            if e.status == 415 and name.lower().endswith(".nrrd"):
                raise BadInput(f"{mm.safe_name(name)}.nrrd: NRRD is not read here; send NIfTI (in 3D Slicer: "
                               "Settings > MONAI Label > file extension .nii.gz), DICOM or a zip of DICOM slices",
                               415) from None
            raise
        return image, (mm.Geometry.from_nifti(parts[0][1]) if image.kind == "nifti" else None), name

    def _ml_store(self, image, geometry, name: str) -> Session:
        self._ml.prune(self.sessions)
        auth.check_quota(self.sessions)
        try:
            s = self.sessions.create(image.array, image.modality or "CT", image.spacing, sources=image.sources,
                                     kind=image.kind)
        except SessionLimit as e:
            raise ApiError(429, str(e.args[0]), headers={"Retry-After": str(e.args[1])}) from None
        auth.own(s)
        self._ml.uploads[s.id] = Upload(name, geometry, time.time())
        return s

    def _ml_session(self, sid: str) -> Session:
        s = self.sessions.peek(sid)
        if s is not None:
            auth.check_owner(s)  # another key's session: 403, the session untouched
        try:
            return self.sessions.get(sid)
        except SessionGone as e:
            raise ApiError(410, str(e).replace("POST /v1/sessions", "PUT /session/")) from None
        except SessionNotFound:
            raise ApiError(404, f"no session {sid!r}; create one with PUT /session/ (files: the image)") from None

    def _ml_session_info(self, s: Session) -> dict:
        """A session as MONAI Label's ``SessionInfo.to_json()`` shows it (plus the session's own summary)."""
        up = self._ml.uploads.get(s.id)
        now, idle = time.time(), time.monotonic() - s.last_used
        created = up.created if up else now - (time.monotonic() - s.created)
        return {"name": s.id, "path": f"/v1/sessions/{s.id}", "image": mm.safe_name(up.name) if up else s.id,
                "meta": {k: v for k, v in s.summary().items() if k in ("shape", "slices", "modality", "spacing",
                                                                       "source_format", "exports")},
                "create_ts": int(created), "last_access_ts": int(now - idle),
                "expiry": int(self.sessions.ttl_s)}

    async def _ml_body(self, request: Request) -> tuple:
        """(params, files) of an /infer request: a multipart form (MONAI Label's client, 3D Slicer), a JSON object
        of the params themselves (OHIF), a urlencoded form, or no body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            fields, files = await self.read.form_or_json(request, max_files=codecs.MAX_SLICES)
            return mm.parse_params(fields.get("params")), files
        body = await request.body()
        if not body.strip():
            return {}, {}
        if ctype == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode(errors="replace"))
            return mm.parse_params((form.get("params") or [""])[0]), {}
        fields, _ = await self.read.form_or_json(request)
        if set(fields) == {"params"}:
            return mm.parse_params(fields["params"]), {}
        return fields, {}

    # -- info, datastore ---------------------------------------------------------------------------------------------
    @router.get("/info/", summary="MONAI Label: the models and labels", responses=http.responses(None))
    async def ml_info(self, request: Request):
        known = list((await self.pipeline.known_structures()).structures)
        return mm.info_body(known, request.app.version, self._ml_stats())

    @router.get("/datastore/", summary="MONAI Label: the uploaded images (output=stats|all|train)",
                responses=http.responses(None, 422))
    async def ml_datastore(self, output: str | None = None):
        stats = self._ml_stats()
        if output in (None, "", "stats"):
            return stats
        if output == "train":
            return []
        if output != "all":
            raise ApiError(422, f"output must be stats, all or train, not {output!r}")
        objects = {}
        for image_id, sid in self._ml.images.items():
            if not auth.may_see(sid):
                continue
            up = self._ml.uploads[sid]
            s = self.sessions.peek(sid)
            info = {"session": sid, "name": mm.safe_name(up.name), "ts": int(up.created),
                    **({"shape": list(s.volume.shape), "modality": s.modality} if s is not None else {})}
            objects[image_id] = {"image": {"ext": _ext(s.kind if s else None), "info": info}, "labels": {}}
        return {"name": "RAU-Ray", "description": "in-memory datastore: images uploaded to this Ingress, kept as "
                                                 "its sessions (their TTL and limit apply)",
                "images_dir": "", "labels_dir": "labels", "objects": objects}

    @router.put("/datastore/", summary="MONAI Label: upload an image (?image=ID; file field 'file')",
                responses=http.responses(None, 400, 413, 415, 422, 429))
    @router.put("/datastore/image", summary="MONAI Label: upload an image (?image=ID; file field 'file')",
                responses=http.responses(None, 400, 413, 415, 422, 429))
    async def ml_add_image(self, request: Request, image: str | None = None):
        _, files = await self.read.form_or_json(request, max_files=codecs.MAX_SLICES)
        decoded, geometry, name = self._ml_decode(files.get("file") or files.get("files") or [])
        image_id = image or mm.safe_name(name)
        if len(image_id) > MAX_IMAGE_ID:
            raise ApiError(422, f"image id is {len(image_id)} characters; at most {MAX_IMAGE_ID}")
        auth.note(image=image_id)
        if image_id in self._ml.images and not auth.may_see(self._ml.images[image_id]):
            raise ApiError(403, f"image id {image_id!r} is another API key's upload; pick another id")
        old = self._ml.images.pop(image_id, None)
        if old and self.sessions.peek(old) is not None:  # the same id again: the new image replaces the old one
            self.sessions.delete(old)
        s = self._ml_store(decoded, geometry, name)
        self._ml.images[image_id] = s.id
        return {"image": image_id, "session_id": s.id}

    @router.delete("/datastore/image", summary="MONAI Label: remove an uploaded image (?id=ID)",
                   responses=http.responses(None, 404))
    async def ml_remove_image(self, id: str):
        self._ml.prune(self.sessions)
        auth.note(image=id)
        if id in self._ml.images and not auth.may_see(self._ml.images[id]):
            raise ApiError(403, f"image {id!r} is another API key's upload")
        sid = self._ml.images.pop(id, None)
        if sid is None:
            raise ApiError(404, f"no image {id!r} in the datastore")
        if self.sessions.peek(sid) is not None:
            self.sessions.delete(sid)
        return {}

    # -- sessions ----------------------------------------------------------------------------------------------------
    @router.put("/session/", summary="MONAI Label: open a session on an image (file field(s) 'files')",
                responses=http.responses(None, 400, 413, 415, 422, 429))
    async def ml_create_session(self, request: Request):
        _, files = await self.read.form_or_json(request, max_files=codecs.MAX_SLICES)
        decoded, geometry, name = self._ml_decode(files.get("files", []) + files.get("file", []))
        s = self._ml_store(decoded, geometry, name)
        return {"session_id": s.id, "session_info": self._ml_session_info(s)}

    @router.get("/session/{session_id}", summary="MONAI Label: a session", responses=http.responses(None, 404, 410))
    async def ml_get_session(self, session_id: str):
        return self._ml_session_info(self._ml_session(session_id))

    @router.delete("/session/{session_id}", summary="MONAI Label: close a session",
                   responses=http.responses(None, 404, 410))
    async def ml_delete_session(self, session_id: str):
        info = self._ml_session_info(self._ml_session(session_id))
        self.sessions.delete(session_id)
        self._ml.prune(self.sessions)
        return info

    # -- inference ---------------------------------------------------------------------------------------------------
    @router.post("/infer/{model}", summary="MONAI Label: run a model on an uploaded image, a session or a file",
                 responses=http.responses(None, 400, 404, 410, 413, 415, 422, 429, 504,
                                          files=("multipart/form-data", "application/gzip", "application/dicom"),
                                          description="output=all (default): multipart params + label file; "
                                                      "image: the file; json: the params; dicom_seg: a DICOM-SEG"))
    async def ml_infer(self, model: str, request: Request, image: str = "", session_id: str = "",
                       output: str | None = None):
        if model not in mm.MODELS:
            raise ApiError(404, f"no model {model!r}; models: {', '.join(mm.MODELS)}")
        kind = mm.output_kind(output)
        params, files = await self._ml_body(request)
        ext = mm.result_extension(params)
        if files.get("label"):
            raise ApiError(422, f"model {model!r} takes no label input (scribbles are not offered here)")
        geometry, stem = None, mm.safe_name(image or session_id)
        if session_id:
            s = self._ml_session(session_id)
            up = self._ml.uploads.get(s.id)
            geometry = up.geometry if up else None
        elif files.get("file"):
            decoded, geometry, name = self._ml_decode(files["file"])
            s = Session(decoded.array, decoded.modality or "CT", decoded.spacing, sources=decoded.sources,
                        kind=decoded.kind)  # this request only: not stored
            stem = mm.safe_name(image or name)
        elif image:
            self._ml.prune(self.sessions)
            sid = self._ml.images.get(image)
            if sid is None:
                raise ApiError(404, f"no image {image!r} in the datastore; upload it first (PUT /datastore/?image="
                                    f"ID, file field 'file'), or send it with this request as the file field 'file'")
            s = self._ml_session(sid)
            geometry = self._ml.uploads[sid].geometry
        else:
            raise ApiError(422, "no image: give ?image=ID of an uploaded image (PUT /datastore/?image=ID), "
                                "?session_id=ID (PUT /session/), or the image itself as the multipart file field "
                                "'file'")
        if kind == "dicom_seg":  # refused before any model runs
            await self._ml_dicom_seg_check(s, model, params)
        t0 = time.perf_counter()
        if model == mm.MODEL_SEGMENT:
            labels, result = await self._ml_segment(s, geometry, params)
        else:
            labels, result = await self._ml_clicks(s, geometry, params)
        result["latencies"] = {"total": round(time.perf_counter() - t0, 3)}
        if kind == "json":
            return JSONResponse(result)
        if kind == "dicom_seg":
            return await self._ml_dicom_seg(s, labels, result, stem, request.app.version)
        name, data, media = mm.label_file(labels, geometry, s.spacing, f"{model}-{stem}", ext)
        if kind == "image":
            return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})
        body, content_type = mm.multipart(result, name, data, media)
        return Response(body, media_type=content_type)

    async def _ml_segment(self, s: Session, geometry, params: dict) -> tuple:
        """rau_segmentation: each structure segmented by the RAU chain on the key slice, then carried through the
        volume by SAM2 (box of the slice before, until a mask comes back empty): ``sessions.segment_volume``, as the
        PACS job does it."""
        known = list((await self.pipeline.known_structures()).structures)
        names = mm.pick_structures(params.get("structures"), known, self.settings.max_structures)
        propagate = mm.flag(params.get("propagate"), True)
        z = mm.key_slice(params.get("slice"), s.volume.shape[0], geometry)
        z = s.volume.shape[0] // 2 if z is None else z
        to_k = geometry.z_to_slice if geometry is not None else int

        async def one(name: str) -> VolumeSegmentation:
            try:  # the key slice given (or the middle one), then carried through as a session does it
                return await segment_volume(s.volume, s.modality, s.spacing, name, self.pipeline, set(known),
                                            start=[z], propagate=propagate)
            except SessionError as e:
                raise ApiError(422, f"{name}: {e}") from None

        done = await asyncio.gather(*(one(n) for n in names))
        labels = np.zeros(s.volume.shape, np.uint8)
        found = []
        for value, (name, vs) in enumerate(zip(names, done), 1):
            labels[vs.masks.reshape(labels.shape)] = value
            seg = vs.result
            found.append({"name": name, "value": value, "label": seg.get("label"), "score": seg.get("score"),
                          "reference": seg.get("reference"), "format_error": seg.get("format_error"),
                          "reasoning": seg.get("reasoning"), "timings_ms": seg.get("timings_ms"),
                          "slices": sorted(to_k(i) for i in vs.slices)})
        return labels, {"label_names": {n: v for v, n in enumerate(names, 1)}, "slice": to_k(z),
                        "propagate": propagate, "structures": found}

    async def _ml_clicks(self, s: Session, geometry, params: dict) -> tuple:
        """sam2_interactive: SAM2's prompt decoder on one slice with the clicks (and the ROI as a box)."""
        n, (h, w) = s.volume.shape[0], s.shape
        given = mm.key_slice(params.get("slice"), n, geometry)
        default_k = None if given is None else _k(geometry, given)  # a 2D click's k: the file's slice index
        clicks = [(p, 1) for p in mm.points(params.get("foreground"), "foreground")]
        clicks += [(p, 0) for p in mm.points(params.get("background"), "background")]
        roi = mm.roi(params.get("roi"))
        mapped = [(p, mm.session_point(p, geometry, default_k), lab) for p, lab in clicks]
        corners = [mm.session_point(c, geometry, default_k) for c in roi] if roi else []
        if not any(lab for *_, lab in mapped) and not corners:
            raise ApiError(422, "sam2_interactive needs a foreground click (params foreground: [[i, j, k]]) or a box "
                                "(params roi: [i1, i2, j1, j2, k1, k2])")
        for p, (z, row, col), _ in mapped + [(c, m, 1) for c, m in zip(roi or (), corners)]:
            if not (0 <= row < h and 0 <= col < w and (0 <= z < n)):
                raise ApiError(422, f"point {list(p)} is outside the image (voxel indices; {n} slice(s) of "
                                    f"{w}x{h} in the session's layout)")
        if given is not None:
            z = given
        elif mapped:
            z = mapped[-1][1][0]  # the slice of the latest click
        else:
            z = (corners[0][0] + corners[1][0]) // 2
        off = sorted({m[0] for _, m, _ in mapped if m[0] != z})
        if off:
            raise ApiError(422, f"clicks on more than one slice (slices {', '.join(str(_k(geometry, x)) for x in off)} "
                                f"besides {_k(geometry, z)}): sam2_interactive is a 2D model; send one slice's clicks "
                                "(or params slice)")
        box = None
        if corners:
            zs = sorted(c[0] for c in corners)
            if not zs[0] <= z <= zs[1]:
                raise ApiError(422, f"params roi does not cross slice {_k(geometry, z)}")
            rows, cols = sorted(c[1] for c in corners), sorted(c[2] for c in corners)
            box = [cols[0], rows[0], min(w, cols[1] + 1), min(h, rows[1] + 1)]
        points = [(col, row) for _, (_, row, col), _ in mapped]
        got = await self.pipeline.prompt(s.model_input(z), points or None, [lab for *_, lab in mapped] or None, box,
                                         key=s.model_input_key(z))
        label = str(params.get("label") or "sam2")
        labels = np.zeros(s.volume.shape, np.uint8)
        labels[z][got["mask"]] = 1
        return labels, {"label_names": {label: 1}, "slice": _k(geometry, z), "score": round(float(got["score"]), 4),
                        "cached_embedding": bool(got["cached"]), "box": box}

    async def _ml_dicom_seg_check(self, s: Session, model: str, params: dict) -> None:
        """output=dicom_seg needs a DICOM source and, here, one structure (the SEG writer's one segment)."""
        if not s.sources:
            raise ApiError(422, dicom_seg_refusal(s.kind))
        if model == mm.MODEL_SEGMENT:
            known = list((await self.pipeline.known_structures()).structures)
            names = mm.pick_structures(params.get("structures"), known, self.settings.max_structures)
            if len(names) != 1:
                raise ApiError(422, f"output=dicom_seg carries one structure a request, not {len(names)}; name one "
                                    "(params structures)")

    async def _ml_dicom_seg(self, s: Session, labels: np.ndarray, result: dict, stem: str, version: str):
        names = list(result["label_names"])
        try:  # highdicom takes a moment on a long series: off the event loop
            data = await asyncio.to_thread(encode_segmentation, s.sources, labels > 0, names[0],
                                           software_version=version)
        except SegExportError as e:
            raise ApiError(422, str(e)) from None
        return Response(data, media_type="application/dicom",
                        headers={"Content-Disposition": f'attachment; filename="{stem}-seg.dcm"'})


def _k(geometry, z: int) -> int:
    """A session slice as the client counts it (the file's third voxel index)."""
    return geometry.z_to_slice(z) if geometry is not None else int(z)


def _ext(kind: str | None) -> str:
    return {"nifti": ".nii.gz", "dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}.get(kind or "", "")
