"""Benchmark: retrieval recall@1/@5 (same modality, nearest pose) of the tiny DINOv2 bank on phantoms.

Builds ct-abdomen + xray-angio phantom datasets, a bank of their train split, and queries it with the held-out
(test) subjects, each query excluding its own subject. Run: ``.venv/bin/python benchmarks/retrieval_recall.py``.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.models.retrieval import TINY, Embedder, ReferenceBank, recall_at_k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct-subjects", type=int, default=60)
    p.add_argument("--angio-subjects", type=int, default=30)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--pose-tolerance", type=int, default=2)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rau-recall-"))
    lines = []
    for modality, n in (("ct-abdomen", a.ct_subjects), ("xray-angio", a.angio_subjects)):
        make_dataset(MakeConfig(modality, n=n, out=str(root / modality), size=a.size), backend="local",
                     progress=False)
        for line in (root / modality / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            row["image"], row["label"] = f"{modality}/{row['image']}", f"{modality}/{row['label']}"
            lines.append(json.dumps(row))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    embedder = Embedder(TINY)
    t0 = time.perf_counter()
    bank = ReferenceBank.build(manifest, TINY, split="train", backend="local", progress=False)
    build_s = time.perf_counter() - t0
    result = {"date": time.strftime("%Y-%m-%d"), "embedder": embedder.id, "bank_size": len(bank),
              "bank_build_s": round(build_s, 2), "pose_tolerance_slices": a.pose_tolerance,
              "test": recall_at_k(bank, embedder, manifest, split="test", pose_tolerance=a.pose_tolerance),
              "val": recall_at_k(bank, embedder, manifest, split="val", pose_tolerance=a.pose_tolerance)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
