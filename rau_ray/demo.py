"""The main job, ``rau demo`` / ``make demo``: the whole pipeline on an embedded local Ray cluster, tiny profile.

Today: phantom datasets of every modality generated in parallel on Ray, a preview picture of them, and a 3D
volume round-tripped through NIfTI + dataset.json import. Later stages (index, SFT, GRPO, seg, eval, serve) join
as they land. Use: ``rau demo --out runs/demo``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rau_ray import ray_session
from rau_ray.atomic import atomic_write_text
from rau_ray.data.importers import ImportConfig, import_dataset
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.phantoms import PHANTOMS
from rau_ray.data.preview import preview


def run_demo(out: str | Path = "runs/demo", subjects: int = 24, seed: int = 0, size: int = 192) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    ray = ray_session.connect()
    print(f"Ray cluster: {ray.cluster_resources().get('CPU', 0):.0f} CPUs", flush=True)
    report: dict = {"datasets": {}}
    for name in PHANTOMS:
        report["datasets"][name] = make_dataset(MakeConfig(modality=name, n=subjects, out=str(out / "data" / name),
                                                           seed=seed, size=size))
    vol_dir = out / "data" / "ct-abdomen-3d"
    report["volumes"] = make_dataset(MakeConfig(modality="ct-abdomen", n=4, out=str(vol_dir), seed=seed, dims=3,
                                                size=128))
    report["imported"] = import_dataset(ImportConfig(dataset_json=str(vol_dir / "dataset.json"),
                                                     out=str(out / "data" / "ct-abdomen-3d-imported"), every=4))
    report["preview"] = str(preview([out / "data" / name for name in PHANTOMS], out / "preview.png", n=4, cols=4))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"\nPreview of the phantom data: {report['preview']}\nReport: {out / 'report.json'}", flush=True)
    return report
