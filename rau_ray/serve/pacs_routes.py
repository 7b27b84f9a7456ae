"""``POST /v1/pacs/segment``: segment a study held by a PACS (DICOMweb) and store the DICOM-SEG back, from the Ingress.

The route runs ``rau_ray.serve.pacs.segment_study`` with the Ingress's ``Pipeline`` as the sessions' backend
(``ServeBackend``; the models are the deployments': one code path with sessions and ``rau pacs segment``). JSON body
``{"url": "http://HOST:8042/dicom-web", "study": UID, "series": UID (optional), "structures": ["liver", "spleen"],
"timeout_s": 30 (optional), "propagate": false, "masks": false}`` -> the source series, the stored SEG's UIDs, a
summary per structure, the timings of fetch / segment / store (and with ``masks: true`` each structure's mask as
COCO RLE per slice).
Errors are ``{"error": reason}``: the PACS unreachable, answering an error or not DICOMweb at all -> 502, silent past
the timeout -> 504, an unknown study or series -> 404, a series that is not one volume or an unknown structure ->
422; a URL outside ``pacs_allowed_urls`` (AppArgs, when set) -> 403. Nothing is stored unless the whole SEG is built.
This module holds the route as a mixin of the Ingress (``PacsRoutes``) on its own router, which ``routes.py``
includes: ``app.include_router(router)`` and ``class Ingress(PacsRoutes)``.
Use: ``curl -X POST localhost:8000/v1/pacs/segment -H 'content-type: application/json' -d '{"url": ...}'``.
"""

# No ``from __future__ import annotations``: Serve rebuilds the routes on the replica from a pickled app (routes.py).
import logging
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from rau_ray.dicomweb import DicomWeb, NotFoundAtPacs, PacsError, PacsRequestError, check_url
from rau_ray.serve import codecs
from rau_ray.serve.http import ApiError, ErrorBody
from rau_ray.serve.pacs import PacsSeriesError, ServeBackend, parse_structures, segment_study

log = logging.getLogger("rau_ray.serve")
router = APIRouter()
MAX_TIMEOUT_S = 600.0


class PacsSegmentBody(BaseModel):
    """POST /v1/pacs/segment."""

    url: str = Field(description="the PACS's DICOMweb service root, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)")
    study: str = Field(description="the Study Instance UID")
    series: str | None = Field(None, description="the Series Instance UID; omitted: the study's one image series")
    structures: list[str] | str = Field(description='["liver", "spleen"] or "liver,spleen"')
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S,
                                    description="each DICOMweb request's timeout (default: the app's pacs_timeout_s)")
    propagate: bool = Field(False, description="segment a key slice (the largest mask of five tried) and carry it "
                                               "through the volume with SAM2: faster than the full pipeline on "
                                               "every slice (the default), weaker on small organs")
    masks: bool = Field(False, description="also answer each structure's mask, COCO RLE per slice")


class PacsStructure(BaseModel):
    name: str
    present: bool
    key_slice: int | None
    score: float | None
    slices: list[int]
    voxels: int
    volume_ml: float
    tried: dict[str, int] = Field(description="mask pixels of the segment operation on each slice tried: every "
                                              "slice, or with propagate the key slices (the largest is kept)")
    mask: list[dict] | None = Field(None, description="with masks: true, COCO RLE per slice in the series' order")


class PacsSegmentResponse(BaseModel):
    pacs: str
    study: str
    mode: str = Field(description="'key slice + propagation' or 'every slice'")
    series: dict = Field(description="uid, modality, description, slices, instance_uids (the SEG's sources)")
    seg: dict = Field(description="study_uid, series_uid, sop_instance_uid, retrieve_url of the stored DICOM-SEG")
    structures: list[PacsStructure]
    timings_s: dict[str, float] = Field(description="qido, wado, volume, fetch, segment, encode, stow, store, total")


ANSWERS = {200: {"model": PacsSegmentResponse, "description": "the SEG stored"},
           **{code: {"model": ErrorBody, "description": why} for code, why in (
               (403, "a PACS URL this app is not allowed to reach (pacs_allowed_urls)"),
               (404, "no such study or series at the PACS"),
               (413, "the series is over a size limit"),
               (422, "a series that is not one volume, an unknown structure, a malformed UID or URL"),
               (502, "the PACS is unreachable, answered an error, or is not a DICOMweb service"),
               (503, "a deployment is unavailable, or the checkpoint pair is refused"),
               (504, "the PACS (or a deployment) did not answer in time"))}}


def _origin_and_path(url: str) -> tuple:
    u = urlsplit(url)
    try:
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:  # a port that is no port: matches nothing
        return None, None
    return (u.scheme, (u.hostname or "").lower(), port), u.path.rstrip("/") + "/"


def allowed(url: str, prefixes) -> bool:
    """Whether ``url`` may be reached: any http(s) URL when ``prefixes`` is None, else one with a prefix's scheme,
    host and port and a path under the prefix's ("http://pacs:8042@evil" or "http://pacs:18042" are not under
    "http://pacs:8042")."""
    if prefixes is None:
        return True
    origin, path = _origin_and_path(url)
    for prefix in prefixes:
        p_origin, p_path = _origin_and_path(str(prefix))
        if origin is not None and origin == p_origin and path.startswith(p_path):
            return True
    return False


class PacsRoutes:
    """The PACS route of the Ingress (a mixin: ``self.pipeline`` and ``self.settings`` are the Ingress's)."""

    @router.post("/v1/pacs/segment", tags=["pacs"], responses=ANSWERS,
                 summary="Segment a study in a PACS (QIDO-RS, WADO-RS) and store the DICOM-SEG there (STOW-RS)")
    async def pacs_segment(self, body: PacsSegmentBody, request: Request):
        settings = self.settings
        timeout_s = body.timeout_s or getattr(settings, "pacs_timeout_s", 30.0)
        try:
            url = check_url(body.url)
            if not allowed(url, getattr(settings, "pacs_allowed_urls", None)):
                raise ApiError(403, f"this app may not reach the PACS URL {url}; allowed: "
                                    f"{', '.join(settings.pacs_allowed_urls) or 'none'} (pacs_allowed_urls)")
            structures = parse_structures(body.structures)
            known = list((await self.pipeline.known_structures()).structures)
            pacs = DicomWeb(url, timeout_s=timeout_s)
            masks: dict = {}
            try:
                result = await segment_study(pacs, body.study, structures, ServeBackend(self.pipeline),
                                             series=body.series, known=known, propagate=body.propagate,
                                             software_version=request.app.version,
                                             masks_out=masks if body.masks else None)
            finally:
                pacs.close()
        except PacsError as e:
            log.warning("PACS job failed (%d): %s", e.status, e)
            raise ApiError(e.status, str(e), url=body.url) from None
        except (NotFoundAtPacs, PacsRequestError, PacsSeriesError) as e:
            raise ApiError(e.status, str(e), url=body.url) from None
        if body.masks:
            for s in result["structures"]:
                s["mask"] = [codecs.rle_encode(m) for m in masks[s["name"]]]
        t = result["timings_s"]
        log.info("PACS job: study %s, SEG %s stored; fetch %.2f s, segment %.2f s, store %.2f s", body.study,
                 result["seg"]["sop_instance_uid"], t["fetch"], t["segment"], t["store"])
        return result
