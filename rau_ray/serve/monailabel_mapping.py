"""The pure side of the MONAI Label-compatible routes (``rau_ray.serve.monailabel``): no Ray, no HTTP server.

MONAI Label's clients (``monailabel.client.MONAILabelClient``, 3D Slicer's MONAI Label module, OHIF's extension) talk
in their own terms; this module translates:

- ``info_body``: ``GET /info/`` — the app's two abilities as MONAI Label "models": ``rau_segmentation`` (type
  ``segmentation``: the RAU chain for named structures on a key slice, carried through a volume by SAM2) and
  ``sam2_interactive`` (type ``deepgrow``: foreground / background clicks and a box on one slice). Its labels are the
  structures the reference bank knows. No top-level ``config`` key: 3D Slicer takes one as an outdated server.
- ``parse_params``, ``pick_structures``, ``flag``: the ``params`` JSON of ``POST /infer/{model}``.
- ``Geometry``: where an uploaded NIfTI's voxels lie. The session holds the volume as ``codecs`` decodes it (RAS+
  canonical, then (slice, row, column) shown radiologically); clients send points in the *file's* voxel indices
  (i, j, k) and expect the label volume back on the file's grid and affine. ``to_session`` / ``from_session`` map
  both ways (nibabel's orientation transforms, exact for any axis permutation and flip).
- ``label_file``: a (Z, H, W) label volume -> NIfTI (``.nii.gz`` / ``.nii``) or NRRD (``.nrrd``: OHIF's default),
  on the file's grid when a ``Geometry`` is known, else RAS+ with the session's spacing.
- ``multipart``: the ``multipart/form-data`` answer of ``/infer`` (``params`` JSON + the label file), as MONAI Label
  sends it and as its client parses it.
Use: ``geo = Geometry.from_nifti(data)``; ``z, row, col = geo.to_session((i, j, k))``;
``name, body, media = label_file(labels, geo, spacing, "liver", ".nii.gz")``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import secrets
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations

from rau_ray.serve.codecs import BadInput

MODEL_SEGMENT = "rau_segmentation"
MODEL_CLICKS = "sam2_interactive"
MODELS = (MODEL_SEGMENT, MODEL_CLICKS)
RESULT_EXTENSIONS = {".nii.gz": "application/gzip", ".nii": "application/octet-stream",
                     ".nrrd": "application/octet-stream"}
OUTPUTS = ("image", "json", "all", "dicom_seg")
MAX_POINTS = 64


def info_body(structures: list[str], version: str, datastore: dict) -> dict:
    """``GET /info/`` as MONAI Label's ``MONAILabelApp.info()`` answers it."""
    labels = {name: i + 1 for i, name in enumerate(structures)}
    models = {
        MODEL_SEGMENT: {
            "type": "segmentation", "dimension": 3, "labels": labels,
            "description": "RAU chain: the reference image the DINOv2 bank retrieves, the Qwen2.5-VL policy's <Seg> "
                           "token and SAM2 segment each named structure on a key slice (params 'slice', default the "
                           "middle one); SAM2 carries the mask through the volume (params 'propagate', default true). "
                           "params 'structures': names or 'all'.",
            "config": {"structures": ["all", *structures], "propagate": True},
        },
        MODEL_CLICKS: {
            "type": "deepgrow", "dimension": 2, "labels": [],
            "description": "SAM2 on one slice: params 'foreground' / 'background' clicks [i, j, k] and an optional "
                           "'roi' box [i1, i2, j1, j2, k1, k2] in the image's voxel indices; the mask is returned "
                           "under params 'label'.",
            "config": {},
        },
    }
    return {"name": "RAU-Ray", "description": "Reference-based anatomical understanding on Ray Serve (MONAI "
                                             "Label-compatible routes)",
            "version": version, "labels": list(structures), "models": models, "trainers": {}, "strategies": {},
            "scoring": {}, "train_stats": {}, "datastore": datastore}


# ------------------------------------------------------------------------------------------------------- params
def parse_params(text) -> dict:
    """The ``params`` form field (a JSON object as text), a JSON body already parsed, or nothing -> a dict."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (ValueError, TypeError) as e:
        raise BadInput(f"params is not JSON: {e}", 422) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"params must be a JSON object, not {type(value).__name__}", 422)
    return value


def flag(value, default: bool) -> bool:
    """A yes/no param sent as a JSON boolean or as text ("true", "false": 3D Slicer's config table sends text)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise BadInput(f"expected true or false, not {value!r}", 422)


def pick_structures(value, known: list[str], limit: int) -> list[str]:
    """params ``structures`` (a list, a comma-separated string, or ``all`` / empty: every known structure) -> names,
    lower case, each once, all known."""
    if value is None or value == "" or value == [] or value == "all" or value == ["all"]:
        names = list(known)
    else:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise BadInput("params structures must be a list of names, a comma-separated string or 'all'", 422)
        names = list(dict.fromkeys(s.strip().lower() for s in items if s.strip()))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BadInput(f"unknown structure(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}", 422)
        if not names:
            raise BadInput("params structures is empty; name one or use 'all'", 422)
    if len(names) > limit:
        raise BadInput(f"{len(names)} structures; at most {limit} a request (params structures picks them)", 422)
    return names


def integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BadInput(f"{what} must be an integer, not {value!r}", 422)
    return int(value)


def points(value, what: str) -> list[tuple[int, ...]]:
    """params ``foreground`` / ``background``: a list of [i, j] or [i, j, k] voxel indices."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_POINTS:
        raise BadInput(f"params {what} must be a list (at most {MAX_POINTS}) of [i, j, k] points", 422)
    out = []
    for p in value:
        if not isinstance(p, list) or len(p) not in (2, 3):
            raise BadInput(f"params {what}: each point is [i, j, k] (or [i, j] on a 2D image), not {p!r}", 422)
        out.append(tuple(integer(v, f"params {what} coordinates") for v in p))
    return out


def roi(value) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """params ``roi``: [i1, i2, j1, j2, k1, k2] (3D Slicer's ROI in voxel indices) or [i1, i2, j1, j2] -> its two
    corners as points ((i1, j1, k1), (i2, j2, k2)), or ((i1, j1), (i2, j2)); None when absent."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) not in (4, 6):
        raise BadInput(f"params roi must be [i1, i2, j1, j2, k1, k2] (or [i1, i2, j1, j2]), not {value!r}", 422)
    v = [integer(x, "params roi values") for x in value]
    return tuple(v[0::2]), tuple(v[1::2])


def result_extension(params: dict) -> str:
    ext = params.get("result_extension") or ".nii.gz"
    if ext not in RESULT_EXTENSIONS:
        raise BadInput(f"params result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, not {ext!r}", 422)
    return ext


def output_kind(value: str | None) -> str:
    value = value or "all"
    if value not in OUTPUTS:
        raise BadInput(f"output must be image, json, all or dicom_seg, not {value!r}", 422)
    return value


def safe_name(text: str, default: str = "image") -> str:
    """A file name's stem fit for a Content-Disposition and a client's temp folder: [A-Za-z0-9._-], no path."""
    base = re.split(r"[\\/]", str(text or ""))[-1]
    for ext in (".nii.gz", ".nii", ".nrrd", ".dcm", ".zip", ".png", ".jpg", ".jpeg"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80]
    return base or default


# ----------------------------------------------------------------------------------------------------- geometry
def _nifti_header(data: bytes) -> nib.Nifti1Header | None:
    head = data[:352]
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                head = gz.read(352)
        except (OSError, EOFError):
            return None
    if len(head) < 348 or head[344:348] not in (b"n+1\x00", b"ni1\x00"):
        return None
    try:
        return nib.Nifti1Header.from_fileobj(io.BytesIO(head + b"\0" * 4))
    except Exception:  # noqa: BLE001 - not a NIfTI header after all: no geometry
        return None


@dataclass(frozen=True, eq=False)
class Geometry:
    """An uploaded NIfTI's grid: its affine (voxel -> RAS mm), its array shape (i, j, k) and voxel sizes."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]

    @classmethod
    def from_nifti(cls, data: bytes) -> Geometry | None:
        """The geometry of NIfTI bytes (the header alone is read), None for anything else."""
        header = _nifti_header(data)
        if header is None:
            return None
        dims = tuple(int(d) for d in header.get_data_shape()[:3])
        shape = (dims + (1, 1, 1))[:3]
        zooms = tuple(float(z) for z in header.get_zooms()[:3])
        zooms = (zooms + (1.0, 1.0, 1.0))[:3]
        return cls(np.asarray(header.get_best_affine(), dtype=np.float64), shape, zooms)

    @property
    def ornt(self) -> np.ndarray:
        """nibabel's orientation of the file's axes (what ``as_closest_canonical`` applies to reach RAS+)."""
        return orientations.io_orientation(self.affine)

    def canonical_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for a, (c, _) in enumerate(self.ornt):
            out[int(c)] = self.shape[a]
        return tuple(out)

    def to_session(self, ijk) -> tuple[int, int, int]:
        """The file's voxel (i, j, k) -> the session's (slice, row, column)."""
        canon = [0, 0, 0]
        for a, (c, f) in enumerate(self.ornt):
            canon[int(c)] = int(ijk[a]) if f > 0 else self.shape[a] - 1 - int(ijk[a])
        nx, ny, _ = self.canonical_shape()
        return canon[2], ny - 1 - canon[1], nx - 1 - canon[0]

    def from_session_point(self, z: int, row: int, col: int) -> tuple[int, int, int]:
        """The session's (slice, row, column) -> the file's voxel (i, j, k)."""
        nx, ny, _ = self.canonical_shape()
        canon = (nx - 1 - col, ny - 1 - row, z)
        ijk = [0, 0, 0]
        for a, (c, f) in enumerate(self.ornt):
            v = canon[int(c)]
            ijk[a] = v if f > 0 else self.shape[a] - 1 - v
        return tuple(ijk)

    def slice_to_z(self, k: int) -> int:
        """The file's slice index k (third axis) -> the session's slice; refused when the third axis is not the
        superior-inferior one (a sagittal or coronal stack has no axial slice k)."""
        c, f = self.ornt[2]
        if int(c) != 2:
            raise BadInput("params slice indexes the third voxel axis, which in this image is not the axial one; "
                           "send points [i, j, k] instead", 422)
        return k if f > 0 else self.shape[2] - 1 - k

    def z_to_slice(self, z: int) -> int:
        c, f = self.ornt[2]
        if int(c) != 2:
            return self.from_session_point(z, 0, 0)[2]
        return z if f > 0 else self.shape[2] - 1 - z

    def from_session(self, volume: np.ndarray) -> np.ndarray:
        """A (Z, H, W) session volume -> the file's (i, j, k) array (the inverse of ``codecs``' decoding)."""
        canon = np.transpose(np.flip(volume, axis=(1, 2)), (2, 1, 0))  # (x, y, z) RAS+
        inverse = np.zeros((3, 2))
        for a, (c, f) in enumerate(self.ornt):
            inverse[int(c)] = (a, f)
        return np.ascontiguousarray(orientations.apply_orientation(canon, inverse))


def session_point(p: tuple[int, ...], geometry: Geometry | None, default_k: int | None) -> tuple[int, int, int]:
    """A client's point [i, j(, k)] -> (slice, row, column). Without a geometry (DICOM, PNG) i is the column, j the
    row and k the slice as the session holds them. A 2D point takes ``default_k`` (params ``slice``, else 0)."""
    i, j = p[0], p[1]
    k = p[2] if len(p) > 2 else (default_k or 0)
    if geometry is None:
        return k, j, i
    return geometry.to_session((i, j, k))


# --------------------------------------------------------------------------------------------------- encodings
def _nrrd(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A raw-encoded NRRD (uint8, RAS space) of an (i, j, k) array on ``affine``'s grid."""
    arr = np.asarray(array, dtype=np.uint8)
    dirs = " ".join("(" + ",".join(f"{v:.7g}" for v in affine[:3, a]) + ")" for a in range(3))
    origin = "(" + ",".join(f"{v:.7g}" for v in affine[:3, 3]) + ")"
    header = ("NRRD0004\n# RAU-Ray label volume\ntype: uint8\ndimension: 3\nspace: right-anterior-superior\n"
              f"sizes: {arr.shape[0]} {arr.shape[1]} {arr.shape[2]}\nspace directions: {dirs}\n"
              f"kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: {origin}\n\n")
    return header.encode("ascii") + arr.tobytes(order="F")


def label_file(labels: np.ndarray, geometry: Geometry | None, spacing, stem: str, ext: str = ".nii.gz"
               ) -> tuple[str, bytes, str]:
    """(file name, bytes, media type) of a (Z, H, W) uint8 label volume: on the uploaded file's grid and affine
    when its ``geometry`` is known, else RAS+ (x, y, z) with the session's ``spacing``."""
    labels = np.asarray(labels, dtype=np.uint8)
    if geometry is not None:
        data, affine, zooms = geometry.from_session(labels), geometry.affine, geometry.zooms
    else:
        sp = tuple(float(s) for s in spacing) + (1.0,) * (3 - len(spacing))
        data = np.ascontiguousarray(np.transpose(np.flip(labels, axis=(1, 2)), (2, 1, 0)))
        zooms = sp[:3]
        affine = np.diag([*zooms, 1.0])
    name = f"{stem}{ext}"
    if ext == ".nrrd":
        return name, _nrrd(data, affine), RESULT_EXTENSIONS[ext]
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    if ext == ".nii":
        return name, raw, RESULT_EXTENSIONS[ext]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw)
    return name, buf.getvalue(), RESULT_EXTENSIONS[ext]


def multipart(params: dict, file_name: str, data: bytes, media_type: str) -> tuple[bytes, str]:
    """(body, content type) of ``/infer``'s answer: a ``params`` JSON part and an ``image`` file part."""
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(params)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file_name}\"\r\n"
            f"Content-Type: {media_type}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def key_slice(value, slices: int, geometry: Geometry | None) -> int | None:
    """params ``slice`` (the file's third voxel index; absent or negative: none, as MONAI Label's -1) -> the
    session's slice, checked against the image; None when not given."""
    if value is None or value == "" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0):
        return None
    k = integer(value, "params slice")
    depth = geometry.shape[2] if geometry is not None else slices
    if not 0 <= k < depth:
        raise BadInput(f"params slice {k} is outside the image: it has {depth} slice(s), 0 to {depth - 1}", 422)
    return geometry.slice_to_z(k) if geometry is not None else k
