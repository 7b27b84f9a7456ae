"""A local Orthanc PACS (Debian packages ``orthanc`` + ``orthanc-dicomweb``) on loopback, for the PACS tests, the
PACS benchmark and trying ``rau pacs segment`` without a hospital's PACS.

``LocalOrthanc(folder)`` writes ``folder/orthanc.json`` (HTTP on a free 127.0.0.1 port, the DICOM server off, storage
and index under ``folder``, only the DICOMweb plugin loaded, remote access and authentication off), starts
``Orthanc orthanc.json`` as a child process (its log in ``folder/orthanc.log``), waits until ``/system`` answers and
stops it by its PID (SIGTERM, then SIGKILL). A restart on the same folder keeps what was stored. Orthanc or its
DICOMweb plugin missing -> ``ConfigError`` saying how to install them (``make install`` does, with apt-get).
Use: ``with LocalOrthanc(tmp) as pacs: pacs.dicomweb_url`` (``http://127.0.0.1:PORT/dicom-web``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from rau_ray.atomic import atomic_write_text
from rau_ray.errors import ConfigError

PLUGIN = "libOrthancDicomWeb.so"
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")  # where the Debian package puts it
INSTALL = "install it with `make install` (apt-get install -y orthanc orthanc-dicomweb)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                             if os.access(p, os.X_OK)), None)
    if not found:
        raise ConfigError(f"Orthanc is not installed; {INSTALL}")
    return found


def dicomweb_plugin() -> str:
    """The DICOMweb plugin's shared library, as ``dpkg -L orthanc-dicomweb`` lists it (else the package's folders)."""
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    candidates = [line.strip() for line in listed.splitlines() if Path(line.strip()).name.startswith(PLUGIN)]
    candidates += [str(Path(folder) / PLUGIN) for folder in PLUGIN_FOLDERS]
    for path in sorted(candidates, key=lambda p: (Path(p).name != PLUGIN, p)):  # the unversioned link first
        if Path(path).is_file():
            return path
    raise ConfigError(f"Orthanc's DICOMweb plugin ({PLUGIN}) is not installed; {INSTALL}")


class LocalOrthanc:
    def __init__(self, folder: str | os.PathLike, http_port: int | None = None, name: str = "rau-ray"):
        self.folder = Path(folder)
        self.http_port = int(http_port or free_port())
        self.name = name
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def config(self) -> dict:
        return {"Name": self.name, "HttpPort": self.http_port, "HttpBindAddress": "127.0.0.1",
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
                "StorageDirectory": str(self.folder / "storage"), "IndexDirectory": str(self.folder / "index"),
                "Plugins": [dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                "StorageCompression": False, "HttpTimeout": 60}

    def start(self, timeout_s: float = 60.0) -> LocalOrthanc:
        """Start Orthanc and wait until ``/system`` answers; it failing to start -> ``ConfigError`` with its log."""
        if self.process is not None and self.process.poll() is None:
            return self
        binary = orthanc_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        atomic_write_text(config, json.dumps(self.config(), indent=2))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - the child writes to it until stop()
        try:
            self.process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.folder, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ConfigError(f"Orthanc exited ({self.process.returncode}) on start: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"Orthanc did not answer at {self.url}/system within {timeout_s:g} s: "
                                  f"{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the process this object started, by its PID: SIGTERM, then SIGKILL after ``timeout_s``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout_s)

    def log_tail(self, lines: int = 15) -> str:
        path = self.folder / "orthanc.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
