"""Bytes in, bytes out for the HTTP API: image decoding with limits, masks as PNG or COCO RLE.

``decode_image(data)`` reads PNG / JPEG (Pillow), DICOM (pydicom, modality LUT -> HU) and, with ``volumes=True``,
NIfTI (nibabel) and returns a ``Decoded`` (array, modality, spacing); ``decode_series(parts)`` makes one volume of a
DICOM series sent as many files or as one zip (``rau_ray.data.dicom_series``: grouped, ordered by geometry). Anything
else, a truncated file, an unsafe zip or an image over the limits raises ``BadInput`` (status 400/413/415/422) with a
message a person can act on.
COCO RLE follows pycocotools' spec (column-major counts starting with a run of zeros, LEB128-like string).
Use: ``img = decode_image(open("x.png", "rb").read())``; ``rle = rle_encode(mask)``; ``rle_decode(rle)``.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from rau_ray.data import formats
from rau_ray.data.dicom_series import read_datasets, series_volume
from rau_ray.errors import DataError

MAX_IMAGE_BYTES = 32 * 2 ** 20  # a 512x512x300 int16 volume gzipped fits; a 2D image is far smaller
MAX_PIXELS = 4096 * 4096  # per slice
MAX_SLICES = 1024
ZIP_MAX_RATIO = 8  # a zip may unpack to at most this many times the image byte limit (zip bombs stop there)


class BadInput(ValueError):
    """The client's input is unusable: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Decoded:
    array: np.ndarray  # (H, W) 2D, or (Z, H, W) volume; CT in HU (float32), other modalities uint8/uint16
    modality: str  # CT for DICOM CT / 16-bit PNG (HU + 1024) / NIfTI; else the DICOM's, or "" for 8-bit images
    spacing: tuple[float, ...]  # (x, y) or (x, y, z) mm; (1, 1) when the format carries none
    kind: str  # png | jpeg | dicom | nifti
    # DICOM only: the source datasets' metadata (read without pixel data), one per slice, so a DICOM-SEG can
    # reference them (``rau_ray.serve.dicom_seg``); empty for PNG / JPEG / NIfTI
    sources: tuple = ()

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3


def b64decode(text: str, what: str = "image_b64") -> bytes:
    if not isinstance(text, str) or not text:
        raise BadInput(f"{what} must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"{what} is not valid base64: {e}") from None


def _check_pixels(shape, max_pixels: int) -> None:
    h, w = shape[-2], shape[-1]
    if h * w > max_pixels:
        raise BadInput(f"image is {w}x{h} pixels; the limit is {max_pixels} pixels per slice", 413)
    if h < 8 or w < 8:
        raise BadInput(f"image is {w}x{h} pixels; at least 8x8 is needed")


def decode_image(data: bytes, *, volumes: bool = False, max_bytes: int = MAX_IMAGE_BYTES,
                 max_pixels: int = MAX_PIXELS) -> Decoded:
    """Sniff the format from the bytes (never from a file name) and decode it."""
    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise BadInput("the image is empty")
    if len(data) > max_bytes:
        raise BadInput(f"the image is {len(data)} bytes; the limit is {max_bytes} bytes", 413)
    data = bytes(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        return _decode_pil(data, max_pixels)
    if len(data) >= 132 and data[128:132] == b"DICM":
        return _decode_dicom(data, max_pixels)
    if _looks_nifti(data):
        if not volumes:
            raise BadInput("a NIfTI volume is accepted by POST /v1/sessions only; send a 2D PNG, JPEG or DICOM here",
                           415)
        return _decode_nifti(data, max_bytes, max_pixels)
    raise BadInput("not an image: expected PNG, JPEG or DICOM" + (" or NIfTI" if volumes else "") +
                   f" (the data starts with {data[:8]!r})", 415)


def _decode_pil(data: bytes, max_pixels: int) -> Decoded:
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels((img.height, img.width), max_pixels)  # before decoding: no decompression bombs
            img.load()  # truncation only surfaces here
            kind = "png" if img.format == "PNG" else "jpeg"
            if img.mode.startswith("I;16") or img.mode == "I":
                arr = np.asarray(img)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise BadInput("32-bit image values outside the 16-bit range")
                # the project's convention: a 16-bit greyscale PNG is CT holding HU + 1024
                return Decoded(formats.png16_to_hu(arr.astype(np.uint16)), "CT", (1.0, 1.0), kind)
            grey = img if img.mode == "L" else img.convert("L")
            return Decoded(np.asarray(grey, dtype=np.uint8), "", (1.0, 1.0), kind)
    except BadInput:
        raise
    except Image.DecompressionBombError as e:
        raise BadInput(f"image too large: {e}", 413) from None
    except Exception as e:  # truncated, corrupt
        raise BadInput(f"unreadable image ({type(e).__name__}: {e})") from None


def _decode_dicom(data: bytes, max_pixels: int) -> Decoded:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if rows and cols:
            _check_pixels((rows, cols), max_pixels)
        hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if hu.ndim != 2:
        raise BadInput(f"expected a single-frame greyscale DICOM image, got pixel array shape {hu.shape}")
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    spacing = (float(ps[1]), float(ps[0])) if ps and len(ps) == 2 else (1.0, 1.0)
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":  # only CT carries HU; others go to 8 bits for the models
        lo, hi = float(hu.min()), float(hu.max())
        hu = np.zeros(hu.shape, np.uint8) if hi <= lo else np.rint((hu - lo) / (hi - lo) * 255).astype(np.uint8)
    try:  # the metadata alone (patient, study, series, UIDs, geometry) for DICOM-SEG; the pixels are in ``hu``
        meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - it was read once already; without metadata there is just no DICOM-SEG
        meta = None
    return Decoded(hu, modality, spacing, "dicom", (meta,) if meta is not None else ())


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def unzip_series(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file in a zip, refused before anything is unpacked when a name leaves the zip's root,
    the members are more than ``MAX_SLICES`` or would unpack past ``ZIP_MAX_RATIO * max_bytes`` (a zip bomb);
    folders, hidden files and macOS resource forks are skipped."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise BadInput(f"unreadable zip ({e})") from None
    kept = []
    for m in members:
        path = PurePosixPath(m.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
            raise BadInput(f"the zip holds {m.filename!r}, a path that leaves the zip's root", 422)
        if m.is_dir() or any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
            continue
        kept.append(m)
    if not kept:
        raise BadInput("the zip holds no files")
    if len(kept) > MAX_SLICES:
        raise BadInput(f"the zip holds {len(kept)} files; the limit is {MAX_SLICES} slices", 413)
    budget = ZIP_MAX_RATIO * max_bytes
    if sum(m.file_size for m in kept) > budget:
        raise BadInput(f"the zip unpacks to more than {budget} bytes", 413)
    out = []
    for m in kept:
        try:
            with archive.open(m) as f:
                content = f.read(budget + 1)  # the declared sizes may lie: never read past the budget
        except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError) as e:
            raise BadInput(f"{m.filename}: cannot be unpacked ({e})") from None
        budget -= len(content)
        if budget < 0:
            raise BadInput(f"the zip unpacks to more than {ZIP_MAX_RATIO * max_bytes} bytes", 413)
        out.append((m.filename, content))
    return out


def decode_series(parts: list[tuple[str, bytes]], *, max_bytes: int = MAX_IMAGE_BYTES,
                  max_pixels: int = MAX_PIXELS) -> Decoded:
    """One DICOM series, sent as ``parts`` = (file name, bytes) (a zip among them is unpacked), -> a (Z, H, W) volume
    ordered along the slice normal, spacing (x, y, z), and the slices' headers (no pixels) for DICOM-SEG."""
    files: list[tuple[str, bytes]] = []
    for name, data in parts:
        files += unzip_series(data, max_bytes) if is_zip(data) else [(name, data)]
    if len(files) > MAX_SLICES:
        raise BadInput(f"{len(files)} files; the limit is {MAX_SLICES} slices", 413)
    for name, data in files:
        if not (len(data) >= 132 and data[128:132] == b"DICM"):
            raise BadInput(f"{name}: not a DICOM file (a series upload takes DICOM slices, or one zip of them)", 415)
    try:
        datasets = read_datasets(files)
    except DataError as e:
        raise BadInput(str(e), 422) from None
    return series_from_datasets(datasets, "the uploaded series", max_pixels=max_pixels)


def series_from_datasets(datasets, where: str = "the series", *, max_pixels: int = MAX_PIXELS) -> Decoded:
    """A series' datasets (read from files, or fetched from a PACS: ``rau_ray.serve.pacs``) -> the volume a session
    opens: ordered along the slice normal, CT in HU (other modalities to 8 bits), the headers kept without pixels.
    Not one volume (a gap, two series, multi-frame) -> ``BadInput`` 422 naming ``where``; too many pixels -> 413."""
    if len(datasets) > MAX_SLICES:
        raise BadInput(f"{where}: {len(datasets)} slices; the limit is {MAX_SLICES}", 413)
    try:
        for ds in datasets:
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise DataError(f"{getattr(ds, 'filename', None) or where}: a multi-frame DICOM; send the series "
                                "as single-frame slices")
            _check_pixels((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))), max_pixels)
        series = series_volume(datasets, where)
    except DataError as e:
        raise BadInput(str(e), 422) from None
    volume = series.volume
    if series.modality != "CT":  # only CT carries HU; others go to 8 bits for the models, per volume
        lo, hi = float(volume.min()), float(volume.max())
        volume = (np.zeros(volume.shape, np.uint8) if hi <= lo
                  else np.rint((volume - lo) / (hi - lo) * 255).astype(np.uint8))
    headers = []
    for ds in series.sources:  # the metadata alone (patient, study, UIDs, geometry): what a DICOM-SEG copies
        meta = ds.copy()
        for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if tag in meta:
                delattr(meta, tag)
        headers.append(meta)
    return Decoded(volume, series.modality, series.spacing, "dicom", tuple(headers))


def _looks_nifti(data: bytes) -> bool:
    head = data[:352]
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                head = gz.read(352)
        except Exception:
            return False
    return len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")


def _decode_nifti(data: bytes, max_bytes: int, max_pixels: int) -> Decoded:
    try:
        raw = data
        if data[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                raw = gz.read(8 * max_bytes + 1)  # gzip bombs stop here
            if len(raw) > 8 * max_bytes:
                raise BadInput(f"the NIfTI volume unpacks to more than {8 * max_bytes} bytes", 413)
        img = nib.Nifti1Image.from_bytes(raw)
        img = nib.as_closest_canonical(img)
        vol = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if vol.ndim != 3:
        raise BadInput(f"expected a 3D NIfTI volume, got shape {vol.shape}")
    if vol.shape[2] > MAX_SLICES:
        raise BadInput(f"the volume has {vol.shape[2]} slices; the limit is {MAX_SLICES}", 413)
    # RAS+ (x, y, z) -> (z, rows, cols) shown radiologically: rows anterior -> posterior, columns right -> left
    # (as rau_ray.data.importers.axial_slice cuts the slices the models were trained on)
    arr = np.ascontiguousarray(np.flip(np.transpose(vol, (2, 1, 0)), axis=(1, 2)))
    _check_pixels(arr.shape, max_pixels)
    return Decoded(arr, "CT", zooms, "nifti")


# ---------------------------------------------------------------------------------------------------- masks
def mask_png(mask: np.ndarray) -> bytes:
    """A bool (H, W) mask -> 8-bit PNG with 0 / 255."""
    return formats.encode_png(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE ``{"size": [h, w], "counts": str}`` of a (H, W) mask, as pycocotools.mask.encode writes it."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"a mask is 2D, got shape {m.shape}")
    h, w = m.shape
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    if not flat.size:
        counts = [0]
    return {"size": [int(h), int(w)], "counts": _counts_to_string(counts)}


def _counts_to_string(counts: list[int]) -> str:
    out = bytearray()
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)  # COCO: delta against the count two back, from i > 2
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(ch + 48)
    return out.decode("ascii")


def _string_to_counts(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = _string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(counts) != h * w or any(c < 0 for c in counts):
        raise ValueError(f"RLE counts sum to {sum(counts)}, not {h * w}")
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape((w, h)).T.copy()


def encode_mask(mask: np.ndarray, fmt: str = "rle") -> dict | str:
    """``rle`` -> COCO RLE dict; ``png`` -> base64 PNG string."""
    if fmt == "rle":
        return rle_encode(mask)
    if fmt == "png":
        return base64.b64encode(mask_png(mask)).decode("ascii")
    raise BadInput(f"mask_format must be 'rle' or 'png', not {fmt!r}", 422)
