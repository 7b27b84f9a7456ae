"""The HTTP layer without Ray: the OpenAPI document is generated from the request / response models (every route,
every reference resolving), the parsing of multipart and JSON bodies answers the project's messages and statuses,
errors answer ``{"error": ...}``, and the messages between deployments survive pickling."""

import asyncio
import base64
import json
import pickle

import numpy as np
import pytest
from pydantic.json_schema import models_json_schema
from starlette.requests import Request

from rau_ray.data import formats
from rau_ray.models.reference import Reference
from rau_ray.serve import http, messages
from rau_ray.serve.codecs import BadInput
from rau_ray.serve.routes import app

ROUTES = {("get", "/healthz"), ("get", "/readyz"), ("get", "/v1/structures"), ("post", "/v1/segment"),
          ("post", "/v1/label"), ("post", "/v1/sessions"), ("get", "/v1/sessions/{sid}"),
          ("delete", "/v1/sessions/{sid}"), ("post", "/v1/sessions/{sid}/commands"),
          ("post", "/v1/sessions/{sid}/undo"), ("post", "/v1/sessions/{sid}/redo"),
          ("get", "/v1/sessions/{sid}/mask"), ("get", "/v1/sessions/{sid}/image")}
ROUTES |= {("get", "/info/"), ("post", "/infer/{model}"), ("put", "/session/"), ("get", "/session/{session_id}"),
           ("delete", "/session/{session_id}"), ("get", "/datastore/"), ("put", "/datastore/"),
           ("put", "/datastore/image"), ("delete", "/datastore/image")}  # MONAI Label's (serve/monailabel.py)
ROUTES |= {("post", "/v1/pacs/segment")}  # a PACS over DICOMweb (serve/pacs_routes.py)
ROUTES |= {("get", "/auth/"), ("post", "/auth/token"), ("get", "/auth/token/valid")}  # MONAI Label's (serve/auth.py)


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_openapi_document_comes_from_the_models():
    doc = app.openapi()
    assert {(m, p) for p, ops in doc["paths"].items() for m in ops} == ROUTES
    schemas = doc["components"]["schemas"]
    for ref in set(_refs(doc)):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    body = doc["paths"]["/v1/segment"]["post"]["requestBody"]
    assert body["required"]
    form = schemas[body["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    as_json = schemas[body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    _, defs = models_json_schema([(http.SegmentForm, "validation"), (http.SegmentJson, "validation")],
                                 ref_template="#/components/schemas/{model}")
    assert form == defs["$defs"]["SegmentForm"] and as_json == defs["$defs"]["SegmentJson"]
    assert set(http.SegmentForm.model_fields) == set(form["properties"]) >= {"image", "structures", "reference_id"}
    assert form["properties"]["image"]["format"] == "binary" and form["required"] == ["image", "structures"]
    assert {"image_b64", "structures", "reference"} <= set(as_json["properties"])
    ok = doc["paths"]["/v1/segment"]["post"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SegmentResponse"}
    assert ok["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    commands = doc["paths"]["/v1/sessions/{sid}/commands"]["post"]["requestBody"]["content"]["application/json"]
    assert commands["schema"]["$ref"].endswith("/CommandBody")
    assert doc["paths"]["/v1/sessions"]["post"]["responses"]["201"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/SessionCreated")
    pacs = doc["paths"]["/v1/pacs/segment"]["post"]
    assert pacs["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PacsSegmentBody")
    assert {"200", "404", "422", "502", "504"} <= set(pacs["responses"])
    assert {"url", "study", "series", "structures", "timeout_s"} <= set(schemas["PacsSegmentBody"]["properties"])


def _request(body: bytes, content_type: str) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/segment", "query_string": b"",
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "rauboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + v + b"\r\n" for k, v in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def png():
    image = np.zeros((32, 40), np.uint8)
    image[8:20, 10:30] = 200
    return formats.encode_png(image)


def test_segment_requests_multipart_and_json(png):
    reader = http.Reader(1_000_000, 512 * 512)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:30] = 3
    body, ctype = _multipart({"structures": "Liver, spleen,liver", "reference_labels": '{"3": "Liver"}'},
                             {"image": png, "reference_image": png, "reference_mask": formats.encode_png(mask)})
    req = asyncio.run(reader.segment(_request(body, ctype), max_structures=4))
    assert req.structures == ["liver", "spleen"] and req.mask_format == "rle" and req.modality == "CT"
    assert req.image.array.shape == (32, 40) and req.image.kind == "png"
    assert isinstance(req.reference, http.ClientReference)
    assert req.reference.names == {3: "liver"} and req.reference.values == [3]
    data = {"image_b64": base64.b64encode(png).decode(), "structures": ["liver"], "mask_format": "png",
            "modality": "MR", "reference": {"id": "ct-abdomen-1"}}
    req = asyncio.run(reader.segment(_request(json.dumps(data).encode(), "application/json"), max_structures=4))
    assert req.mask_format == "png" and req.modality == "MR" and req.reference == http.BankReference("ct-abdomen-1")


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"{not json", "application/json", 400, "malformed JSON"),
    (b"[1]", "application/json", 400, "expected a JSON object"),
    (b"x", "text/plain", 415, "content type"),
    (json.dumps({"structures": ["liver"]}).encode(), "application/json", 422, "missing image"),
    (json.dumps({"image_b64": "@@@", "structures": ["liver"]}).encode(), "application/json", 400, "base64"),
    (json.dumps({"image_b64": "aGk=", "structures": "liver"}).encode(), "application/json", 415, "not an image"),
])
def test_bad_bodies(body, ctype, status, words):
    with pytest.raises(BadInput) as e:
        asyncio.run(http.Reader().segment(_request(body, ctype), max_structures=4))
    assert e.value.status == status and words in e.value.message


def test_segment_field_checks(png):
    def segment(**data):
        data = {"image_b64": base64.b64encode(png).decode(), **data}
        return asyncio.run(http.Reader().segment(_request(json.dumps(data).encode(), "application/json"), 2))

    for data, words in [({}, "name at least one structure"), ({"structures": [1]}, "list of strings"),
                        ({"structures": " , "}, "empty"), ({"structures": "a,b,c"}, "at most 2"),
                        ({"structures": "a", "mask_format": "tiff"}, "mask_format"),
                        ({"structures": "a", "reference": "x"}, "reference must be an object")]:
        with pytest.raises(BadInput, match=words) as e:
            segment(**data)
        assert e.value.status == 422


def test_label_boxes_and_method(png):
    assert http.boxes("[[1, 2, 10, 20]]", 40, 32) == [[1, 2, 10, 20]] and http.boxes(None, 40, 32) is None
    for bad in ([[5, 5, 1, 1]], [[0, 0, 41, 10]], "[[1, 2]", [[0, 0, 1, 1]] * 65):
        with pytest.raises(BadInput, match="boxes"):
            http.boxes(bad, 40, 32)
    data = {"image_b64": base64.b64encode(png).decode(), "method": "nope"}
    with pytest.raises(BadInput, match="method must be"):
        asyncio.run(http.Reader().label(_request(json.dumps(data).encode(), "application/json")))


def test_command_requests():
    assert http.command_request(b'{"text": "undo"}') == http.CommandRequest("undo", None, "rle")
    ops = [{"op": "undo", "steps": 1}]
    assert http.command_request(json.dumps({"operations": ops, "mask_format": "png"}).encode()).operations == ops
    for body, status, words in [(b"{", 400, "malformed JSON"), (b'{"text": "a", "operations": []}', 422, "send"),
                                (b"{}", 422, "send"), (b'{"text": 1}', 422, "text must be a string"),
                                (b'{"text": "a", "mask_format": "x"}', 422, "mask_format"),
                                (b'{"operations": []}', 422, "non-empty list"),
                                (b'{"operations": [{"op": "dance"}]}', 422, "operation")]:
        with pytest.raises(http.ApiError) as e:
            http.command_request(body)
        assert e.value.status == status and words in e.value.message, body


def test_errors_answer_error_objects():
    response = asyncio.run(http.api_error(None, http.ApiError(429, "too many", {"Retry-After": "3"}, known=["a"])))
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert json.loads(response.body) == {"error": "too many", "known": ["a"]}
    response = asyncio.run(http.bad_input(None, BadInput("too big", 413)))
    assert response.status_code == 413 and json.loads(response.body) == {"error": "too big"}


def test_messages_pickle():
    mask = np.ones((4, 5), bool)
    ref = Reference(np.zeros((4, 5)), np.zeros((4, 5), np.int32), {1: "liver"}, "CT", {"id": "x"}, 0.9)
    for message in [messages.NotHeld(), messages.NoReference("no reference 'x'"), messages.Retrieved(ref, 0.1),
                    messages.BankInfo(("liver",), ("CT",), 3), messages.NotUnderstood("what?"),
                    messages.Question("label", np.zeros((4, 5, 3), np.uint8), {"liver": [0, 0, 2, 2]},
                                      np.zeros((4, 5, 3), np.uint8), region=[0, 0, 2, 2]),
                    messages.Answer("<Seg>", "liver", None, seg_hidden=np.ones((1, 8), np.float32)),
                    messages.Segmentation(mask, 0.5, True, {"decode": 0.01}), messages.Prompted(mask, 0.4),
                    messages.Features(np.ones((1, 2)), (np.ones(3),), (4, 5))]:
        back = pickle.loads(pickle.dumps(message))
        assert type(back) is type(message)
        for name in message.__dataclass_fields__:
            a, b = getattr(message, name), getattr(back, name)
            assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else name in ("reference", "high_res_feats")
                    or a == b), name
    with pytest.raises(ValueError, match="task"):
        messages.Question("dance", mask, {}, mask)
