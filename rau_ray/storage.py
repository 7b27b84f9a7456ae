"""Where runs are stored: a local folder, or a URI of a pyarrow filesystem (``s3://``, ``gs://``, ``file://``).

Ray Train's and Ray Tune's ``RunConfig(storage_path=...)`` take both; on a cluster of several nodes it must be a
place every node reaches (a bucket, or an NFS folder every node mounts). ``resolve_storage`` turns a folder into an
absolute path and opens a URI's filesystem once on the driver, so a mistyped scheme or missing credentials end with
a ConfigError before any worker starts, not a traceback inside one.

A *location* below is a local path or a URI; the helpers take either, so callers write one code path:
``join`` (a URI keeps its ``?query``), ``exists`` / ``is_dir`` / ``is_file`` / ``list_dir``, ``read_text`` /
``read_bytes``, ``write_text`` / ``write_bytes`` / ``write_figure`` (local: temp file + rename; a bucket: one object
put, which is atomic there), ``remove``, ``upload_dir`` / ``download_dir`` for folders, and ``local_copy``: a local
path for any location, a URI's file or folder downloaded once into ``$RAU_CACHE/storage/`` (default
``~/.cache/rau_ray/storage``) under a hash of the URI and of its listing (names, sizes, modification times), so a
node downloads a checkpoint or a reference bank once and a changed folder is downloaded again. ``file://`` URIs are
plain local paths here (no copy). S3-compatible stores (MinIO, Ceph, moto) other than AWS: set
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), which pyarrow, boto3 and every Ray worker started with that
environment honour, or add ``?endpoint_override=HOST:PORT&scheme=http`` to the URI.
Use: ``storage = resolve_storage(cfg.scale.storage_path)``; ``upload_dir("bank", "s3://b/banks/ct")``;
``bank = local_copy("s3://b/banks/ct", "bank_dir")``; ``write_text(join(run, "summary.json"), text)``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pyarrow import fs

from rau_ray.atomic import atomic_write_bytes, atomic_write_figure, figure_png
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


def _local_path(location: str | os.PathLike) -> Path | None:
    """The local path of a folder or a ``file://`` / ``local://`` URI; None for a remote URI."""
    if not is_uri(location):
        return Path(location).expanduser()
    if scheme_of(location) in ("file", "local"):
        return Path(filesystem(str(location), "path")[1])
    return None


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI of a remote filesystem (s3://, gs://...), False for a folder or a file:// URI."""
    return _local_path(location) is None


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """``base/part/...``: a Path for a local ``base``, else a URI string (its ``?query`` kept at the end)."""
    if not is_uri(base):
        return Path(base).joinpath(*parts)
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *(str(p).strip("/") for p in parts if str(p).strip("/"))]) + sep + query


def uri_of(filesystem_, path: str, like: str | os.PathLike | None = None) -> str:
    """The location of ``path`` inside a pyarrow filesystem (what Ray's ``Result.path`` / ``Checkpoint.path`` are):
    the path itself on the local filesystem, else ``scheme://path`` with ``like``'s scheme and ``?query`` (the
    storage path the run was given) when it has them."""
    if filesystem_ is None or filesystem_.type_name == "local":
        return str(path)
    scheme = scheme_of(like) if like is not None and is_uri(like) else None
    scheme = scheme or {"s3": "s3", "gcs": "gs"}.get(filesystem_.type_name, filesystem_.type_name)
    query = str(like).partition("?")[2] if like is not None and is_uri(like) else ""
    return f"{scheme}://{str(path).lstrip('/')}" + (f"?{query}" if query else "")


_OPENED: dict[tuple, object] = {}  # bucket stores opened so far (opening one looks up the bucket's region)


def _remote(location: str, where: str):
    """(filesystem, path within it) of a remote URI; a bucket's filesystem is opened once per process."""
    head, _, query = str(location).partition("?")
    scheme, _, rest = head.partition("://")
    if scheme.lower() not in ("s3", "gs", "gcs"):
        return filesystem(str(location), where)
    key = (scheme.lower(), rest.split("/", 1)[0], query, os.environ.get("AWS_ENDPOINT_URL"),
           os.environ.get("AWS_ENDPOINT_URL_S3"))
    if key not in _OPENED:
        _OPENED[key] = filesystem(str(location), where)[0]
    return _OPENED[key], rest.rstrip("/")


def _info(location, where: str):
    local = _local_path(location)
    if local is not None:
        return "dir" if local.is_dir() else "file" if local.exists() else None
    filesystem_, path = _remote(location, where)
    try:
        kind = filesystem_.get_file_info(path).type
    except OSError as e:
        raise DataError(f"{location}: cannot read ({_first_line(e)}){_hint(scheme_of(location))}") from None
    return {fs.FileType.Directory: "dir", fs.FileType.File: "file"}.get(kind)


def exists(location: str | os.PathLike, where: str = "path") -> bool:
    return _info(location, where) is not None


def is_dir(location: str | os.PathLike, where: str = "path") -> bool:
    return _info(location, where) == "dir"


def is_file(location: str | os.PathLike, where: str = "path") -> bool:
    return _info(location, where) == "file"


def list_dir(location: str | os.PathLike, where: str = "path") -> list[str]:
    """Names of the entries of folder ``location``, sorted; [] when it does not exist."""
    local = _local_path(location)
    if local is not None:
        return sorted(p.name for p in local.iterdir()) if local.is_dir() else []
    filesystem_, path = _remote(location, where)
    try:
        infos = filesystem_.get_file_info(fs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise DataError(f"{location}: cannot list ({_first_line(e)}){_hint(scheme_of(location))}") from None
    return sorted(i.base_name for i in infos)


def read_bytes(location: str | os.PathLike, where: str = "path") -> bytes:
    """The content of file ``location``; DataError when it does not exist or cannot be read."""
    local = _local_path(location)
    try:
        if local is not None:
            return local.read_bytes()
        filesystem_, path = _remote(location, where)
        with filesystem_.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        raise DataError(f"{location}: no such file") from None
    except OSError as e:
        raise DataError(f"{location}: cannot read ({_first_line(e)})") from None


def read_text(location: str | os.PathLike, where: str = "path") -> str:
    try:
        return read_bytes(location, where).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{location}: not UTF-8 text ({e})") from None


def write_bytes(location: str | os.PathLike, data: bytes, where: str = "path") -> str | Path:
    """Write file ``location`` whole: locally a temp file renamed over it, in a bucket one object put (atomic
    there: readers see the old object or the new one). Returns ``location``."""
    local = _local_path(location)
    try:
        if local is not None:
            atomic_write_bytes(local, data)
            return location if is_uri(location) else local
        filesystem_, path = _remote(location, where)
        if filesystem_.type_name not in ("s3", "gcs"):  # object stores have no folders to make
            filesystem_.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem_.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise DataError(f"{location}: cannot write ({_first_line(e)})") from None
    return str(location)


def write_text(location: str | os.PathLike, text: str, where: str = "path") -> str | Path:
    return write_bytes(location, text.encode("utf-8"), where)


def write_figure(location: str | os.PathLike, fig, dpi: int = 100) -> str | Path:
    """A matplotlib figure as PNG at ``location`` (locally atomic), then closed."""
    local = _local_path(location)
    if local is not None:
        atomic_write_figure(local, fig, dpi)
        return location if is_uri(location) else local
    return write_bytes(location, figure_png(fig, dpi))


def remove(location: str | os.PathLike, where: str = "path") -> None:
    """Delete file or folder ``location``; nothing to do when it does not exist."""
    local = _local_path(location)
    try:
        if local is not None:
            if local.is_dir():
                shutil.rmtree(local)
            else:
                local.unlink(missing_ok=True)
            return
        kind = _info(location, where)
        filesystem_, path = _remote(location, where)
        if kind == "dir":
            filesystem_.delete_dir(path)
        elif kind == "file":
            filesystem_.delete_file(path)
    except OSError as e:
        raise DataError(f"{location}: cannot delete ({_first_line(e)})") from None


def upload_dir(local: str | os.PathLike, dest: str | os.PathLike, last: tuple[str, ...] = ()) -> str:
    """Copy folder ``local`` to ``dest`` (a URI or a folder); files named in ``last`` (relative paths, e.g. a
    bank's ``bank.json``) are copied after all others, so their presence means a complete copy. Returns ``dest``."""
    if not Path(local).is_dir():
        raise DataError(f"{local}: no such folder")
    target = _local_path(dest)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        dest_fs, dest_path = fs.LocalFileSystem(), str(target.resolve())
    else:
        dest_fs, dest_path = filesystem(str(dest), "destination")
    source = Path(local).resolve()
    try:
        dest_fs.create_dir(dest_path, recursive=True)
        if not last:
            fs.copy_files(str(source), dest_path, source_filesystem=fs.LocalFileSystem(),
                          destination_filesystem=dest_fs)
        else:
            files = sorted((p for p in source.rglob("*") if p.is_file()),
                           key=lambda p: p.relative_to(source).as_posix() in last)
            for p in files:
                fs.copy_files(str(p), f"{dest_path}/{p.relative_to(source).as_posix()}",
                              source_filesystem=fs.LocalFileSystem(), destination_filesystem=dest_fs)
    except OSError as e:
        raise DataError(f"{dest}: cannot write ({_first_line(e)})") from None
    return str(dest)


def download_dir(source: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy folder ``source`` (a URI or a folder) into ``local``; returns ``local``."""
    path = _local_path(source)
    src_fs, src_path = (fs.LocalFileSystem(), str(path.resolve())) if path is not None else \
        filesystem(str(source), "source")
    try:
        if src_fs.get_file_info(src_path).type != fs.FileType.Directory:
            raise DataError(f"{source}: no such folder")
        Path(local).mkdir(parents=True, exist_ok=True)
        fs.copy_files(src_path, str(Path(local).resolve()), source_filesystem=src_fs,
                      destination_filesystem=fs.LocalFileSystem())
    except OSError as e:
        raise DataError(f"{source}: cannot read ({_first_line(e)})") from None
    return Path(local)


def cache_root() -> Path:
    """Where ``local_copy`` keeps downloads: ``$RAU_CACHE/storage`` (default ``~/.cache/rau_ray/storage``)."""
    return Path(os.environ.get("RAU_CACHE", Path.home() / ".cache" / "rau_ray")) / "storage"


def local_copy(location: str | os.PathLike, where: str = "path") -> Path:
    """A local path for ``location``: a folder or ``file://`` URI as it is; a remote URI's file or folder downloaded
    once per node into ``cache_root()`` (under a hash of the URI and of its listing, so a folder that changed is
    fetched again). Concurrent callers (the Ray workers of a node) each download into a temp folder and the first
    rename wins. DataError when nothing is there; ConfigError when the URI cannot be opened."""
    local = _local_path(location)
    if local is not None:
        return local
    uri = str(location)
    filesystem_, path = _remote(uri, where)
    try:
        info = filesystem_.get_file_info(path)
        if info.type == fs.FileType.Directory:
            entries = filesystem_.get_file_info(fs.FileSelector(path, recursive=True))
        elif info.type == fs.FileType.File:
            entries = [info]
        else:
            raise DataError(f"{where}: {uri}: nothing there (no such file or folder)")
    except OSError as e:
        raise DataError(f"{where}: cannot read {uri} ({_first_line(e)}){_hint(scheme_of(uri))}") from None
    listing = sorted((e.path[len(path):], e.size, e.mtime_ns) for e in entries if e.type == fs.FileType.File)
    if info.type == fs.FileType.Directory and not listing:
        raise DataError(f"{where}: {uri}: an empty folder")
    name = path.rstrip("/").rsplit("/", 1)[-1] or "root"
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    version = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
    home = cache_root() / key
    target = home / version / name
    if target.exists():
        return target
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=home, prefix=".partial-"))
    try:
        if info.type == fs.FileType.Directory:
            (tmp / name).mkdir()  # copy_files makes the sub-folders only
        fs.copy_files(path, str(tmp / name), source_filesystem=filesystem_,
                      destination_filesystem=fs.LocalFileSystem())
        (tmp / "source.txt").write_text(uri + "\n")  # what this cache entry is a copy of
        try:
            os.rename(tmp, home / version)
        except OSError:  # another process of this node finished first: its copy is the same listing
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{where}: cannot download {uri} ({_first_line(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
