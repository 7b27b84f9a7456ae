"""Benchmark (BENCHMARKS.md "A PACS over DICOMweb"): a 64-slice phantom CT series through Orthanc, each phase timed.

A local Orthanc (``rau_ray.orthanc.LocalOrthanc``: Debian orthanc + orthanc-dicomweb on loopback, temp storage)
holds one phantom CT series (``phantom_ct_series``: 64 axial slices, 192 px as the tiny profile's data, 5 mm apart);
the job of ``rau pacs segment`` / ``POST /v1/pacs/segment`` (``rau_ray.serve.pacs.segment_study``) segments liver and
spleen ``--runs`` times: fetch (QIDO-RS + WADO-RS + the volume), segment (each structure through a session: key
slice, segment, propagate; or ``every-slice``: the full pipeline on each slice), store (DICOM-SEG encode + STOW-RS).
Two paths: ``local`` (the CLI's: the shipped checkpoints in this process, ``LocalBackend``) and ``serve`` (the route
on the Serve app of serve_configs/local.yaml, started on an embedded Ray cluster; timings from its answer). Medians
and min-max over the runs, per phase; the masks scored against the phantom's label map (volume Dice), so a time is
one of a known result.
Run alone (nothing else on the machine): ``.venv/bin/python benchmarks/pacs_roundtrip.py [--runs 3] [--paths local
serve] [--modes propagate every-slice] [--out runs/bench/pacs_roundtrip.json]``.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import numpy as np
import requests
import torch
from dicomweb_client.api import DICOMwebClient

from rau_ray.atomic import atomic_write_text
from rau_ray.data.phantom_dicom import phantom_ct_series
from rau_ray.data.phantoms import ct_abdomen
from rau_ray.dicomweb import DicomWeb
from rau_ray.orthanc import LocalOrthanc
from rau_ray.serve import codecs
from rau_ray.serve.pacs import local_backend, segment_study

PHASES = ("fetch", "qido", "wado", "volume", "segment", "store", "encode", "stow", "total")


def summary(runs: list[dict]) -> dict:
    out = {}
    for phase in PHASES:
        values = [r["timings_s"][phase] for r in runs]
        out[phase] = {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
                      "max_s": round(max(values), 3)}
    return out


def dice_vs_truth(masks: dict, truth: np.ndarray) -> dict:
    """The volume Dice of each structure's masks against the phantom's label map."""
    values = {name: value for value, name in ct_abdomen.LABELS.items()}
    out = {}
    for name, m in masks.items():
        t = truth == values[name]
        out[name] = round(2 * float((m & t).sum()) / max(1.0, float(m.sum() + t.sum())), 3)
    return out


def mode_result(results: list[dict], dice: dict | None = None) -> dict:
    out = {"runs": [r["timings_s"] for r in results], "phases": summary(results),
           "structures": [{k: s[k] for k in ("name", "key_slice", "voxels")} for s in results[-1]["structures"]]}
    if dice is not None:
        out["dice_vs_phantom_truth"] = dice
    return out


def run_local(url: str, study: str, structures: list[str], runs: int, modes: list[str], truth: np.ndarray) -> dict:
    t0 = time.perf_counter()
    out = {}
    with local_backend("shipped:grpo", "shipped:seg") as backend:
        out["models_and_bank_load_s"] = round(time.perf_counter() - t0, 2)
        out["torch_threads"] = torch.get_num_threads()
        for mode in modes:
            results, masks = [], {}
            for _ in range(runs):
                pacs = DicomWeb(url, timeout_s=60)
                results.append(asyncio.run(segment_study(pacs, study, structures, backend, masks_out=masks,
                                                         propagate=mode == "propagate",
                                                         known=backend.known_structures())))
                pacs.close()
            out[mode] = mode_result(results, dice_vs_truth(masks, truth))
    return out


def run_serve(url: str, study: str, structures: list[str], runs: int, modes: list[str], truth: np.ndarray) -> dict:
    from rau_ray.serve.app import local_options, start, stop  # noqa: PLC0415 - Ray Serve only for this path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    base = start(profile="tiny", port=port, timeout_s=600)
    out = {"app_start_s": round(time.perf_counter() - t0, 2),
           "torch_threads_per_replica": local_options()[0].get("threads")}
    try:
        for mode in modes:
            results = []
            for _ in range(runs):
                r = requests.post(base + "/v1/pacs/segment", json={
                    "url": url, "study": study, "structures": structures, "timeout_s": 60, "masks": True,
                    "propagate": mode == "propagate"}, timeout=1200)
                r.raise_for_status()
                results.append(r.json())
            masks = {s["name"]: np.stack([codecs.rle_decode(m) for m in s["mask"]])
                     for s in results[-1]["structures"]}
            out[mode] = mode_result(results, dice_vs_truth(masks, truth))
    finally:
        stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--structures", default="liver,spleen")
    p.add_argument("--paths", nargs="+", default=["local", "serve"], choices=("local", "serve"))
    p.add_argument("--modes", nargs="+", default=["propagate", "every-slice"], choices=("propagate", "every-slice"),
                   help="every slice (the CLI's and route's default) and/or a key slice + SAM2 propagation")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args()
    structures = a.structures.split(",")
    datasets, truth = phantom_ct_series(3, slices=a.slices, size=a.size)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
              "command": " ".join(["python", *sys.argv]), "series": {"slices": a.slices, "size": a.size},
              "structures": structures, "runs": a.runs}
    with tempfile.TemporaryDirectory(prefix="rau-bench-orthanc-") as tmp, LocalOrthanc(tmp) as orthanc:
        t0 = time.perf_counter()
        DICOMwebClient(orthanc.dicomweb_url).store_instances(datasets)
        result["upload_s"] = round(time.perf_counter() - t0, 3)
        study = str(datasets[0].StudyInstanceUID)
        if "local" in a.paths:
            result["local"] = run_local(orthanc.dicomweb_url, study, structures, a.runs, a.modes, truth)
        if "serve" in a.paths:
            result["serve"] = run_serve(orthanc.dicomweb_url, study, structures, a.runs, a.modes, truth)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        atomic_write_text(a.out, text + "\n")


if __name__ == "__main__":
    main()
