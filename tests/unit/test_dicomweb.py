"""rau_ray.dicomweb: UIDs and URLs checked, QIDO-RS records read, the series chosen, STOW-RS answers read, and every
way a URL can fail to be a PACS mapped to its typed error (502 / 504) naming the URL, against real sockets on
loopback (a port nothing listens on, small HTTP servers in a thread, one that accepts and never answers). The real
PACS round trip (Orthanc) is tests/integration/test_pacs_orthanc.py."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydicom.dataset import Dataset

from rau_ray.dicomweb import (
    DicomWeb,
    NotAPacs,
    NotFoundAtPacs,
    PacsAnswered,
    PacsRequestError,
    PacsTimeout,
    PacsUnreachable,
    SeriesInfo,
    check_uid,
    check_url,
    choose_series,
    series_info,
    stored_from,
)


def record(uid, modality="CT", description="", count=None):
    r = {"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": [modality]}}
    if description:
        r["0008103E"] = {"vr": "LO", "Value": [description]}
    if count is not None:
        r["00201209"] = {"vr": "IS", "Value": [count]}
    return r


def test_uids_and_urls_are_checked():
    assert check_uid(" 1.2.840.10008 ", "study") == "1.2.840.10008"
    for bad in ("", "abc", "1..2", "1.2.", "1" * 65):
        with pytest.raises(PacsRequestError, match="is not a DICOM UID"):
            check_uid(bad, "study")
    assert check_url("http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"
    for bad in ("ftp://pacs/dicom-web", "127.0.0.1:8042", "http://", "", "http://pacs:99999/dicom-web"):
        with pytest.raises(PacsRequestError, match="must be an http"):
            check_url(bad)
    assert PacsRequestError.status == 422 and NotFoundAtPacs.status == 404


def test_qido_records_and_the_series_chosen():
    info = series_info(record("1.2.3", "CT", "abdomen", 64))
    assert info == SeriesInfo("1.2.3", "CT", "abdomen", None, 64)
    with pytest.raises(NotAPacs, match="without a Series Instance UID"):
        series_info({"00080060": {"vr": "CS", "Value": ["CT"]}})
    ct, seg, mr = SeriesInfo("1.1", "CT", "", 1, 64), SeriesInfo("1.2", "SEG", "", 2, 1), SeriesInfo("1.3", "MR", "",
                                                                                                   3, 20)
    assert choose_series("9.9", [seg, ct]) == ct  # an earlier SEG is no image series
    assert choose_series("9.9", [ct, mr], "1.3") == mr
    with pytest.raises(PacsRequestError, match=r"2 image series; name one .*1\.1 \(CT.*1\.3 \(MR"):
        choose_series("9.9", [ct, mr])
    with pytest.raises(PacsRequestError, match="no image series to segment, only 1.2 \\(SEG"):
        choose_series("9.9", [seg])
    with pytest.raises(NotFoundAtPacs, match="study 9.9 has no series 4.4; it has 1.1"):
        choose_series("9.9", [ct], "4.4")


def test_stow_answers():
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.1", "1.2", "1.3"
    answer = Dataset()
    item = Dataset()
    item.ReferencedSOPInstanceUID, item.RetrieveURL = "1.3", "http://pacs/studies/1.1/series/1.2/instances/1.3"
    answer.ReferencedSOPSequence = [item]
    stored = stored_from(answer, ds, "here")
    assert (stored.study_uid, stored.series_uid, stored.sop_instance_uid) == ("1.1", "1.2", "1.3")
    assert stored.retrieve_url.endswith("/instances/1.3")
    failed = Dataset()
    bad = Dataset()
    bad.ReferencedSOPInstanceUID, bad.FailureReason = "1.3", 0xA700
    failed.FailedSOPSequence = [bad]
    with pytest.raises(PacsAnswered, match="refused to store the instance .*failure reason 42752"):
        stored_from(failed, ds, "here")


# ------------------------------------------------------------------------------------------- failures, for real
class Answers(BaseHTTPRequestHandler):
    """Answers every GET / POST with the server's ``status``, ``content_type`` and ``body``."""

    def _answer(self):
        self.server.paths.append(self.path)
        self.send_response(self.server.status)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(status: int, body: bytes = b"", content_type: str = "text/html") -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
        server.status, server.body, server.content_type, server.paths = status, body, content_type, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/dicom-web"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def test_nothing_listening_is_unreachable_naming_the_url():
    url = f"http://127.0.0.1:{closed_port()}/dicom-web"
    with pytest.raises(PacsUnreachable) as e:
        DicomWeb(url, timeout_s=2).series_of("1.2.3")
    assert e.value.status == 502 and url in str(e.value) and "connection refused" in str(e.value)


def test_a_web_server_that_is_not_a_pacs(http_server):
    url = http_server(404, b"<html>no such page</html>")
    with pytest.raises(NotAPacs) as e:
        DicomWeb(url).series_of("1.2.3")
    assert e.value.status == 502 and str(e.value).startswith(f"{url} is not a DICOMweb service")
    assert "answered 404 Not Found, and a QIDO-RS search for studies answered 404" in str(e.value)
    url = http_server(200, b"<html>a web page</html>")  # 200, but HTML, not DICOM JSON
    with pytest.raises(NotAPacs, match="is not a DICOMweb service: its answer to QIDO-RS.* is not DICOM JSON"):
        DicomWeb(url).series_of("1.2.3")


def test_a_pacs_answering_an_error_and_an_unknown_study(http_server):
    url = http_server(500, b'{"Message": "database is locked"}', "application/json")
    with pytest.raises(PacsAnswered) as e:
        DicomWeb(url).series_of("1.2.3")
    assert e.value.status == 502 and "answered 500 Internal Server Error" in str(e.value)
    assert "database is locked" in str(e.value)
    url = http_server(200, b"[]", "application/dicom+json")  # a DICOMweb service without that study
    with pytest.raises(NotFoundAtPacs, match=f"study 1.2.3 is not at the PACS {url}"):
        DicomWeb(url).series_of("1.2.3")


def test_a_server_that_accepts_and_never_answers_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel accepts connections; nobody reads or answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        t0 = time.monotonic()
        with pytest.raises(PacsTimeout) as e:
            DicomWeb(url, timeout_s=1).series_of("1.2.3")
        assert time.monotonic() - t0 < 10
    assert e.value.status == 504 and url in str(e.value) and "did not answer within 1 s" in str(e.value)
