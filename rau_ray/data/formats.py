"""Medical image file formats: NIfTI, DICOM and PNG readers/writers, CT HU windows and the 16-bit CT PNG encoding.

Every reader turns a missing, corrupt or truncated file into a ``DataError`` naming the file; every writer produces
deterministic bytes (same array -> same file) and writes them atomically (temp file + rename).
Use: ``hu, spacing, _ = read_nifti("ct.nii.gz"); grey = apply_window(hu[:, :, 40], "abdomen")``.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from rau_ray.atomic import atomic_write_bytes
from rau_ray.errors import DataError

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------------------------- HU windows
# (level, width) in Hounsfield units, the usual radiology display presets (as in common PACS viewers and Radiopaedia's
# "CT windows" article): the displayed range is [level - width/2, level + width/2], black below, white above.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40, 400),
    "bone": (400, 1800),
    "lung": (-600, 1500),
    "brain": (40, 80),
    "soft_tissue": (50, 350),
    "liver": (60, 160),
}


def get_window(name_or_pair: str | Sequence[float]) -> tuple[float, float]:
    """(level, width) from a preset name (``"abdomen"``), a ``(level, width)`` pair or a string ``"40,400"``."""
    w: Any = name_or_pair
    if isinstance(w, str):
        key = w.strip().lower()
        if key in WINDOWS:
            w = WINDOWS[key]
        elif "," in key:
            w = key.split(",")
        else:
            raise DataError(f"unknown window {name_or_pair!r}; use one of {', '.join(WINDOWS)} "
                            f"or 'level,width' such as '40,400'")
    try:
        level, width = (float(v) for v in w)
    except (TypeError, ValueError):
        raise DataError(f"window must be a preset name, a (level, width) pair or 'level,width'; "
                        f"got {name_or_pair!r}") from None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise DataError(f"window {name_or_pair!r}: level must be finite and width > 0")
    return level, width


def apply_window(hu: np.ndarray, window: str | Sequence[float] = "abdomen") -> np.ndarray:
    """Map HU linearly from [level - width/2, level + width/2] to [0, 255], clipped, as uint8."""
    level, width = get_window(window)
    scaled = (np.asarray(hu, dtype=np.float32) - (level - width / 2)) * (255.0 / width)
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------- helpers
def _existing(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    return p


def _unreadable(kind: str, path: Path, e: Exception) -> DataError:
    return DataError(f"not a readable {kind} file: {path} ({type(e).__name__}: {e})")


# --------------------------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: PathLike) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(array, spacing, affine) reoriented to the closest canonical RAS+ orientation.

    Floating-point data comes back as float32, integer data in its stored integer type. ``spacing`` holds the spatial
    voxel sizes (mm) of the reoriented axes, at most three.
    """
    p = _existing(path)
    try:
        img = nib.as_closest_canonical(nib.load(p))
        arr = np.asanyarray(img.dataobj)  # truncation / gzip errors only surface when the data is read
        spacing = tuple(float(z) for z in img.header.get_zooms()[: min(arr.ndim, 3)])
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise _unreadable("NIfTI", p, e) from e
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    return np.asarray(arr), spacing, affine


def read_nifti_label(path: PathLike) -> np.ndarray:
    """Label volume as an integer array (RAS+ like ``read_nifti``); float files must hold whole numbers only."""
    arr, _, _ = read_nifti(path)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
        raise DataError(f"{path}: label map holds non-integer values; a label map needs whole-number labels")
    return arr.astype(np.int32)


def encode_nifti(array: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None,
                 compress: bool = True) -> bytes:
    """Deterministic NIfTI-1 bytes (gzip without timestamp or name when ``compress``).

    Default affine ``diag(-sx, -sy, sz, 1)``: array axes i, j, k point to patient Left, Posterior, Superior
    (LPS storage), so ``read_nifti`` returns such an array flipped on axes 0 and 1 (RAS+).
    """
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:  # nibabel refuses 64-bit ints without an explicit dtype
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise DataError(f"cannot write a {arr.dtype} array with values outside the int32 range as NIfTI")
        arr = arr.astype(np.int32)
    sp = tuple(float(s) for s in spacing)
    if arr.ndim < 3 or len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise DataError(f"NIfTI needs a 3D+ array and 3 positive spacings; got shape {arr.shape}, spacing {spacing}")
    if affine is None:
        affine = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_zooms(sp + tuple(img.header.get_zooms()[3:]))
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    if not compress:
        return data
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


def write_nifti(path: PathLike, array: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None) -> None:
    """Write ``array`` as NIfTI (gzipped when ``path`` ends with .gz), atomically and byte-for-byte deterministic."""
    atomic_write_bytes(path, encode_nifti(array, spacing, affine, compress=str(path).lower().endswith(".gz")))


# --------------------------------------------------------------------------------------------------------- DICOM
def _dicom_hu(path: PathLike) -> tuple[Any, np.ndarray]:
    """(dataset, 2D float32 pixel array after the modality LUT) of one DICOM file."""
    p = _existing(path)
    try:
        ds = pydicom.dcmread(p)
        hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    except Exception as e:
        raise _unreadable("DICOM", p, e) from e
    if hu.ndim != 2:
        raise DataError(f"{p}: expected a single-frame greyscale DICOM image, got pixel array shape {hu.shape}")
    return ds, hu


def _dicom_spacing(ds: Any, path: PathLike) -> tuple[float, float]:
    """(x, y) = (column spacing, row spacing); DICOM PixelSpacing is [row spacing, column spacing]."""
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not ps or len(ps) != 2:
        raise DataError(f"{path}: DICOM file has no PixelSpacing (or ImagerPixelSpacing)")
    return float(ps[1]), float(ps[0])


def read_dicom(path: PathLike) -> tuple[np.ndarray, tuple[float, float], str]:
    """(HU float32 2D array, spacing (x, y) in mm, modality). RescaleSlope/Intercept are applied; no window is."""
    ds, hu = _dicom_hu(path)
    return hu, _dicom_spacing(ds, path), str(ds.get("Modality", ""))


# --------------------------------------------------------------------------------------------------------- PNG
CT_PNG_OFFSET = 1024  # CT 2D images are stored as uint16 PNG holding HU + 1024 (HU clipped to [-1024, 64511])


def hu_to_png16(hu: np.ndarray) -> np.ndarray:
    """HU -> uint16 ``round(clip(HU, -1024, 64511)) + 1024``."""
    hu = np.clip(np.asarray(hu, dtype=np.float64), -CT_PNG_OFFSET, 65535 - CT_PNG_OFFSET)
    return (np.rint(hu) + CT_PNG_OFFSET).astype(np.uint16)


def png16_to_hu(arr: np.ndarray) -> np.ndarray:
    """uint16 PNG values -> HU (float32): value - 1024."""
    return np.asarray(arr, dtype=np.float32) - CT_PNG_OFFSET


def _open_png(path: PathLike) -> tuple[Path, Any]:
    p = _existing(path)
    try:
        with Image.open(p) as img:
            img.load()  # decoding errors (truncation) only surface here
            return p, img.copy()
    except Exception as e:
        raise _unreadable("PNG", p, e) from e


def read_png_image(path: PathLike) -> np.ndarray:
    """2D image: uint8 for 8-bit files, uint16 for 16-bit; colour images are converted to greyscale (PIL 'L')."""
    p, img = _open_png(path)
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":  # 32-bit ints (older Pillow opens 16-bit PNGs so)
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"{p}: 32-bit image values outside the 16-bit range")
        return arr.astype(np.uint16)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def read_png_label(path: PathLike) -> np.ndarray:
    """Label map as int32; the file must be single-channel (mode L, I;16, I, P or 1), never RGB."""
    p, img = _open_png(path)
    if img.mode not in ("L", "I;16", "I;16B", "I", "P", "1"):
        raise DataError(f"{p}: label map must be single-channel (greyscale or palette), got PNG mode {img.mode!r}")
    return np.asarray(img).astype(np.int32)


def encode_png(array: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a 2D uint8 or uint16 array (no metadata)."""
    arr = np.asarray(array)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise DataError(f"PNG writer takes 2D uint8 or uint16 arrays; got {arr.dtype} shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: PathLike, array: np.ndarray) -> None:
    """Write a 2D uint8 or uint16 array as PNG (uint16 -> 16-bit greyscale), atomically."""
    atomic_write_bytes(path, encode_png(array))


# --------------------------------------------------------------------------------------------------------- dispatch
SUPPORTED = ".nii, .nii.gz, .dcm, .png"


def read_image(path: PathLike) -> np.ndarray:
    """Pixel array of any supported file: NIfTI (RAS+), DICOM (HU, also without .dcm suffix) or PNG."""
    p = _existing(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(p)[0]
    if name.endswith(".png"):
        return read_png_image(p)
    if name.endswith(".dcm"):
        return read_dicom(p)[0]
    with open(p, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return read_dicom(p)[0]
    raise DataError(f"unsupported image format '{p.suffix}' for {p}; supported: {SUPPORTED}")
