"""Where runs are stored: a local folder, or a URI of a pyarrow filesystem (``s3://``, ``gs://``, ``file://``).

Ray Train's ``RunConfig(storage_path=...)`` takes both; on a cluster of several nodes it must be a place every
node reaches (a bucket, or an NFS folder every node mounts). ``resolve_storage`` turns a folder into an absolute
path and opens a URI's filesystem once on the driver, so a mistyped scheme or missing credentials end with a
ConfigError before any worker starts, not a traceback inside one.
Use: ``storage = resolve_storage(cfg.scale.storage_path)``; ``upload_dir("bank", "s3://b/banks/ct")``,
``download_dir("s3://b/banks/ct", "/tmp/bank")`` to move a folder (a reference bank, a checkpoint) to or from one.
"""

from __future__ import annotations

import os
from pathlib import Path

from rau_ray.errors import ConfigError, DataError

# Schemes pyarrow's FileSystem.from_uri knows (hdfs/viewfs need a JVM, abfs an Azure build); anything else is
# certainly a typo. Whether a known one works here (credentials, network) is what ``filesystem`` finds out.
KNOWN_SCHEMES = ("file", "local", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the node's instance role; "
          "AWS_DEFAULT_REGION where the bucket's region cannot be looked up",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file) or the node's service account",
}
CREDENTIALS["gcs"] = CREDENTIALS["gs"]


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def scheme_of(path: str | os.PathLike) -> str | None:
    return str(path).split("://", 1)[0].lower() if is_uri(path) else None


def check_scheme(path: str | os.PathLike, where: str = "storage_path") -> None:
    """Refuse a URI whose scheme no pyarrow filesystem has (no I/O: safe at config load)."""
    scheme = scheme_of(path)
    if scheme is not None and scheme not in KNOWN_SCHEMES:
        raise ConfigError(f"{where}: unknown storage scheme {scheme!r} in {str(path)!r}; use a local folder or a "
                          f"URI of {', '.join(s + '://' for s in ('file', 's3', 'gs'))}")


def filesystem(uri: str, where: str = "storage_path"):
    """``(pyarrow FileSystem, path within it)`` of ``uri``; ConfigError naming the scheme or the credentials."""
    from pyarrow import fs

    check_scheme(uri, where)
    scheme = scheme_of(uri)
    try:
        return fs.FileSystem.from_uri(uri)
    except ValueError as e:  # pyarrow.ArrowInvalid: a scheme this pyarrow build does not know
        raise ConfigError(f"{where}: pyarrow cannot open {uri!r} ({_first_line(e)})") from None
    except OSError as e:  # credentials, region lookup, network, a missing JVM for hdfs
        raise ConfigError(f"{where}: cannot open {uri!r}: {_first_line(e)}{_hint(scheme)}") from None


def _hint(scheme: str | None) -> str:
    return f"; credentials: {CREDENTIALS[scheme]}" if scheme in CREDENTIALS else ""


def resolve_storage(path: str | os.PathLike, where: str = "storage_path") -> str:
    """A local folder -> its absolute path; a URI -> itself, once its filesystem opened (see ``filesystem``)."""
    if not is_uri(path):
        return str(Path(path).expanduser().resolve())
    filesystem_, inner = filesystem(str(path), where)
    try:  # one metadata request: missing credentials and unreachable buckets show here, not in a worker
        filesystem_.get_file_info(inner)
    except OSError as e:
        raise ConfigError(f"{where}: cannot open {str(path)!r}: {_first_line(e)}{_hint(scheme_of(path))}") from None
    return str(path)


def upload_dir(local: str | os.PathLike, dest: str) -> str:
    """Copy folder ``local`` to ``dest`` (a URI or a folder); returns ``dest``."""
    from pyarrow import fs

    if not Path(local).is_dir():
        raise DataError(f"{local}: no such folder")
    if not is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        dest_fs, dest_path = fs.LocalFileSystem(), str(Path(dest).resolve())
    else:
        dest_fs, dest_path = filesystem(dest, "destination")
    try:
        dest_fs.create_dir(dest_path, recursive=True)
        fs.copy_files(str(Path(local).resolve()), dest_path, source_filesystem=fs.LocalFileSystem(),
                      destination_filesystem=dest_fs)
    except OSError as e:
        raise DataError(f"{dest}: cannot write ({_first_line(e)})") from None
    return dest


def download_dir(source: str, local: str | os.PathLike) -> Path:
    """Copy folder ``source`` (a URI or a folder) into ``local``; returns ``local``."""
    from pyarrow import fs

    src_fs, src_path = filesystem(source, "source") if is_uri(source) else (fs.LocalFileSystem(),
                                                                            str(Path(source).resolve()))
    if src_fs.get_file_info(src_path).type != fs.FileType.Directory:
        raise DataError(f"{source}: no such folder")
    Path(local).mkdir(parents=True, exist_ok=True)
    try:
        fs.copy_files(src_path, str(Path(local).resolve()), source_filesystem=src_fs,
                      destination_filesystem=fs.LocalFileSystem())
    except OSError as e:
        raise DataError(f"{source}: cannot read ({_first_line(e)})") from None
    return Path(local)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
