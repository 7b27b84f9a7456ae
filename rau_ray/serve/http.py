"""The HTTP side of the serving app: errors, request parsing, and the request / response models of the routes.

- Errors: ``ApiError`` (status, message, extra fields) and ``codecs.BadInput`` both answer ``{"error": message, ...}``
  with their status; a request FastAPI itself cannot validate (a path or query parameter) is a 422
  ``{"error": "invalid request", "detail": [...]}``. A refused checkpoint pair (``refusal``) answers 503 on every
  route but ``/healthz`` and the docs.
- Parsing: the image routes take a multipart form or a JSON object (base64 images); ``Reader`` turns either into a
  typed request (``SegmentRequest``, ``LabelRequest``, ``SessionRequest``) with the project's own messages for bad
  input (``BadInput``: 400 / 413 / 415 / 422), and ``command_request`` reads a session command's JSON body.
- Models: pydantic models of every request body and response. FastAPI generates the OpenAPI document from them
  (``/openapi.json``, ``/docs``): responses through ``responses=``, and the hand-parsed bodies through
  ``Api.body(form=..., json=...)``, which points each content type at its model's generated schema (``Api.openapi``
  adds those schemas to the document's components). The models document; the parsing above decides.
Use: ``app = new_app(static_dir)``; ``@app.post(path, openapi_extra=app.body(form=SegmentForm, json=SegmentJson),
responses=responses(SegmentResponse))``; ``await Reader(limit, pixels).segment(request, max_structures)``.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema
from pydantic.json_schema import models_json_schema

from rau_ray.commands import OPERATION_SCHEMA, operation_validator
from rau_ray.serve import codecs, refusal
from rau_ray.serve.codecs import BadInput

MASK_FORMATS = ("rle", "png")
MATCH_METHODS = ("emd", "sinkhorn", "fgw", "independent")
MAX_BOXES = 64
MAX_OPERATIONS = 32
ALWAYS_ANSWERED = ("/healthz", "/docs", "/openapi.json")


# ------------------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An answer other than 2xx: ``{"error": message, **extra}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message, **e.extra}, status_code=e.status, headers=e.headers)


async def bad_input(request: Request, e: BadInput) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "invalid request", "detail": json.loads(json.dumps(e.errors(), default=str))},
                        status_code=422)


async def refuse_a_mismatched_pair(request: Request) -> None:
    """A checkpoint pair that does not belong together serves nothing: 503 with the reason, naming both."""
    if refusal.REASON and request.url.path not in ALWAYS_ANSWERED:
        raise ApiError(503, refusal.REASON[0])


# ---------------------------------------------------------------------------------------------- the application
class Api(FastAPI):
    """FastAPI whose OpenAPI document also holds the schemas of the bodies the routes parse themselves."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body_models: dict[str, type[BaseModel]] = {}

    def body(self, *, form: type[BaseModel] | None = None, json: type[BaseModel] | None = None) -> dict:
        """``openapi_extra`` of a route reading its body itself: a required body, multipart ``form`` and/or
        ``json``, each content type's schema a reference to its model's generated schema."""
        content = {}
        for media_type, model in (("multipart/form-data", form), ("application/json", json)):
            if model is not None:
                self.body_models[model.__name__] = model
                content[media_type] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        return {"requestBody": {"required": True, "content": content}}

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = super().openapi()
            _, defs = models_json_schema([(m, "validation") for m in self.body_models.values()],
                                         ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            self.openapi_schema = doc
        return self.openapi_schema


def new_app(static: Path, **kwargs) -> Api:
    """The app: the pair refusal on every route, the error handlers, the web page's files at ``/static``."""
    app = Api(dependencies=[Depends(refuse_a_mismatched_pair)], **kwargs)
    app.mount("/static", StaticFiles(directory=static, check_dir=False), name="static")
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BadInput, bad_input)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


# ------------------------------------------------------------------------------------------ request bodies (docs)
Operation = Annotated[dict[str, Any], WithJsonSchema({k: v for k, v in OPERATION_SCHEMA.items() if k != "$schema"})]


class SegmentForm(BaseModel):
    """POST /v1/segment as multipart/form-data."""

    image: bytes = Field(description="PNG, JPEG or DICOM (a 16-bit PNG is CT in HU + 1024)")
    structures: str = Field(description="comma-separated names, e.g. 'liver,spleen'")
    modality: str | None = Field(None, description="CT (default), MR, XA, US, DX")
    mask_format: Literal["rle", "png"] = "rle"
    reference_id: str | None = Field(None, description="a bank entry to use as the reference")
    reference_image: bytes | None = Field(None, description="a reference image of your own, with reference_mask")
    reference_mask: bytes | None = Field(None, description="its label map PNG (0 = none)")
    reference_labels: str | None = Field(None, description='JSON {"1": "liver"} naming reference_mask\'s values')


class ReferenceBody(BaseModel):
    """A reference in a JSON body: a bank ``id``, or an image + label map (+ names)."""

    id: str | None = None
    image_b64: str | None = None
    mask_b64: str | None = Field(None, description="label map PNG (0 = none), base64")
    labels: dict[str, str] | None = Field(None, description='{"1": "liver"}; optional for a one-value mask')


class SegmentJson(BaseModel):
    """POST /v1/segment as JSON."""

    image_b64: str = Field(description="PNG, JPEG or DICOM, base64 (a data URL is fine)")
    structures: list[str] | str = Field(description='["liver", "spleen"] or "liver,spleen"')
    modality: str | None = None
    mask_format: Literal["rle", "png"] = "rle"
    reference_id: str | None = None
    reference: ReferenceBody | None = None


class LabelForm(BaseModel):
    """POST /v1/label as multipart/form-data."""

    image: bytes = Field(description="PNG, JPEG or DICOM")
    modality: str | None = None
    boxes: str | None = Field(None, description="JSON [[x1, y1, x2, y2], ...]; none: the policy finds them")
    method: Literal["emd", "sinkhorn", "fgw", "independent"] = "emd"
    reference_id: str | None = None
    reference_image: bytes | None = None
    reference_mask: bytes | None = None
    reference_labels: str | None = None


class LabelJson(BaseModel):
    """POST /v1/label as JSON."""

    image_b64: str
    modality: str | None = None
    boxes: list[list[float]] | None = Field(None, max_length=MAX_BOXES, description="[[x1, y1, x2, y2], ...]")
    method: Literal["emd", "sinkhorn", "fgw", "independent"] = "emd"
    reference_id: str | None = None
    reference: ReferenceBody | None = None


class SessionForm(BaseModel):
    """POST /v1/sessions as multipart/form-data."""

    image: bytes = Field(description="PNG, JPEG, DICOM or a NIfTI volume (.nii / .nii.gz); for a DICOM series, "
                                     "one image field per slice or a single zip of the slices")
    modality: str | None = None


class SessionJson(BaseModel):
    """POST /v1/sessions as JSON."""

    image_b64: str
    modality: str | None = None


class CommandBody(BaseModel):
    """POST /v1/sessions/{sid}/commands: ``text`` or ``operations``, not both."""

    text: str | None = Field(None, description='a command in words, e.g. "add a point at 40, 50 then undo"')
    operations: list[Operation] | None = Field(None, max_length=MAX_OPERATIONS)
    mask_format: Literal["rle", "png"] = "rle"


# ----------------------------------------------------------------------------------------------- responses (docs)
class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(Loose):
    """Every 4xx / 5xx: the message, sometimes more (``known`` structures, the ``session``, the ``text``)."""

    error: str


class Rle(BaseModel):
    """A COCO RLE mask (pycocotools' compressed counts)."""

    size: list[int] = Field(description="[height, width]")
    counts: str


Mask = Annotated[Rle | str, Field(description="COCO RLE (mask_format rle) or a base64 PNG (png)")]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    deployments: dict[str, str] = Field(description='"ok" or why not, per deployment')
    sessions: int


class Structures(BaseModel):
    structures: list[str]
    modalities: list[str]
    entries: int


class ReferenceUsed(Loose):
    id: str = Field(description='the bank entry, or "client" for a reference sent with the request')
    similarity: float | None = None


class ImageInfo(BaseModel):
    height: int
    width: int
    modality: str
    format: str


class StructureResult(BaseModel):
    structure: str
    label: str | None
    box: list[float] | None = Field(description="[x1, y1, x2, y2]: the mask's tight box; null when the mask is empty "
                                                "(the policy's written box is in its reasoning)")
    score: float
    reference: ReferenceUsed
    format_error: str | None
    policy_batch: int | None = None
    cached_embedding: bool
    timings_ms: dict[str, float]
    reasoning: str | None = None
    mask: Mask | None = None


class SegmentResponse(BaseModel):
    image: ImageInfo
    mask_format: str
    results: list[StructureResult]
    timings_ms: dict[str, float]


class Region(BaseModel):
    box: list[float]
    label: str | None
    policy_label: str | None
    cost: float | None


class LabelResponse(BaseModel):
    regions: list[Region]
    boxes_from: Literal["client", "policy", "reference"]
    method: str
    reference: ReferenceUsed
    timings_ms: dict[str, float]


class Window(BaseModel):
    preset: str | None
    level: float
    width: float


class SessionState(BaseModel):
    id: str
    shape: list[int]
    slices: int
    slice: int
    modality: str
    spacing: list[float]
    source_format: str | None
    exports: list[str]
    window: Window
    structure: str | None
    points: list[list[int]]
    box: list[int] | None
    can_undo: int
    can_redo: int


class SessionCreated(SessionState):
    structures: list[str]
    ttl_s: float


class CommandResponse(BaseModel):
    operations: list[dict[str, Any]]
    results: list[dict[str, Any]]
    session: SessionState
    mask: Mask
    mask_format: str
    timings_ms: dict[str, float]


class RleSlice(BaseModel):
    slice: int
    mask: Rle


ERRORS = {400: "malformed input", 404: "no such session", 410: "the session expired or was deleted",
          413: "over a size limit", 415: "not a supported format", 422: "input that cannot apply",
          429: "too many sessions", 503: "a deployment is unavailable, or the checkpoint pair is refused",
          504: "a deployment did not answer in time"}
_FILE = TypeAdapter(bytes).json_schema()


def responses(model: type[BaseModel] | None = None, *errors: int, status: int = 200, description: str = "",
              files: tuple[str, ...] = ()) -> dict:
    """``responses=`` of a route: its answer's model (and the media types of files it answers), and the
    ``ErrorBody`` of each error status it gives (every route may answer 503)."""
    answer: dict[str, Any] = {"description": description or "OK"}
    if model is not None:
        answer["model"] = model
    if files:
        answer["content"] = {media_type: {"schema": _FILE} for media_type in files}
    out: dict[int | str, dict[str, Any]] = {status: answer}
    for code in sorted({*errors, 503}):
        out[code] = {"model": ErrorBody, "description": ERRORS[code]}
    return out


# ------------------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class BankReference:
    """The client named a bank entry as the reference."""

    id: str


@dataclass(frozen=True, eq=False)
class ClientReference:
    """A reference sent with the request: its image, label map, {value: name} (may be empty: one value, then named
    after the structure asked about) and the label values present."""

    image: np.ndarray
    modality: str
    label: np.ndarray
    names: dict[int, str]
    values: list[int]


ReferenceChoice = BankReference | ClientReference | None


@dataclass(frozen=True, eq=False)
class SegmentRequest:
    image: codecs.Decoded
    structures: list[str]
    modality: str
    mask_format: str
    reference: ReferenceChoice


@dataclass(frozen=True, eq=False)
class LabelRequest:
    image: codecs.Decoded
    modality: str
    boxes: list | None
    method: str
    reference: ReferenceChoice


@dataclass(frozen=True, eq=False)
class SessionRequest:
    image: codecs.Decoded
    modality: str


@dataclass(frozen=True)
class CommandRequest:
    text: str | None
    operations: list[dict] | None
    mask_format: str


def structures(value) -> list[str]:
    """The structure names asked for (lower case, each once)."""
    if value is None or value == "" or value == []:
        raise BadInput("name at least one structure: structures='liver,spleen' (form) or [\"liver\"] (JSON)", 422)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadInput("structures must be a comma-separated string or a list of strings", 422)
    names = [s.strip().lower() for s in items if s.strip()]
    if not names:
        raise BadInput("structures is empty", 422)
    return list(dict.fromkeys(names))


def mask_format(value) -> str:
    value = value or "rle"
    if value not in MASK_FORMATS:
        raise BadInput(f"mask_format must be 'rle' or 'png', not {value!r}", 422)
    return value


def check_operations(ops) -> str | None:
    """What is wrong with client-sent operations (the shared schema, checked with jsonschema), else None."""
    if not isinstance(ops, list) or not ops or len(ops) > MAX_OPERATIONS:
        return f"operations must be a non-empty list (at most {MAX_OPERATIONS})"
    validator = operation_validator()
    for op in ops:
        try:
            validator.validate(op)
        except jsonschema.ValidationError as e:
            return f"invalid operation: {e.message}"
    return None


def boxes(value, width: int, height: int) -> list | None:
    """The client's boxes for /v1/label (JSON, or a JSON string in a form), inside the image."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise BadInput(f"boxes is not JSON: {e}") from None
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) <= MAX_BOXES and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
        and 0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height for b in value)
    if not ok:
        raise BadInput(f"boxes must be a list (at most {MAX_BOXES}) of [x1, y1, x2, y2] with 0 <= x1 < x2 <= "
                       f"{width} and 0 <= y1 < y2 <= {height}", 422)
    return value


def command_request(body: bytes) -> CommandRequest:
    """A session command's JSON body: ``{"text": ...}`` or ``{"operations": [...]}`` (+ ``mask_format``)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict) or ("text" in data) == ("operations" in data):
        raise ApiError(422, 'send {"text": "add a point at 40, 50"} or {"operations": [...]}')
    fmt = data.get("mask_format", "rle")
    if fmt not in MASK_FORMATS:
        raise ApiError(422, f"mask_format must be 'rle' or 'png', not {fmt!r}")
    if "text" in data:
        if not isinstance(data["text"], str):
            raise ApiError(422, "text must be a string")
        return CommandRequest(data["text"], None, fmt)
    problem = check_operations(data["operations"])
    if problem:
        raise ApiError(422, problem)
    return CommandRequest(None, data["operations"], fmt)


async def _own_boundary(request: Request) -> Request:
    """The request as sent, or, when its multipart body is framed by another boundary than its content-type names,
    the same body under the boundary it really uses. MONAI Label 0.8.5's client keeps the content-type of its last
    multipart request in its auth headers (``update_auth``'s dict, updated in place), so with a token its next
    upload (``create_session``) names a stale boundary."""
    body = await request.body()
    named = re.search(r'boundary="?([^";]+)"?', request.headers.get("content-type", ""))
    first = body[:200].split(b"\r\n", 1)[0]
    if not first.startswith(b"--") or (named and first == b"--" + named.group(1).encode("latin-1")):
        return request
    real = first[2:].decode("latin-1")
    if not re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", real):
        return request
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"] + [
        (b"content-type", f"multipart/form-data; boundary={real}".encode("latin-1"))]

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


class Reader:
    """Reads the image routes' bodies (multipart or JSON) within the app's limits, into typed requests."""

    def __init__(self, max_image_bytes: int = codecs.MAX_IMAGE_BYTES, max_pixels: int = codecs.MAX_PIXELS):
        self.max_image_bytes, self.max_pixels = int(max_image_bytes), int(max_pixels)

    async def segment(self, request: Request, max_structures: int) -> SegmentRequest:
        fields, files, image = await self._one_image(request, "/v1/segment")
        names = structures(fields.get("structures"))
        if len(names) > max_structures:
            raise BadInput(f"{len(names)} structures; at most {max_structures} a request", 422)
        fmt = mask_format(fields.get("mask_format"))
        return SegmentRequest(image, names, self._modality(fields, image), fmt, self.reference(fields, files))

    async def label(self, request: Request) -> LabelRequest:
        fields, files, image = await self._one_image(request, "/v1/label")
        modality = self._modality(fields, image)
        h, w = image.array.shape
        given = boxes(fields.get("boxes"), w, h)
        method = fields.get("method") or "emd"
        if method not in MATCH_METHODS:
            raise BadInput(f"method must be emd, sinkhorn, fgw or independent, not {method!r}", 422)
        return LabelRequest(image, modality, given, method, self.reference(fields, files))

    async def session(self, request: Request) -> SessionRequest:
        """One image, a NIfTI volume, or a DICOM series: several ``image`` files (one per slice) or one zip."""
        fields, files = await self.form_or_json(request, max_files=codecs.MAX_SLICES)
        parts = files.get("image", [])
        if len(parts) > 1 or (parts and codecs.is_zip(parts[0][1])):
            image = codecs.decode_series(parts, max_bytes=self.max_image_bytes, max_pixels=self.max_pixels)
        else:
            data = self.image_field(fields, files)
            if data is not None and codecs.is_zip(data):  # a zip sent as image_b64
                image = codecs.decode_series([("image_b64", data)], max_bytes=self.max_image_bytes,
                                             max_pixels=self.max_pixels)
            else:
                image = self.decode(data, volumes=True)
        return SessionRequest(image, self._modality(fields, image))

    @staticmethod
    def _modality(fields: dict, image: codecs.Decoded) -> str:
        return str(fields.get("modality") or image.modality or "CT")

    async def form_or_json(self, request: Request, max_files: int = 4) -> tuple[dict, dict]:
        """(fields, files) of a multipart form or a JSON object; files: field name -> [(file name, bytes)], in the
        order sent (JSON: none; its base64 fields are decoded by ``image_field``). All files together stay within
        the image byte limit."""
        limit = self.max_image_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit * 4 // 3 + 65536:
            raise BadInput(f"request body is {length} bytes; the limit is {limit} bytes of image", 413)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            if length and length.isdigit():
                request = await _own_boundary(request)
            try:
                form = await request.form(max_files=max_files, max_fields=32)
            except Exception as e:
                raise BadInput(f"malformed multipart form: {e}") from None
            fields, files, total = {}, {}, 0
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    total += value.size or 0
                    if total > limit:
                        raise BadInput(f"the files are more than {limit} bytes together; the limit is {limit} "
                                       "bytes", 413)
                    files.setdefault(key, []).append((value.filename or key, await value.read()))
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

    def decode(self, data: bytes | None, what: str = "image", volumes: bool = False) -> codecs.Decoded:
        if data is None:
            raise BadInput(f"missing {what}: send it as a multipart file field {what!r} or as {what}_b64 in JSON", 422)
        return codecs.decode_image(data, volumes=volumes, max_bytes=self.max_image_bytes, max_pixels=self.max_pixels)

    async def _one_image(self, request: Request, route: str) -> tuple[dict, dict, codecs.Decoded]:
        """(fields, files, decoded image) of a request that takes one 2D image; a volume is refused."""
        fields, files = await self.form_or_json(request)
        image = self.decode(self.image_field(fields, files))
        if image.is_volume:
            raise BadInput(f"a volume goes to POST /v1/sessions; {route} takes one 2D image", 422)
        return fields, files, image

    @staticmethod
    def image_field(fields: dict, files: dict, name: str = "image") -> bytes | None:
        if name in files:
            if len(files[name]) > 1:
                raise BadInput(f"{len(files[name])} files in field {name!r}; this takes one (several DICOM slices "
                               "of a series go to POST /v1/sessions)", 422)
            return files[name][0][1]
        if fields.get(f"{name}_b64") is not None:
            return codecs.b64decode(fields[f"{name}_b64"], f"{name}_b64")
        return None

    def reference(self, fields: dict, files: dict) -> ReferenceChoice:
        """A reference given by the client: a bank id, or an image + label map (+ names); None: retrieve one."""
        ref = fields.get("reference")
        if isinstance(ref, dict):
            if ref.get("id"):
                return BankReference(str(ref["id"]))
            image = codecs.b64decode(ref.get("image_b64"), "reference.image_b64")
            mask = codecs.b64decode(ref.get("mask_b64"), "reference.mask_b64")
            labels = ref.get("labels")
        elif ref is not None:
            raise BadInput("reference must be an object: {\"id\": ...} or {\"image_b64\", \"mask_b64\", \"labels\"}",
                           422)
        elif fields.get("reference_id"):
            return BankReference(str(fields["reference_id"]))
        elif "reference_image" in files or "reference_mask" in files:
            image, mask = self.image_field(fields, files, "reference_image"), self.image_field(fields, files,
                                                                                                 "reference_mask")
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
        img = self.decode(image, "reference_image")
        lab = self.decode(mask, "reference_mask").array
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
        return ClientReference(img.array, img.modality or "CT", lab,
                               {int(k): str(v).lower() for k, v in labels.items()}, values)
