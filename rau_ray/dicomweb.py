"""A PACS over DICOMweb (dicomweb-client): find a study's series (QIDO-RS), fetch one (WADO-RS), store (STOW-RS).

``DicomWeb(url, timeout_s=30)`` talks to one DICOMweb service root (Orthanc's is ``http://HOST:8042/dicom-web``).
Every request has a connect and a read timeout and is tried once (dicomweb-client's retries are off: a caller
waiting on a segmentation job wants the PACS's answer, not minutes of back-off). What can go wrong is a typed
``PacsError`` whose message names the URL, the DICOMweb transaction and why, with the HTTP status a gateway answers:

- ``PacsUnreachable`` (502): nothing answers at the URL (connection refused, unknown host, connection reset);
- ``PacsTimeout`` (504): it accepted no connection, or sent no answer, within the timeout;
- ``PacsAnswered`` (502): the PACS answered an HTTP error (a 5xx, a 4xx other than "not found"), or a STOW-RS
  answer lists the instance as failed;
- ``NotAPacs`` (502): the URL answers HTTP but not DICOMweb (a 404 for the QIDO-RS paths, HTML instead of DICOM
  JSON, a WADO-RS answer that is no multipart DICOM).

The caller's own mistakes are ``PacsRequestError`` (422: a UID that is not one, a URL that is not http(s)) and
``NotFoundAtPacs`` (404: no such study or series there). All are ``RauError``s: the CLI prints them as one line.
Use: ``pacs = DicomWeb("http://127.0.0.1:8042/dicom-web")``; ``info = pacs.pick_series(study)``;
``datasets = pacs.fetch(study, info.uid)``; ``stored = pacs.store([seg_dataset])``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from rau_ray.errors import RauError

T = TypeVar("T")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Modalities of series that hold no image a volume can be built from (derived objects, reports, presentation states)
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG",
                                  "DOC", "PLAN", "FID", "AU", "ECG"})


class PacsError(RauError):
    """The PACS failed the request; ``status``: what an HTTP gateway answers (502, or 504 for a timeout);
    ``short``: what the PACS did, without the URL ("answered 500 Internal Server Error")."""

    status = 502

    def __init__(self, message: str, short: str | None = None):
        super().__init__(message)
        self.short = short or message


class PacsUnreachable(PacsError):
    """Nothing answers at the URL."""


class PacsTimeout(PacsError):
    """No connection, or no answer, within the timeout."""

    status = 504


class PacsAnswered(PacsError):
    """The PACS answered an HTTP error, or refused to store an instance."""


class NotAPacs(PacsError):
    """The URL answers HTTP, but not as a DICOMweb service."""


class PacsRequestError(RauError):
    """The request itself is wrong (a UID that is not one, a URL that is not http(s)): 422."""

    status = 422


class NotFoundAtPacs(RauError):
    """No such study or series at the PACS: 404."""

    status = 404


@dataclass(frozen=True)
class SeriesInfo:
    """One series as QIDO-RS describes it."""

    uid: str
    modality: str
    description: str
    number: int | None
    instances: int | None

    def describe(self) -> str:
        about = f", {self.description!r}" if self.description else ""
        count = f", {self.instances} instances" if self.instances is not None else ""
        return f"{self.uid} ({self.modality or 'no modality'}{about}{count})"


@dataclass(frozen=True)
class Stored:
    """What STOW-RS stored: the instance's study, series and SOP Instance UIDs, and its WADO-RS URL if given."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    retrieve_url: str | None


def check_uid(value: str, what: str) -> str:
    value = str(value).strip()
    if not value or len(value) > 64 or not UID_RE.match(value):
        raise PacsRequestError(f"{what} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def check_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (a port that is not one raises here)
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsRequestError(f"the PACS URL must be an http(s) URL of a DICOMweb service root (e.g. "
                               f"http://127.0.0.1:8042/dicom-web), not {url!r}")
    return url


def _value(record: dict, tag: str):
    values = (record.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def series_info(record: dict) -> SeriesInfo:
    """A QIDO-RS series record (DICOM JSON) -> SeriesInfo; one without a Series Instance UID -> ``NotAPacs``."""
    uid = _value(record, "0020000E") if isinstance(record, dict) else None
    if not uid:
        raise NotAPacs(f"a QIDO-RS series record without a Series Instance UID: {str(record)[:200]}")
    number, count = _value(record, "00200011"), _value(record, "00201209")
    return SeriesInfo(uid=str(uid), modality=str(_value(record, "00080060") or ""),
                      description=str(_value(record, "0008103E") or ""),
                      number=int(number) if number is not None else None,
                      instances=int(count) if count is not None else None)


def choose_series(study: str, found: Sequence[SeriesInfo], series: str | None = None) -> SeriesInfo:
    """The series to segment: ``series`` when given (it must be in the study), else the study's one image series
    (derived objects such as earlier SEGs are not images); several image series -> ``PacsRequestError`` listing them."""
    if series is not None:
        for s in found:
            if s.uid == series:
                return s
        raise NotFoundAtPacs(f"study {study} has no series {series}; it has "
                             f"{', '.join(s.describe() for s in found) or 'none'}")
    images = [s for s in found if s.modality.upper() not in NON_IMAGE_MODALITIES]
    if not images:
        raise PacsRequestError(f"study {study} holds no image series to segment, only "
                               f"{', '.join(s.describe() for s in found)}")
    if len(images) > 1:
        raise PacsRequestError(f"study {study} holds {len(images)} image series; name one (series): "
                               f"{', '.join(s.describe() for s in images)}")
    return images[0]


def stored_from(answer: Dataset | None, dataset: Dataset, where: str) -> Stored:
    """The STOW-RS answer for one instance -> Stored; a failed instance -> ``PacsAnswered`` with the PACS's reason."""
    failed = list(getattr(answer, "FailedSOPSequence", None) or []) if answer is not None else []
    if failed:
        reason = getattr(failed[0], "FailureReason", "unknown")
        raise PacsAnswered(f"{where}: the PACS refused to store the instance (STOW-RS failure reason {reason})")
    url = None
    for item in (getattr(answer, "ReferencedSOPSequence", None) or []) if answer is not None else []:
        if str(getattr(item, "ReferencedSOPInstanceUID", "")) == str(dataset.SOPInstanceUID):
            url = str(getattr(item, "RetrieveURL", "") or "") or None
    return Stored(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID), url)


class DicomWeb:
    """One DICOMweb service root; ``timeout_s``: each request's read timeout, ``connect_timeout_s`` its connect one
    (default: the smaller of 10 s and ``timeout_s``)."""

    def __init__(self, url: str, timeout_s: float = 30.0, connect_timeout_s: float | None = None):
        self.url = check_url(url)
        if not timeout_s > 0:
            raise PacsRequestError(f"the PACS timeout must be > 0 s, not {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s or min(10.0, self.timeout_s))
        try:
            self.client = DICOMwebClient(self.url, timeout=(self.connect_timeout_s, self.timeout_s))
        except ValueError as e:
            raise PacsRequestError(f"{self.url}: not a usable DICOMweb URL ({e})") from None
        self.client.set_http_retry_params(retry=False)

    def close(self) -> None:
        self.client._session.close()

    # -- errors ------------------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, not_found: Callable[[str], Exception] | None = None) -> T:
        """``fn()`` with every failure turned into a ``PacsError`` naming the URL and ``what`` (the transaction);
        ``not_found(reason)``: the error for a 404, when the transaction has its own."""
        where = f"{self.url} ({what})"
        try:
            return fn()
        except requests.exceptions.ConnectTimeout:
            raise PacsTimeout(f"the PACS at {where} accepted no connection within {self.connect_timeout_s:g} s"
                              ) from None
        except requests.exceptions.Timeout:
            raise PacsTimeout(f"the PACS at {where} did not answer within {self.timeout_s:g} s") from None
        except requests.exceptions.HTTPError as e:
            response = e.response
            status = response.status_code if response is not None else 0
            reason = f"{status} {response.reason if response is not None else ''}".strip()
            if status == 404 and not_found is not None:
                raise not_found(f"answered {reason}") from None
            body = _excerpt(response)
            if status in (404, 405, 406, 415):
                raise NotAPacs(f"{self.url} is not a DICOMweb service: {what} answered {reason}{body}",
                               f"answered {reason}") from None
            raise PacsAnswered(f"the PACS at {where} answered {reason}{body}", f"answered {reason}") from None
        except requests.exceptions.InvalidJSONError as e:  # a 200 with a web page, say
            raise NotAPacs(f"{self.url} is not a DICOMweb service: its answer to {what} is not DICOM JSON ({e})"
                           [:500], "answered something that is not DICOM JSON") from None
        except requests.exceptions.ConnectionError as e:
            raise PacsUnreachable(f"cannot reach the PACS at {where}: {_connection_reason(e)}") from None
        except requests.exceptions.RequestException as e:
            raise PacsUnreachable(f"cannot talk to the PACS at {where}: {type(e).__name__}: {e}"[:500]) from None
        except Exception as e:  # noqa: BLE001 - fn is one DICOMweb call: what else fails is an answer it cannot read
            raise NotAPacs(f"{self.url} is not a DICOMweb service: its answer to {what} is not DICOMweb "
                           f"({type(e).__name__}: {e})"[:500], "answered something that is not DICOMweb") from None

    # -- QIDO-RS -----------------------------------------------------------------------------------------------
    def series_of(self, study: str) -> list[SeriesInfo]:
        """The study's series (QIDO-RS ``GET {url}/studies/{study}/series``); none -> ``NotFoundAtPacs``."""
        study = check_uid(study, "study")
        what = f"QIDO-RS search for the series of study {study}"
        records = self._call(what, lambda: self.client.search_for_series(study_instance_uid=study),
                             not_found=lambda reason: self._not_found(study, what, reason))
        if not isinstance(records, list):
            raise NotAPacs(f"{self.url} is not a DICOMweb service: {what} answered {str(records)[:200]!r}, "
                           "not a list of DICOM JSON records")
        if not records:
            raise self._not_found(study, what, "found none")
        return [self._call(what, lambda r=r: series_info(r)) for r in records]

    def _not_found(self, study: str, what: str, reason: str) -> Exception:
        """The study's series answered 404 (or none): the study is unknown if the URL answers a QIDO-RS search of
        its studies with DICOM JSON; if it does not, the URL is no DICOMweb service (its root, a web page...)."""
        probe = "a QIDO-RS search for studies"
        try:
            records = self._call(probe, lambda: self.client.search_for_studies(limit=1))
        except (PacsAnswered, NotAPacs) as e:
            raise NotAPacs(f"{self.url} is not a DICOMweb service: {what} {reason}, and {probe} {e.short}"
                           ) from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise NotAPacs(f"{self.url} is not a DICOMweb service: {what} {reason}, and {probe} answered "
                           f"{str(records)[:100]!r}, not DICOM JSON")
        return NotFoundAtPacs(f"study {study} is not at the PACS {self.url} (QIDO-RS finds no series in it)")

    def pick_series(self, study: str, series: str | None = None) -> SeriesInfo:
        """The series to segment (``choose_series``) among the study's."""
        if series is not None:
            series = check_uid(series, "series")
        return choose_series(check_uid(study, "study"), self.series_of(study), series)

    def find_series(self, study: str, modality: str | None = None) -> list[SeriesInfo]:
        """The study's series, those of ``modality`` only when given (e.g. "SEG"); none is an empty list."""
        try:
            found = self.series_of(study)
        except NotFoundAtPacs:
            return []
        return [s for s in found if modality is None or s.modality.upper() == modality.upper()]

    # -- WADO-RS -----------------------------------------------------------------------------------------------
    def fetch(self, study: str, series: str) -> list[Dataset]:
        """Every instance of the series (WADO-RS ``GET {url}/studies/{study}/series/{series}``, Explicit VR Little
        Endian); none -> ``NotFoundAtPacs``."""
        study, series = check_uid(study, "study"), check_uid(series, "series")
        what = f"WADO-RS retrieval of series {series}"
        gone = NotFoundAtPacs(f"series {series} of study {study} is not at the PACS {self.url} (WADO-RS)")
        datasets = self._call(what, lambda: self.client.retrieve_series(study, series), not_found=lambda _: gone)
        if not datasets:
            raise gone
        for ds in datasets:
            if not isinstance(ds, Dataset):
                raise NotAPacs(f"{self.url} is not a DICOMweb service: {what} answered a part that is no DICOM")
        return datasets

    # -- STOW-RS -----------------------------------------------------------------------------------------------
    def store(self, dataset: Dataset) -> Stored:
        """Store one instance (STOW-RS ``POST {url}/studies/{its study}``): one request, so the PACS holds the
        whole instance or none of it; a refusal -> ``PacsAnswered`` with the PACS's failure reason."""
        study = check_uid(dataset.StudyInstanceUID, "study")
        what = f"STOW-RS store of instance {dataset.SOPInstanceUID}"
        answer = self._call(what, lambda: self.client.store_instances([dataset], study_instance_uid=study))
        return stored_from(answer, dataset, f"{self.url} ({what})")


def _excerpt(response) -> str:
    if response is None:
        return ""
    try:
        text = response.text.strip()
    except Exception:  # noqa: BLE001 - a body that cannot be decoded says nothing useful
        return ""
    kind = response.headers.get("Content-Type", "")
    text = " ".join(text.split())[:200]
    return f" ({kind}: {text})" if text else ""


def _connection_reason(e: Exception) -> str:
    text = str(e)
    for needle, reason in (("Connection refused", "connection refused (nothing listens there)"),
                           ("Name or service not known", "unknown host name"),
                           ("nodename nor servname", "unknown host name"),
                           ("Temporary failure in name resolution", "the host name does not resolve"),
                           ("Connection reset", "the connection was reset"),
                           ("RemoteDisconnected", "the server closed the connection without answering"),
                           ("Connection aborted", "the connection was aborted")):
        if needle in text:
            return reason
    return f"{type(e).__name__}: {text}"[:300]
