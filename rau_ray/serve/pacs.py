"""Segment a study in a PACS over DICOMweb and store the DICOM-SEG back: what ``rau pacs segment`` and
``POST /v1/pacs/segment`` run.

``segment_study(pacs, study, structures, backend)``: find the series (QIDO-RS: the study's one image series, or the
one named), fetch its instances (WADO-RS), open them as a volume exactly as a session opened from an uploaded DICOM
series (``codecs.series_from_datasets``), segment each structure as a person would in a session on that volume
(``sessions.segment_volume``: "segment the liver" on every slice; or, faster, on five slices, the largest mask
kept as the key slice and "propagate"d through the volume: the sessions' own code and backend), build one DICOM-SEG
with a
segment per structure (``dicom_seg.build_segmentation``, AUTOMATIC) and store it (STOW-RS, one request: the PACS
holds the whole SEG or nothing). Each phase is timed: fetch (QIDO + WADO + volume), segment, store (SEG encode +
STOW). The backend: the Ingress's ``Pipeline`` (the deployments; ``ServeBackend``), or ``LocalBackend`` in the CLI
(the same checkpoints in this process, ``RAUModel``); either answers an empty mask for a slice that no reference
shows the structure on. A PACS failure is a ``rau_ray.dicomweb.PacsError`` (502 / 504, the reason named); a series
that is not one volume is a ``PacsSeriesError`` (422); nothing is stored unless every structure was segmented and
the SEG built.
Use: ``result = await segment_study(DicomWeb(url), study, ["liver", "spleen"], backend, known=...)``; from the command
line ``rau pacs segment --url http://127.0.0.1:8042/dicom-web --study UID --structures liver,spleen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rau_ray.dicomweb import DicomWeb, PacsRequestError
from rau_ray.errors import DataError, RauError
from rau_ray.models import retrieval
from rau_ray.models.rau import RAUModel
from rau_ray.serve import codecs
from rau_ray.serve.dicom_seg import SegExportError, build_segmentation
from rau_ray.serve.http import ApiError
from rau_ray.serve.prompt_decoder import decode_prompts
from rau_ray.serve.sessions import SessionError, VolumeSegmentation, segment_volume

MAX_STRUCTURES = 16


class PacsSeriesError(RauError):
    """The fetched series cannot be segmented (not one volume, too large, a structure the models do not know): 422
    (413 for a size limit)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def parse_structures(structures: str | Sequence[str]) -> list[str]:
    """"liver,spleen" or ["liver", "spleen"] -> ["liver", "spleen"] (trimmed, lower case, duplicates dropped)."""
    items = structures.split(",") if isinstance(structures, str) else list(structures)
    out: list[str] = []
    for item in items:
        name = " ".join(str(item).split()).lower()
        if name and name not in out:
            out.append(name)
    if not out:
        raise PacsRequestError("name at least one structure to segment, e.g. liver,spleen")
    if len(out) > MAX_STRUCTURES:
        raise PacsRequestError(f"{len(out)} structures; at most {MAX_STRUCTURES} per request")
    return out


def check_known(structures: Sequence[str], known: Sequence[str] | None) -> None:
    if known is None:
        return
    unknown = [s for s in structures if s not in set(known)]
    if unknown:
        raise PacsSeriesError(f"unknown structure(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(sorted(known))}")


def _structure_summary(name: str, done: VolumeSegmentation, spacing: Sequence[float]) -> dict:
    sx, sy = float(spacing[0]), float(spacing[1])
    sz = float(spacing[2]) if len(spacing) > 2 else 1.0
    voxels = int(done.masks.sum())
    score = done.result.get("score") if done.key_slice is not None else None
    return {"name": name, "present": voxels > 0, "key_slice": done.key_slice,
            "score": None if score is None else round(float(score), 4), "slices": done.slices,
            "voxels": voxels, "volume_ml": round(voxels * sx * sy * sz / 1000.0, 3),
            "tried": {str(k): v for k, v in done.tried.items()}}


async def segment_study(pacs: DicomWeb, study: str, structures: Sequence[str], backend, *,
                        series: str | None = None, known: Sequence[str] | None = None, propagate: bool = False,
                        software_version: str = "0.1.0", masks_out: dict | None = None,
                        progress: Callable[[str, dict], None] | None = None) -> dict:
    """The whole job (see the module's docstring); returns what the CLI prints and the route answers: the source
    series, the stored SEG's UIDs, a summary per structure and the timings in seconds. ``masks_out``: a dict given
    here receives {structure: bool (Z, H, W)} in the source series' slice order (the SEG's frames). ``progress``:
    called after each phase with its name ("fetch", "segment", "store") and what it did. Each structure is
    segmented on every slice (the full pipeline per slice, a slice no reference shows it on left empty); with
    ``propagate``, on a key slice only and carried through by SAM2 (``sessions.segment_volume``): several times
    faster, but SAM2's slice-to-slice propagation drifts onto neighbours for small organs (BENCHMARKS.md)."""
    structures = parse_structures(structures)
    check_known(structures, known)
    say = progress or (lambda phase, info: None)
    timings: dict[str, float] = {}
    t_start = t0 = time.perf_counter()
    info = await asyncio.to_thread(pacs.pick_series, study, series)
    timings["qido"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    datasets = await asyncio.to_thread(pacs.fetch, study, info.uid)
    timings["wado"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        decoded = await asyncio.to_thread(codecs.series_from_datasets, datasets, f"series {info.uid}")
    except codecs.BadInput as e:
        raise PacsSeriesError(f"{pacs.url}: {e.message}", e.status) from None
    del datasets  # the pixels are in the volume now; the headers in decoded.sources
    timings["volume"] = time.perf_counter() - t0
    timings["fetch"] = timings["qido"] + timings["wado"] + timings["volume"]
    say("fetch", {"series": info.uid, "slices": int(decoded.array.shape[0]), "seconds": timings["fetch"]})

    t0 = time.perf_counter()
    volume = decoded.array if decoded.array.ndim == 3 else decoded.array[None]
    try:
        done = await asyncio.gather(*(segment_volume(volume, decoded.modality, tuple(decoded.spacing), s, backend,
                                                     set(known) if known is not None else None,
                                                     every_slice=not propagate)
                                      for s in structures))
    except SessionError as e:
        raise PacsSeriesError(str(e)) from None
    masks = {s: d.masks for s, d in zip(structures, done)}
    summary = [_structure_summary(s, d, decoded.spacing) for s, d in zip(structures, done)]
    timings["segment"] = time.perf_counter() - t0
    say("segment", {"structures": summary, "seconds": timings["segment"]})

    t0 = time.perf_counter()
    try:
        seg = await asyncio.to_thread(build_segmentation, decoded.sources, masks, automatic=True,
                                      software_version=software_version)
    except SegExportError as e:
        raise PacsSeriesError(f"series {info.uid}: {e}") from None
    timings["encode"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    stored = await asyncio.to_thread(pacs.store, seg)
    timings["stow"] = time.perf_counter() - t1
    timings["store"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    say("store", {"sop_instance_uid": stored.sop_instance_uid, "seconds": timings["store"]})
    if masks_out is not None:
        masks_out.update(masks)
    return {"pacs": pacs.url, "study": study, "mode": "key slice + propagation" if propagate else "every slice",
            "series": {"uid": info.uid, "modality": info.modality, "description": info.description,
                       "slices": int(volume.shape[0]), "instance_uids": [str(ds.SOPInstanceUID)
                                                                         for ds in decoded.sources]},
            "seg": {"study_uid": stored.study_uid, "series_uid": stored.series_uid,
                    "sop_instance_uid": stored.sop_instance_uid, "retrieve_url": stored.retrieve_url},
            "structures": summary, "timings_s": {k: round(v, 4) for k, v in timings.items()}}


def not_here(session, why: str) -> dict:
    """A segment result for a slice the models find no reference for (the structure is not at this level)."""
    return {"mask": np.zeros(session.shape, bool), "score": 0.0, "reference": None, "absent": why}


class ServeBackend:
    """The Ingress's ``Pipeline`` as the job's backend: a 422 for one slice (no reference in the bank shows the
    structure near it, or the reference lacks it) is an empty mask there, so the key-slice search moves on; any
    other error (503, 504) is raised."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    async def segment(self, session, target: str) -> dict:
        try:
            return await self.pipeline.segment(session, target)
        except ApiError as e:
            if e.status != 422:
                raise
            return not_here(session, e.message)

    async def prompt(self, image, points, labels, box, key: str | None = None) -> dict:
        return await self.pipeline.prompt(image, points, labels, box, key=key)


# ---------------------------------------------------------------------------------------- the CLI's backend
class LocalBackend:
    """What a ``Session`` asks of the models, answered in this process by one ``RAUModel`` (the CLI has no Serve
    app): ``segment`` = ``RAUModel.predict`` on the session's current slice (reference from the bank, policy,
    <Seg>, segmenter: what the Serve pipeline's ``segment_one`` does across deployments), ``prompt`` = SAM2's prompt
    decoder on the slice's cached embedding (``decode_prompts``, the one the Segmenter and the Ingress run)."""

    def __init__(self, model: RAUModel):
        self.model = model

    def known_structures(self) -> list[str]:
        return sorted({n for r in self.model.bank.rows for n in r["labels"].values()})

    async def segment(self, session, target: str) -> dict:
        try:
            with torch.no_grad():
                p = self.model.predict(session.current_image(), target, modality=session.modality)
        except DataError as e:  # no reference shows the structure near this slice: not here
            return not_here(session, str(e))
        return {"mask": p.mask, "score": p.score, "reference": p.reference, "label": p.label, "box": p.box,
                "reasoning": p.reasoning, "format_error": p.format_error,
                "timings_ms": {k: round(1000 * v, 2) for k, v in p.timings.items()}}

    async def prompt(self, image: np.ndarray, points, labels, box, key: str | None = None) -> dict:
        cached = key in self.model._embeddings if key else False
        t0 = time.perf_counter()
        with torch.no_grad():
            embedding = self.model.image_embedding(image)
            mask, score = decode_prompts(self.model.segmenter.predictor, embedding, points, labels, box)
        return {"mask": mask, "score": score, "cached": cached, "timings": {"total": time.perf_counter() - t0}}


@contextlib.contextmanager
def local_backend(policy_checkpoint: str | None, segmenter_checkpoint: str | None, bank_dir: str | None = None,
                  profile: str = "tiny", phantom_subjects: int = 6, phantom_size: int = 128,
                  threads: int | None = 1):
    """A ``LocalBackend`` on the checkpoints, with the bank at ``bank_dir``; without one, the small CT phantom bank
    the Serve Retriever builds for ``bank_dir: null`` (``retrieval.phantom_bank``, in a temp folder removed after).
    ``threads``: torch's threads in this process (None: torch's default). 1, as each Serve replica of local.yaml
    runs: the tiny models' small ops gain nothing from a second thread, and on a busy 2-core machine its spin-waits
    made one prediction 13-26 s instead of 0.4 s (measured here)."""
    if threads:
        torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory(prefix="rau-pacs-bank-") as tmp:
        if bank_dir is None:
            bank_dir = retrieval.phantom_bank(tmp, phantom_subjects, phantom_size)
        model = RAUModel.from_checkpoint(policy=policy_checkpoint, segmenter=segmenter_checkpoint,
                                         bank_dir=bank_dir, profile=profile)
        yield LocalBackend(model)


def run_cli(url: str, study: str, structures: str, *, series: str | None = None, timeout_s: float = 30.0,
            policy_checkpoint: str | None = None, segmenter_checkpoint: str | None = None,
            bank_dir: str | None = None, profile: str = "tiny", threads: int | None = 1, propagate: bool = False,
            say: Callable[[str], None] | None = None) -> dict:
    """``rau pacs segment``: the job with a ``LocalBackend`` (``say``: one line per phase as it ends)."""
    names = parse_structures(structures)
    pacs = DicomWeb(url, timeout_s=timeout_s)
    try:
        pacs.pick_series(study, series)  # the URL, the study and the series before the models load

        def progress(phase: str, info: dict) -> None:
            if say is None:
                return
            if phase == "fetch":
                say(f"fetch: {info['slices']} slices of series {info['series']} in {info['seconds']:.2f} s")
            elif phase == "segment":
                found = ", ".join(f"{s['name']} {len(s['slices'])} slices" for s in info["structures"])
                say(f"segment: {found} in {info['seconds']:.2f} s")
            else:
                say(f"store: DICOM-SEG {info['sop_instance_uid']} in {info['seconds']:.2f} s")

        with local_backend(policy_checkpoint, segmenter_checkpoint, bank_dir, profile, threads=threads) as backend:
            return asyncio.run(segment_study(pacs, study, names, backend, series=series, propagate=propagate,
                                             known=backend.known_structures(), progress=progress))
    finally:
        pacs.close()
