"""A full tiny Ray Tune sweep of the segmenter on this machine: projector width x LoRA rank (+ a random lr), ASHA.

Makes the phantom dataset the sweep's base job trains on when it is missing (``jobs/configs/data-tiny.yaml``), runs
the sweep (``jobs/configs/tune-seg-tiny.yaml`` by default: the 4 x 4 grid, 60 steps a trial, 2 trials at once),
prints the figures BENCHMARKS.md quotes (trials, stopped early, wall time, trials/hour, best config and metric) and
copies the heatmap to ``docs/tune_heatmap.png``. An interrupted run continues with ``--resume``.
Run: ``python benchmarks/tune_sweep.py [--config FILE] [--name NAME] [--resume]`` (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from rau_ray.atomic import atomic_write_text
from rau_ray.config import load_config
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.tune.sweep import load_sweep_config, run_sweep

REPO = Path(__file__).resolve().parents[1]


def ensure_data(sweep) -> str:
    """The base job's manifest; made from data-tiny.yaml (its ``out`` set to the manifest's folder) if missing."""
    base = yaml.safe_load(Path(sweep.base).read_text())
    manifest = Path(sweep.overrides.get("manifest", base["manifest"]))
    if not manifest.is_file():
        data = load_config(REPO / "jobs" / "configs" / "data-tiny.yaml", MakeConfig, {"out": str(manifest.parent)})
        make_dataset(data, backend="ray")
    return str(manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/tune-seg-tiny.yaml")
    parser.add_argument("--name", help="sweep name (default: the config's)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--heatmap", default="docs/tune_heatmap.png", help="where to copy the heatmap")
    parser.add_argument("--out", default="runs/bench/tune_sweep.json")
    args = parser.parse_args()
    sweep = load_sweep_config(args.config, {"name": args.name} if args.name else None)
    manifest = ensure_data(sweep)
    t0 = time.perf_counter()
    summary = run_sweep(sweep, resume=args.resume)
    summary["wall_s_with_startup"] = round(time.perf_counter() - t0, 1)
    summary["manifest"] = manifest
    if summary.get("heatmap"):
        Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary["heatmap"], args.heatmap)
    atomic_write_text(args.out, json.dumps(summary, indent=2, default=str))
    best = summary.get("best") or {}
    print(json.dumps({k: summary[k] for k in ("trials", "finished", "stopped_early", "error", "wall_s",
                                              "wall_s_with_startup", "trials_per_hour")}, indent=2))
    print(f"best: {best.get('trial_id')} {best.get('config')} {summary['metric']}={best.get('value')}")
    print(Path(summary["table_md"]).read_text())


if __name__ == "__main__":
    main()
