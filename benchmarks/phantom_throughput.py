"""Benchmark: phantom slices per second, one process vs the Ray-parallel path, measured side by side.

Both paths write the same files (they are byte-identical); the Ray path runs generation + PNG encoding in
1-CPU tasks and writes on the driver. Runs alternate (local, ray, local, ray, ...) and medians are reported.
Run: ``.venv/bin/python benchmarks/phantom_throughput.py [--subjects 100 --size 256 --repeats 3]``.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process on both paths: compare processes, not BLAS

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rau_ray import ray_session
from rau_ray.data.make import MakeConfig, make_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modality", default="ct-abdomen")
    p.add_argument("--subjects", type=int, default=100, help="ct-abdomen: 4 slices per subject")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    a = p.parse_args()

    t0 = time.perf_counter()
    ray = ray_session.connect(num_cpus=a.cpus)
    startup = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="rau-bench-"))
    make_dataset(MakeConfig(a.modality, n=2 * a.cpus, out=str(tmp / "warm"), size=a.size), progress=False)

    rates: dict[str, list[float]] = {"local": [], "ray": []}
    samples = 0
    for i in range(a.repeats):
        for backend in ("local", "ray"):
            out = tmp / f"{backend}{i}"
            r = make_dataset(MakeConfig(a.modality, n=a.subjects, out=str(out), size=a.size), backend=backend,
                             progress=False)
            samples = r["samples"]
            rates[backend].append(r["samples_per_second"])
            shutil.rmtree(out)
    shutil.rmtree(tmp)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "modality": a.modality, "samples_per_run": samples, "size": a.size,
        "ray_cpus": int(ray.cluster_resources()["CPU"]),
        "local_slices_per_s": rates["local"], "ray_slices_per_s": rates["ray"],
        "median_local": med["local"], "median_ray": med["ray"], "speedup": round(med["ray"] / med["local"], 2),
        "ray_startup_s": round(startup, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
